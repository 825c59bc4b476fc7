"""The step at its seams: a stub engine (train.engine.Engine's methods) instead of DeepSpeed (the real one
runs in test_trainer.py and test_checkpoint.py). No host sync inside a step, the skipped step's loss is the
mean, the guard aborts."""

from __future__ import annotations

import contextlib
import math
import os
import signal

import pytest
import torch
from helpers import objective
from hypothesis import given, settings
from hypothesis import strategies as st

from rm_trainer.objectives.bt_loss import N_SUMS, pair_sums
from rm_trainer.train.step import SkipGuard, StepOptions, StepRecord, StopFlag, train_step

PAIRS = objective()
TOKENS, SLOTS = N_SUMS, N_SUMS + 1  # after the objective's sums: real tokens, token slots
CPU = StepOptions(PAIRS, torch.device("cpu"))


class StubEngine:
    """Returns fixed rewards per call; 'skips' its update when told to (as DeepSpeed does on a
    non-finite gradient norm)."""

    def __init__(self, rewards: list[torch.Tensor], skip_update: bool = False):
        self.rewards, self.calls, self.skip_update = rewards, 0, skip_update
        self.skipped_steps, self.backwards, self.steps = 0, 0, 0

    def __call__(self, ids, lens):
        assert ids.shape[0] == lens.shape[0] == self.rewards[self.calls].shape[0]
        r = self.rewards[self.calls].clone().requires_grad_()
        self.calls += 1
        return r

    def aux_loss(self):  # a dense backbone: nothing to add
        return None

    def tie_log_nu(self):  # no Davidson tie model
        return None

    def micro_step(self):  # no activation offload
        return contextlib.nullcontext()

    def lr(self):
        return 1e-3

    def skipped(self):
        return self.skipped_steps

    def backward(self, loss):
        self.backwards += 1
        loss.backward()

    def step(self):
        self.steps += 1
        if self.skip_update and self.steps == 2:  # the accumulation boundary
            self.skipped_steps += 1


