"""Held-out evaluation: exact metrics over the whole test set, overall and per source, at eval_every and
at the end, whatever the objective (its sums and metrics: objectives/). The last result's reward mean/std
are the normalisation statistics (never training data).

Pairs also get the diagnostics (diagnostics.py: length bias, calibration, margins) and the reward
histograms: every evaluation gathers each pair's rewards to rank 0, and the last one becomes OUT/eval/
(eval/report.py). Two truncations: the logged eval/* metrics see each row as the loss does (a prompt too
long for the longest response is cut for all of them). OUT/eval/ is the reward function itself: each
response scored on its own, as score_texts, rm-score, rm-serve and rm-eval score it, so it equals
`rm-eval` on the same rows; where no held-out pair was cut, the two are the same pass."""

from __future__ import annotations

import torch

from rm_trainer.data.batching import eval_batches
from rm_trainer.eval import diagnostics
from rm_trainer.objectives import Objective
from rm_trainer.objectives.base import single_view
from rm_trainer.train import engine


def _lengths(seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [diagnostics.response_lengths(c, r) for c, r in seqs]
    return torch.tensor([c for c, _ in lengths]), torch.tensor([r for _, r in lengths])


class Evaluator:
    """Built from the run config's evaluation settings (train.eval_every, the eval batch size) and the run's
    objective, ranks, held-out rows and source names."""

    def __init__(self, cfg, objective: Objective, test, rt: engine.Runtime, pad_id: int, sources: list[str]):
        self.test, self.every, self.batch_size = test, cfg.train.eval_every, cfg.eval_batch_size
        self.objective, self.rt, self.pad_id, self.sources = objective, rt, pad_id, sources
        self.pairs_view = objective.pair_report  # the diagnostics and OUT/eval/ read pairs
        self.last: dict[str, float] = {}
        self.last_step = 0
        self.pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # rank 0: the last eval's (r_chosen, r_rejected)
        self.diagnostics: dict = {}
        self.report: tuple | None = None  # rank 0: ((r_chosen, r_rejected), diagnostics) for OUT/eval/
        self._lengths: tuple[torch.Tensor, torch.Tensor] | None = None
        self._single: bool | None = None

    def lengths(self, single: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Response tokens of every test pair (after the shared prefix), computed once, on rank 0."""
        if single:
            return _lengths([single_view(r["single"], r["ids"]) for r in self.test])
        if self._lengths is None:
            self._lengths = _lengths(self.test["ids"])
        return self._lengths

    def due(self, step: int, total: int) -> bool:
        return self.test is not None and (step == total or bool(self.every and step % self.every == 0))

    def reward_stats(self) -> dict:
        if not self.last or "reward_mean" not in self.last:  # regression: the attributes keep their scale
            return {}
        counted = {k: self.last[k] for k in ("pairs", "rows") if k in self.last}  # what the statistics cover
        return {"mean": self.last["reward_mean"], "std": self.last["reward_std"], **counted, "step": self.last_step}

    def single_view(self) -> bool:
        """Whether some held-out response reads differently on its own than in its row (truncation): then
        the end-of-run report takes a second pass. The same answer on every rank (the same rows)."""
        if self._single is None:  # held-out rows keep each response's own encoding ([] where the same)
            self._single = any(len(s) for x in self.test["single"] for s in x)
        return self._single

    def _scores(self, eng, single: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-source sums, each test pair's rewards (pairs only)) of every test row, all-reduced. Ranks with
        fewer rows run zero-weight filler, so every rank does the same number of forwards (ZeRO-3 gathers
        are collective). single: each response encoded on its own (the rows' `single`), not as its row."""
        rt, obj = self.rt, self.objective
        eng.eval()
        sums = torch.zeros(len(self.sources), obj.sums_width, dtype=torch.float64)
        per_pair = torch.zeros(len(self.test), 2, dtype=torch.float64) if self.pairs_view else None
        log_nu = eng.tie_log_nu()
        with torch.no_grad():
            for idx, w in eval_batches(len(self.test), rt.dp_world, rt.dp_rank, self.batch_size):
                b = obj.collate([self.test[i] for i in idx], self.pad_id, single=single)
                out = b.seqs.run(eng, rt.device).cpu()  # a CPU-GPU sync point, once per eval batch
                weight = torch.tensor(w, dtype=torch.float64)
                for s in b.source.unique().tolist():
                    sums[s] += obj.sums(b, out, (b.source == s).double() * weight, _cpu(log_nu))
                if per_pair is not None:
                    real = [j for j, wj in enumerate(w) if wj > 0]
                    per_pair[[idx[j] for j in real]] = obj.rewards(b, out)[real].double()
        eng.train()
        if not rt.counts:  # a sequence group's later ranks: the same rewards as its first
            sums.zero_()
            per_pair = None if per_pair is None else per_pair.zero_()
        sums = engine.all_reduce_sum(sums.to(rt.device)).cpu()
        return sums, None if per_pair is None else engine.all_reduce_sum(per_pair.to(rt.device)).cpu()

    def run(self, eng, step: int, final: bool = False) -> dict[str, float]:
        """Every test row once, as the loss sees it: the logged metrics, overall and per source. final: the
        end-of-run report (OUT/eval/) reads each response on its own, as rm-eval and score_texts do."""
        obj = self.objective
        sums, per_pair = self._scores(eng, single=False)
        single = self._scores(eng, single=True)[1] if final and self.pairs_view and self.single_view() else None
        result = obj.metrics(sums.sum(0))
        if len(self.sources) > 1:
            for s, name in enumerate(self.sources):
                if sums[s, 0] > 0:  # a source without pairs has no accuracy
                    result |= {f"{name}/{k}": v for k, v in obj.metrics(sums[s]).items()
                               if (k in obj.source_keys or "/" in k) and v == v}
        if self.rt.is_main and per_pair is not None:  # seconds of solo work after the collectives, none pending
            self._diagnose(result, per_pair, single)
        self.last, self.last_step = result, step
        return result

    def _diagnose(self, result: dict, per_pair: torch.Tensor, single: torch.Tensor | None) -> None:
        """Rank 0: the diagnostics (length bias, calibration, margins) and OUT/eval/'s pairs, over the strict
        pairs: a tied pair (--tie_key) has no preferred side."""
        keep = self.strict()
        if keep is not None and not keep.any():
            return
        pick = (lambda x: x) if keep is None else (lambda x: x[keep])  # noqa: E731
        names = [self.sources[int(i)] for i in self.test["source"]] if len(self.sources) > 1 else None
        if names is not None and keep is not None:
            names = [n for n, k in zip(names, keep.tolist(), strict=True) if k]
        r_c, r_r = pick(per_pair[:, 0].float()), pick(per_pair[:, 1].float())
        self.diagnostics = diagnostics.diagnose(r_c, r_r, *map(pick, self.lengths()), names)
        self.pairs = (r_c, r_r)
        result |= diagnostics.scalars(self.diagnostics)
        self.report = (self.pairs, self.diagnostics)
        if single is not None:
            pairs = pick(single[:, 0].float()), pick(single[:, 1].float())
            self.report = (pairs, diagnostics.diagnose(*pairs, *map(pick, self.lengths(single=True)), names))

    def strict(self) -> torch.Tensor | None:
        """Which test pairs are strict preferences (None: no --tie_key, all of them)."""
        return self.objective.strict(self.test)


def _cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().cpu()
