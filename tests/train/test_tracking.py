"""--report_to wandb: an offline wandb run holds what metrics.jsonl holds, and a resumed run continues the
same wandb run. The run's .wandb file is read back record by record (wandb's own protobuf records in its
LevelDB-style log), not through a mock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import metrics, train, train_args

pytestmark = pytest.mark.slow


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks
    of chunks, each with crc32c (4), length (2) and type (1: whole, 2/3/4: first/middle/last part)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def history(run_dir: Path) -> tuple[str, dict[int, dict], dict]:
    """(run id, {step: {key: value}}, config) of one offline run folder."""
    (f,) = run_dir.glob("run-*.wandb")
    rows, config, run_id = {}, {}, None
    for rec in wandb_records(f):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
            config |= {i.key: json.loads(i.value_json) for i in rec.run.config.update}
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            rows.setdefault(int(items["_step"]), {}).update(items)
    return run_id, rows, config


def test_an_offline_wandb_run_holds_the_metrics_and_a_resume_continues_it(demo_assets, tiny_pretrained, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_pretrained, demo_assets["train"], demo_assets["test"], "zero2", dtype="fp32", lr=1e-3,
                      warmup_steps=1, max_len=64, seed=3, micro_batch_size=4, eval_every=3, save_every=3,
                      report_to="tensorboard,wandb")
    train(out, args + ["--max_steps", "6"], launcher="python", nprocs=1, env={"WANDB_MODE": "offline"})
    (first,) = (out / "wandb").glob("offline-run-*")
    run_id, rows, config = history(first)
    for r in metrics(out) + metrics(out, "eval"):
        for k, v in r.items():
            if k not in ("step", "split") and isinstance(v, (int, float)):
                assert rows[r["step"]][f"{r['split']}/{k}"] == v, (r["step"], k)
    assert sorted(s for s in rows if "train/loss" in rows[s]) == [1, 2, 3, 4, 5, 6]
    # (a logged dict is stored flattened: one item per leaf, "key/leaf")
    assert rows[3]["eval_hist/margin/_type"] == "histogram"  # each evaluation's reward histograms
    pictures = sorted(k.removesuffix("/_type") for k, v in rows[6].items() if v == "image-file")
    assert pictures == sorted(f"eval/{p.stem}" for p in (out / "eval").glob("*.png")) and pictures  # the report's
    assert config["run"]["train"]["seed"] == 3 and config["world_size"] == 1 and "deepspeed" in config
    record = json.loads((out / "checkpoints" / "step_6" / "rm_trainer_meta.json").read_text())
    assert record["tracking"]["wandb_run_id"] == run_id

    # the same command with more steps resumes from step_6 and continues the same wandb run
    proc = train(out, args + ["--max_steps", "8"], launcher="python", nprocs=1,
                 env={"WANDB_MODE": "offline"})
    assert "resumed from" in proc.stdout
    (second,) = set((out / "wandb").glob("offline-run-*")) - {first}
    run_id2, rows2, _ = history(second)
    assert run_id2 == run_id
    assert [s for s in sorted(rows2) if "train/loss" in rows2[s]] == [7, 8]
    assert [rows2[s]["train/loss"] for s in (7, 8)] == [r["loss"] for r in metrics(out)[6:8]]