def micro(n_pairs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = [{"ids": [torch.randint(1, 9, (int(c),), generator=g).tolist(),
                     torch.randint(1, 9, (int(r),), generator=g).tolist()]}
            for c, r in torch.randint(2, 7, (n_pairs, 2), generator=g)]
    return PAIRS.collate(rows, pad_id=0)


def rewards_for(b, seed: int) -> torch.Tensor:
    return torch.randn(2 * b.rows, generator=torch.Generator().manual_seed(seed))


def test_statistics_are_summed_over_micro_batches_without_a_host_sync(monkeypatch):
    batches = [micro(3, 0), micro(2, 1)]
    rewards = [rewards_for(b, i) for i, b in enumerate(batches)]
    eng = StubEngine(rewards)
    syncs = []
    for name in ("tolist", "item", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k:
                            (syncs.append(_n), _real(self, *a, **k))[1])
    rec = train_step(eng, 7, batches, CPU)
    assert syncs == []  # statistics stay on the device; skip and stop are decided from host values
    monkeypatch.undo()
    want = sum(pair_sums(r[: len(r) // 2], r[len(r) // 2:]) for r in rewards)
    assert torch.allclose(rec.stats[:N_SUMS], want, rtol=1e-12)
    tokens = sum(int(b.seqs.lens.sum()) for b in batches)
    slots = sum(b.seqs.input_ids.numel() for b in batches)
    assert rec.stats[TOKENS].item() == tokens and rec.stats[SLOTS].item() == slots and rec.stop_votes == 0
    assert (rec.step, rec.skipped, rec.stop, eng.backwards, eng.steps) == (7, False, False, 2, 2)
    m = rec.metrics(seconds=2.0)
    assert m["loss"] == pytest.approx(want[1].item() / 5, rel=1e-12) and m["acc"] == pytest.approx(want[2].item() / 5)
    assert m["padding_efficiency"] == pytest.approx(tokens / slots) and m["tokens_per_s"] == tokens / 2.0


def test_a_skipped_step_logs_the_mean_pair_loss_not_the_sum():
    batches = [micro(4, 2), micro(4, 3)]
    rewards = [rewards_for(b, 10 + i) for i, b in enumerate(batches)]
    rec = train_step(StubEngine(rewards, skip_update=True), 3, batches, CPU)
    assert rec.skipped
    want = sum(pair_sums(r[:4], r[4:]) for r in rewards)
    assert rec.metrics(1.0)["loss"] == pytest.approx(want[1].item() / 8, rel=1e-12)  # 8 pairs: the mean


def test_a_nan_loss_is_logged_as_nan_and_the_skip_is_deepspeeds_decision():
    """A NaN loss makes every gradient NaN, so DeepSpeed's norm check skips the update and counts it (real
    runs: test_checkpoint); the step reads that host counter instead of syncing on the loss."""
    b = micro(2, 4)
    r = rewards_for(b, 5)
    r[0] = float("nan")
    eng = StubEngine([r, r], skip_update=True)
    rec = train_step(eng, 1, [b, b], CPU)
    assert rec.skipped and math.isnan(rec.metrics(1.0)["loss"]) and rec.metrics(1.0)["acc"] is not None


def test_skip_guard_counts_and_aborts_after_k_in_a_row_naming_the_batch():
    guard = SkipGuard(2, lambda step: [step * 10, step * 10 + 1])
    rec = lambda step, skipped: StepRecord(step, torch.zeros(9), skipped, 0, 0.0, 0.0, PAIRS)  # noqa: E731
    for step, skipped in ((1, True), (2, False), (3, True)):
        guard.check(rec(step, skipped))
    assert (guard.total, guard.in_a_row) == (2, 1)
    with pytest.raises(RuntimeError, match=r"step 4: 2 consecutive .* training pairs \[40, 41\]"):
        guard.check(rec(4, True))


def test_stop_flag_is_set_by_usr1_and_term_and_rides_on_the_step():
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        flag = StopFlag().install()
        assert not flag
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag and flag.signals == ["SIGUSR1"]
        b = micro(1, 6)
        rec = train_step(StubEngine([rewards_for(b, 7)]), 1, [b], StepOptions(PAIRS, torch.device("cpu"), stop=flag))
        assert rec.stop and rec.stop_votes == 1  # one rank voted to stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- bt+regression: one loss over pairs and rated rows


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.booleans(), min_size=1, max_size=8), k=st.integers(1, 3), seed=st.integers(0, 10**6),
       bt_weight=st.sampled_from([1.0, 0.3]), scale=st.sampled_from([None, 0.05]))
def test_the_mixed_loss_is_bt_on_the_combined_reward_plus_the_mse_per_row(kinds, k, seed, bt_weight, scale):
    """kinds: True a pair row (two sequences, scores [1, 0]), False a rated row (one sequence, K ratings)."""
    from rm_trainer.objectives.mixed import MixedBatch
    from rm_trainer.objectives.regression_loss import regression_loss

    g = torch.Generator().manual_seed(seed)
    group = torch.tensor([i for i, pair in enumerate(kinds) for _ in range(2 if pair else 1)])
    S, G = len(group), len(kinds)
    preds = torch.randn(S, k, generator=g) * 2
    targets = torch.full((S, k), float("nan"))
    scores = torch.zeros(S)
    for i, pair in enumerate(kinds):
        at = (group == i).nonzero().flatten()
        if pair:
            scores[at[0]] = 1.0
        else:
            targets[at[0]] = torch.randint(0, 5, (k,), generator=g).float()
    c, w = torch.randn(k, generator=g), torch.rand(k, generator=g) + 0.5
    names = [f"a{i}" for i in range(k)]
    obj = objective(train={"objective": "bt+regression", "bt_weight": bt_weight,
                           "attribute_weights": dict(zip(names, w.tolist(), strict=True))},
                    data={"attributes": names}, model={"reward_weights": dict(zip(names, c.tolist(), strict=True))})
    b = MixedBatch(None, None, G, group, scores, targets)
    a = preds.clone().requires_grad_()
    loss, sums = obj.loss(b, a, scale, None)
    loss.backward()
    # the reference, written from the definition: each row once, a pair's bt_weight x BT of (p @ c)
    ref_p = preds.double().clone().requires_grad_()
    r = ref_p @ c.double()
    bt = sum(torch.nn.functional.softplus(-(r[(group == i).nonzero()[0, 0]] - r[(group == i).nonzero()[1, 0]]))
             for i, pair in enumerate(kinds) if pair)
    mse = regression_loss(ref_p, targets.double(), None, w.double(), scale=1.0)
    want = (bt_weight * bt + mse) * (1 / G if scale is None else scale)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * max(abs(want.item()), 1e-6)
    assert torch.allclose(a.grad.double(), ref_p.grad, rtol=1e-5, atol=1e-5 * float(ref_p.grad.abs().max()) + 1e-12)
    m = obj.metrics(sums)
    assert m["rows"] == G and m["pairs"] == sum(kinds)
    assert m["loss"] == pytest.approx(want.item() / (1 / G if scale is None else scale) / G, rel=1e-5)
