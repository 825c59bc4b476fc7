"""Held-out evaluation: exact metrics over the whole test set, overall and per source, at eval_every and
at the end. The last result's reward mean/std are the normalisation statistics (never training data).
Every evaluation also gathers each pair's rewards to rank 0 for the diagnostics (diagnostics.py: length
bias, calibration, margins) and the reward histograms; the last one becomes OUT/eval/ (eval/report.py).

Two truncations: the logged eval/* metrics see each pair as the loss does (a prompt too long for the
longer side is cut for both). OUT/eval/ is the reward function itself: each response scored on its own,
as score_texts, rm-score, rm-serve and rm-eval score it, so it equals `rm-eval` on the same rows; where
no held-out pair was cut, the two are the same pass."""

from __future__ import annotations

import torch

from rm_trainer.attributes import combine, regression_sums
from rm_trainer.data.batching import collate, eval_batches
from rm_trainer.data.rankings import collate_rankings
from rm_trainer.data.ratings import collate_ratings
from rm_trainer.data.tokenize import SINGLE
from rm_trainer.eval import diagnostics
from rm_trainer.loss import N_SUMS, metrics_from_sums, pair_sums
from rm_trainer.objectives import Objective, ranking_sums
from rm_trainer.train import engine
from rm_trainer.train.step import score_batch


def _lengths(c_ids: list, r_ids: list) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [diagnostics.response_lengths(c, r) for c, r in zip(c_ids, r_ids, strict=True)]
    return torch.tensor([c for c, _ in lengths]), torch.tensor([r for _, r in lengths])


