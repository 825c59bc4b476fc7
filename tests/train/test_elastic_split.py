"""The global batch kept across world sizes (train/elastic.keep_global_batch): pure arithmetic, checked
for every combination hypothesis draws."""

from __future__ import annotations

from ast import literal_eval
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from rm_trainer.config import RunConfig
from rm_trainer.errors import ConfigError
from rm_trainer.train.elastic import keep_global_batch


def cfg(micro: int, accum: int) -> RunConfig:
    return RunConfig(model={"path": "m"}, data={"train_path": "d.jsonl"}, output={"output_dir": "o"},
                     train={"micro_batch_size": micro, "grad_accum": accum})


@given(g=st.integers(1, 512), micro=st.integers(1, 16), world=st.integers(1, 64), accum=st.integers(1, 8))
def test_the_global_batch_is_kept_or_the_error_names_sizes_that_fit(g, micro, world, accum):
    try:
        got = keep_global_batch(cfg(micro, accum), world, {"global_batch": g}, Path("step_6"))
    except ConfigError as e:
        msg = str(e)
        assert g % (micro * world) != 0 and f"global batch of {g} pairs" in msg and f"on {world} ranks" in msg
        if "World sizes that fit" in msg:  # each one listed really fits, and none was left out
            listed = literal_eval(msg.split("micro_batch_size " + str(micro) + ": ")[1].split(" (closest")[0])
            assert listed == [w for w in range(1, g + 1) if g % (micro * w) == 0]
        if "micro_batch_size one of" in msg:
            micros = literal_eval(msg.split("micro_batch_size one of ")[1].split(".")[0])
            assert micros and all(g % (m * world) == 0 for m in micros)
        return
    t = got.train
    assert t.micro_batch_size * t.grad_accum * world == g and t.micro_batch_size == micro
