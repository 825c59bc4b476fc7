import json

import pytest
import torch
from transformers import AutoTokenizer

from rm_trainer.data import (
    PairSampler,
    collate,
    encode,
    eval_batches,
    get_preference_iterator,
    read_pairs,
    tokenize_pairs,
)


@pytest.fixture(scope="module")
def tok(demo_assets):
    return AutoTokenizer.from_pretrained(demo_assets["model"])


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return str(p)


def test_encode_ends_in_eos_and_truncation_keeps_it(tok):
    ids, truncated = encode(tok, "Human: hi Assistant: the answer is clear", 64)
    assert ids[-1] == tok.eos_token_id and not truncated
    long_text = " ".join(["the"] * 50)
    ids, truncated = encode(tok, long_text, 16)
    assert truncated and len(ids) == 16 and ids[-1] == tok.eos_token_id
    assert ids.count(tok.eos_token_id) == 1


def test_collate_right_pads_to_common_length():
    rows = [{"chosen_ids": [5, 6, 7], "rejected_ids": [5, 8], "chosen_len": 3, "rejected_len": 2},
            {"chosen_ids": [9], "rejected_ids": [9, 9, 9, 9], "chosen_len": 1, "rejected_len": 4}]
    b = collate(rows, pad_id=0)
    assert b["chosen_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert b["rejected_ids"].tolist() == [[5, 8, 0, 0], [9, 9, 9, 9]]
    assert b["chosen_len"].tolist() == [3, 1] and b["rejected_len"].tolist() == [2, 4]
    # the 2B concatenation of the trainer works because both halves share T
    assert torch.cat([b["chosen_ids"], b["rejected_ids"]]).shape == (4, 4)


def test_both_formats_and_drop_accounting(tmp_path, tok):
    hh = write(tmp_path, "hh.jsonl", [
        json.dumps({"chosen": "Human: hi Assistant: clear answer", "rejected": "Human: hi Assistant: rude answer"}),
        json.dumps({"chosen": "Human: hi Assistant: same", "rejected": "Human: hi Assistant: same"}),
    ])
    ds = read_pairs(hh)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and ds[0]["prompt"] == ""
    kept, report = tokenize_pairs(ds, tok, max_len=64)
    assert report["rows"] == 2 and report["used"] == 1 and report["dropped"]["identical_raw"] == 1
    pr = write(tmp_path, "p.jsonl", [
        json.dumps({"prompt": "Human: hi Assistant:", "chosen": " clear kind", "rejected": " rude wrong"}),
        json.dumps({"prompt": "Human: hi Assistant:", "chosen": " ", "rejected": " rude"}),
        json.dumps({"prompt": "Human: " + "the " * 40, "chosen": " clear", "rejected": " rude"}),
    ])
    kept, report = tokenize_pairs(read_pairs(pr), tok, max_len=12)
    assert report["dropped"] == {"empty_response": 1, "identical_raw": 0, "identical_after_truncation": 1}
    assert report["used"] == 1
    row = kept[0]
    assert row["chosen_len"] == len(row["chosen_ids"]) and row["chosen_ids"][-1] == tok.eos_token_id


def test_parquet_and_json_read(tmp_path):
    import datasets

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "x.parquet"))
    (tmp_path / "x.json").write_text(json.dumps(rows))
    assert len(read_pairs(str(tmp_path / "x.parquet"))) == 3
    assert len(read_pairs(str(tmp_path / "x.json"))) == 3


@pytest.mark.parametrize("lines,expected", [
    (['{"chosen": "a", "rejected": "b"}', '{"chosen": "a", "rejected": '], r"bad\.jsonl:2: invalid JSON"),
    (['{"chosen": "a", "rejected": "b"}', "", '{"chosen": 3, "rejected": "b"}'],
     r"bad\.jsonl:3: field 'chosen' is a int, not text"),
    (['{"chosen": "a", "rejected": "b"}', '{"chosen": "a"}'], r"bad\.jsonl:2: field 'rejected' is missing"),
    (['{"chosen": "a", "answer": "b"}'], r"bad\.jsonl: no 'rejected' field in any row"),
    (['[1, 2]'], r"bad\.jsonl:1: each line must be a JSON object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, lines, expected):
    with pytest.raises(ValueError, match=expected):
        read_pairs(write(tmp_path, "bad.jsonl", lines))


def test_empty_and_unsupported_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="e.jsonl: file is empty"):
        read_pairs(str(tmp_path / "e.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type"):
        read_pairs(str(tmp_path / "x.csv"))


def test_sampler_global_batch_is_independent_of_world_and_accumulation():
    n, steps = 50, 14  # 12 full batches of 4 per epoch: crosses an epoch boundary
    def global_batches(micro, accum, world):
        out = []
        for s in range(steps):
            per_rank = [PairSampler(n, micro, accum, world, r, seed=5).micro_batches(s) for r in range(world)]
            out.append(sorted(i for r in per_rank for mb in r for i in mb))
        return out
    ref = global_batches(4, 1, 1)
    assert global_batches(2, 1, 2) == ref
    assert global_batches(2, 2, 1) == ref
    assert global_batches(1, 2, 2) == ref
    first_epoch = [i for b in ref[:12] for i in b]
    assert len(set(first_epoch)) == 48  # no pair twice within an epoch
    assert ref[12] != ref[0]  # a new permutation each epoch


def test_sampler_ranks_are_disjoint_and_seed_matters():
    a = PairSampler(64, 4, 2, 2, 0, seed=1).micro_batches(3)
    b = PairSampler(64, 4, 2, 2, 1, seed=1).micro_batches(3)
    assert not set(sum(a, [])) & set(sum(b, []))
    assert PairSampler(64, 4, 2, 2, 0, seed=2).micro_batches(3) != a


def test_eval_batches_cover_each_pair_exactly_once_in_lockstep():
    for n, world, bs in ((7, 2, 2), (1, 2, 4), (10, 3, 3), (8, 2, 4)):
        per_rank = [eval_batches(n, world, r, bs) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # same number of forwards on every rank
        seen = [i for p in per_rank for idx, w in p for i, wt in zip(idx, w, strict=True) if wt > 0]
        assert sorted(seen) == list(range(n))


def test_preference_iterator_yields_collated_steps(tmp_path, tok):
    pr = write(tmp_path, "p.jsonl", [json.dumps({"prompt": "q", "chosen": f" clear {i}", "rejected": " rude"})
                                     for i in range(10)])
    kept, _ = tokenize_pairs(read_pairs(pr), tok, 32)
    sampler = PairSampler(len(kept), micro=2, accum=2, world=1, rank=0, seed=0)
    steps = list(get_preference_iterator(kept, sampler, tok.pad_token_id, start_step=1, total_steps=3))
    assert [s for s, _ in steps] == [1, 2]
    assert all(len(mbs) == 2 and mbs[0]["chosen_ids"].shape[0] == 2 for _, mbs in steps)
