"""Held-out evaluation: exact metrics over the whole test set, overall and per source, at eval_every and
at the end. The last result's reward mean/std are the normalisation statistics (never training data).
Every evaluation also gathers each pair's rewards to rank 0 for the diagnostics (diagnostics.py: length
bias, calibration, margins) and the reward histograms; the last one becomes OUT/eval/ (eval/report.py)."""

from __future__ import annotations

import torch

from rm_trainer.data.batching import collate, eval_batches
from rm_trainer.eval import diagnostics
from rm_trainer.loss import N_SUMS, metrics_from_sums, pair_sums
from rm_trainer.train import engine
from rm_trainer.train.step import score_batch


class Evaluator:
    def __init__(self, test, every: int, batch_size: int, rt: engine.Runtime, pad_id: int, sources: list[str]):
        self.test, self.every, self.batch_size, self.rt, self.pad_id = test, every, batch_size, rt, pad_id
        self.sources = sources
        self.last: dict[str, float] = {}
        self.last_step = 0
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # rank 0: the last eval's (r_chosen, r_rejected)
        self.diagnostics: dict = {}
        self._lengths: tuple[torch.Tensor, torch.Tensor] | None = None

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Response tokens of every test pair (after the shared prefix), computed once, on rank 0."""
        if self._lengths is None:
            pairs = zip(self.test["chosen_ids"], self.test["rejected_ids"], strict=True)
            lengths = [diagnostics.response_lengths(c, r) for c, r in pairs]
            self._lengths = torch.tensor([c for c, _ in lengths]), torch.tensor([r for _, r in lengths])
        return self._lengths

    def due(self, step: int, total: int) -> bool:
        return self.test is not None and (step == total or bool(self.every and step % self.every == 0))

    def reward_stats(self) -> dict:
        if not self.last:
            return {}
        return {"mean": self.last["reward_mean"], "std": self.last["reward_std"], "pairs": self.last["pairs"],
                "step": self.last_step}

    def run(self, eng, step: int) -> dict[str, float]:
        """Every test pair once, sums all-reduced across ranks. Ranks with fewer pairs run zero-weight filler,
        so every rank does the same number of forwards (ZeRO-3 gathers are collective)."""
        rt = self.rt
        eng.eval()
        sums = torch.zeros(len(self.sources), N_SUMS, dtype=torch.float64)
        per_pair = torch.zeros(len(self.test), 2, dtype=torch.float64)  # each rank fills its pairs; summed below
        with torch.no_grad():
            for idx, w in eval_batches(len(self.test), rt.world_size, rt.rank, self.batch_size):
                b = collate([self.test[i] for i in idx], self.pad_id)
                rewards = score_batch(eng, b, rt.device).cpu()  # a CPU-GPU sync point, once per eval batch
                B = len(idx)
                real = [j for j, wj in enumerate(w) if wj > 0]
                per_pair[[idx[j] for j in real]] = torch.stack([rewards[:B], rewards[B:]], 1)[real].double()
                for s in b["source"].unique().tolist():
                    mask = (b["source"] == s).double() * torch.tensor(w, dtype=torch.float64)
                    sums[s] += pair_sums(rewards[:B], rewards[B:], mask)
        eng.train()
        sums = engine.all_reduce_sum(sums.to(rt.device)).cpu()
        per_pair = engine.all_reduce_sum(per_pair.to(rt.device)).cpu()
        result = metrics_from_sums(sums.sum(0))
        if len(self.sources) > 1:
            for s, name in enumerate(self.sources):
                if sums[s, 0] > 0:
                    m = metrics_from_sums(sums[s])
                    result |= {f"{name}/{k}": m[k] for k in ("loss", "acc", "margin")}
        if rt.is_main:  # seconds of solo work after the collectives, none pending
            r_c, r_r = per_pair[:, 0].float(), per_pair[:, 1].float()
            names = [self.sources[int(i)] for i in self.test["source"]] if len(self.sources) > 1 else None
            self.diagnostics = diagnostics.diagnose(r_c, r_r, *self.lengths(), names)
            self.pairs = (r_c, r_r)
            result |= diagnostics.scalars(self.diagnostics)
        self.last, self.last_step = result, step
        return result