class Evaluator:
    def __init__(self, test, every: int, batch_size: int, rt: engine.Runtime, pad_id: int, sources: list[str],
                 objective: Objective = Objective()):
        self.test, self.every, self.batch_size, self.rt, self.pad_id = test, every, batch_size, rt, pad_id
        self.sources = sources
        self.objective = objective  # ranking or regression: the test rows are rankings or rated responses
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
            c_ids = [s or p for s, p in zip(self.test[SINGLE[0]], self.test["chosen_ids"], strict=True)]
            r_ids = [s or p for s, p in zip(self.test[SINGLE[1]], self.test["rejected_ids"], strict=True)]
            return _lengths(c_ids, r_ids)
        if self._lengths is None:
            self._lengths = _lengths(self.test["chosen_ids"], self.test["rejected_ids"])
        return self._lengths

    def due(self, step: int, total: int) -> bool:
        return self.test is not None and (step == total or bool(self.every and step % self.every == 0))

    def reward_stats(self) -> dict:
        if not self.last or "reward_mean" not in self.last:  # regression: the attributes keep their scale
            return {}
        return {"mean": self.last["reward_mean"], "std": self.last["reward_std"], "pairs": self.last["pairs"],
                "step": self.last_step}

    def single_view(self) -> bool:
        """Whether some held-out response reads differently on its own than in its pair (truncation):
        then the end-of-run report takes a second pass. The same answer on every rank (the same rows)."""
        if self._single is None:
            self._single = SINGLE[0] in self.test.column_names and any(
                len(x) for k in SINGLE for x in self.test[k])
        return self._single

    def _scores(self, eng, single: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-source loss sums, per-pair rewards) of every test pair, all-reduced. Ranks with fewer pairs
        run zero-weight filler, so every rank does the same number of forwards (ZeRO-3 gathers are
        collective). single: each response encoded on its own (tokenize.SINGLE), not as its pair."""
        rt = self.rt
        eng.eval()
        sums = torch.zeros(len(self.sources), N_SUMS, dtype=torch.float64)
        per_pair = torch.zeros(len(self.test), 2, dtype=torch.float64)  # each rank fills its pairs; summed below
        with torch.no_grad():
            for idx, w in eval_batches(len(self.test), rt.dp_world, rt.dp_rank, self.batch_size):
                rows = [self.test[i] for i in idx]
                b = collate([as_single(r) for r in rows] if single else rows, self.pad_id)
                rewards = score_batch(eng, b, rt.device).cpu()  # a CPU-GPU sync point, once per eval batch
                B = len(idx)
                real = [j for j, wj in enumerate(w) if wj > 0]
                per_pair[[idx[j] for j in real]] = torch.stack([rewards[:B], rewards[B:]], 1)[real].double()
                for s in b["source"].unique().tolist():
                    mask = (b["source"] == s).double() * torch.tensor(w, dtype=torch.float64)
                    sums[s] += pair_sums(rewards[:B], rewards[B:], mask, b.get("tie"), _cpu(eng.tie_log_nu()))
        eng.train()
        if not rt.counts:  # a sequence group's later ranks: the same rewards as its first
            sums.zero_()
            per_pair.zero_()
        return engine.all_reduce_sum(sums.to(rt.device)).cpu(), engine.all_reduce_sum(per_pair.to(rt.device)).cpu()

    def run(self, eng, step: int, final: bool = False) -> dict[str, float]:
        """Every test pair once, as the loss sees it (pair truncation): the logged metrics. final: the
        end-of-run report (OUT/eval/) reads each response on its own, as rm-eval and score_texts do."""
        if self.objective.kind != "pairs":
            return self._run_rows(eng, step)
        sums, per_pair = self._scores(eng, single=False)
        single = self._scores(eng, single=True)[1] if final and self.single_view() else None
        result = metrics_from_sums(sums.sum(0))
        if len(self.sources) > 1:
            for s, name in enumerate(self.sources):
                if sums[s, 0] > 0:
                    m = metrics_from_sums(sums[s])
                    result |= {f"{name}/{k}": m[k] for k in ("loss", "acc", "margin", "tie_gap") if k in m}
        if self.rt.is_main:  # seconds of solo work after the collectives, none pending
            self._diagnose(result, per_pair, single)
        self.last, self.last_step = result, step
        return result

    def _run_rows(self, eng, step: int) -> dict[str, float]:
        """Every test ranking or rated row once (each response scored once, batch_size rows per forward):
        rankings give pairwise accuracy over all ordered pairs, the top-1 rate and the loss; rated rows each
        attribute's RMSE and Pearson r and the loss. Overall and per source."""
        rt, obj = self.rt, self.objective
        eng.eval()
        sums = torch.zeros(len(self.sources), obj.sums_width(), dtype=torch.float64)
        with torch.no_grad():
            for idx, w in eval_batches(len(self.test), rt.dp_world, rt.dp_rank, self.batch_size):
                rows = [self.test[i] for i in idx]
                b = (collate_ratings if obj.kind == "regression" else collate_rankings)(rows, self.pad_id)
                out = score_batch(eng, b, rt.device).cpu()  # a CPU-GPU sync point, once per eval batch
                for s in b["source"].unique().tolist():
                    keep = (b["source"] == s).double() * torch.tensor(w, dtype=torch.float64)
                    sums[s] += row_sums(obj, b, out, len(idx), keep)
        eng.train()
        if not rt.counts:  # a sequence group's later ranks: the same rewards as its first
            sums.zero_()
        sums = engine.all_reduce_sum(sums.to(rt.device)).cpu()
        result = obj.metrics(sums.sum(0))
        if len(self.sources) > 1:
            for s, name in enumerate(self.sources):
                if sums[s, 0] > 0:
                    m = obj.metrics(sums[s])
                    result |= {f"{name}/{k}": v for k, v in m.items()  # a source without pairs has no acc
                               if (k in ("loss", "acc", "top1") or "/" in k) and v == v}
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
        return ~torch.tensor(self.test["tie"], dtype=torch.bool) if "tie" in self.test.column_names else None


def row_sums(obj: Objective, b: dict, out: torch.Tensor, rows: int, keep: torch.Tensor) -> torch.Tensor:
    """The objective's sums (Objective.sums_width) of an eval batch of rankings, rated rows or mixed rows;
    keep (rows,) 0/1 leaves filler and other sources' rows out."""
    if obj.kind == "ranking":
        return ranking_sums(out, b["group"], b["scores"], rows, obj.ranking_loss, keep)
    if obj.kind == "regression":
        return regression_sums(out, b["targets"], obj.weights(out.device), keep)
    rewards = combine(out, torch.tensor(obj.combination))  # bt+regression: BT on the combined reward
    return torch.cat([ranking_sums(rewards, b["group"], b["scores"], rows, "pairs", keep),
                      regression_sums(out, b["targets"], obj.weights(out.device), keep[b["group"]])])


def _cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().cpu()


def as_single(row: dict) -> dict:
    """A test row with each side as it is encoded on its own (tokenize.SINGLE; [] means unchanged)."""
    out = dict(row)
    for side, name in zip(("chosen", "rejected"), SINGLE, strict=True):
        if row[name]:
            out[f"{side}_ids"], out[f"{side}_len"] = row[name], len(row[name])
    return out
