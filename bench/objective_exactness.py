#!/usr/bin/env python
"""How exact the fused objectives are, in one run (JSON out): each fused loss (closed-form backward, what
training runs) against a float64 autograd reference written from the definition, on the same inputs.

For every objective, `--batches` random batches in fp32 and in bf16 (the rewards rounded to bf16 first;
the loss is fp32 either way, the gradient is returned in the rewards' dtype):
  ranking pairs / Plackett-Luce: 8 prompts of 2-7 responses with tied scores, rewards ~ N(0, 3^2);
  regression: 16 rows x 5 attributes, 20% missing, per-attribute weights;
  BT with soft ties, and the Davidson model with its learned nu: 16 pairs, a quarter tied.
Reported per objective and dtype: the largest loss error relative to the reference loss, and the largest
gradient error relative to the largest reference gradient of that batch (bf16 gradients are rounded to
bf16 on return, so their error is about one bf16 rounding, 2^-8).

    python bench/objective_exactness.py --output bench/results/cpu_objective_exactness.json
"""

from __future__ import annotations

import argparse

import torch
from common import add_output, finish

from rm_trainer.objectives.bt_loss import davidson_nll, fused_bradley_terry, soft_tie_loss
from rm_trainer.objectives.ranking_loss import fused_ranking_loss
from rm_trainer.objectives.regression_loss import fused_regression_loss


def ranking_batch(g: torch.Generator):
    sizes = torch.randint(2, 8, (8,), generator=g)
    group = torch.repeat_interleave(torch.arange(8), sizes)
    scores = torch.randint(0, 3, (len(group),), generator=g).float()
    return torch.randn(len(group), generator=g, dtype=torch.float64) * 3, group, scores


def pair_terms_ref(r, group, scores):
    d = r[:, None] - r[None, :]
    w = (group[:, None] == group[None, :]) & (scores[:, None] > scores[None, :])
    per_prompt = torch.zeros(8, dtype=r.dtype).index_add(0, group, (w * torch.nn.functional.softplus(-d)).sum(1))
    n = torch.zeros(8, dtype=r.dtype).index_add(0, group, w.sum(1).to(r.dtype))
    return (per_prompt / n.clamp(min=1)).mean()


def plackett_luce_ref(r, group, scores):
    total = r.new_zeros(())
    for p in range(8):
        rp, sp = r[group == p], scores[group == p]
        for i in range(len(rp)):  # each response above the prompt's lowest level, against all at or below it
            if (sp < sp[i]).any():
                total = total + torch.logsumexp(rp[sp <= sp[i]], 0) - rp[i]
    return total / 8


def ranking(kind: str):
    def case(g, dtype):
        r, group, scores = ranking_batch(g)
        ref = pair_terms_ref if kind == "pairs" else plackett_luce_ref
        return (r,), (lambda x: fused_ranking_loss(x, group, scores, 8, kind)), (lambda x: ref(x, group, scores))
    return case


def regression(g, dtype):
    preds = torch.randn(16, 5, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, 5, (16, 5), generator=g).double()
    targets[torch.rand(16, 5, generator=g) < 0.2] = float("nan")
    weights = torch.rand(5, generator=g, dtype=torch.float64) + 0.5

    def ref(p):
        m = torch.isfinite(targets)
        return (weights * torch.where(m, p - targets.nan_to_num(), 0.0) ** 2).sum(1).mean()
    return (preds,), (lambda p: fused_regression_loss(p, targets.float(), None, weights.float())), ref


def soft_ties(g, dtype):
    r = torch.randn(32, generator=g, dtype=torch.float64) * 3
    tie = torch.rand(16, generator=g) < 0.25

    def ref(x):
        d = x[:16] - x[16:]
        return torch.where(tie, soft_tie_loss(d), torch.nn.functional.softplus(-d)).mean()
    return (r,), (lambda x: fused_bradley_terry(x, tie=tie)[0]), ref


def davidson(g, dtype):
    r = torch.randn(32, generator=g, dtype=torch.float64) * 3
    tie = torch.rand(16, generator=g) < 0.25
    log_nu = torch.randn((), generator=g, dtype=torch.float64) * 0.5
    return ((r, log_nu), (lambda x, t: fused_bradley_terry(x, tie=tie, log_nu=t)[0]),
            (lambda x, t: davidson_nll(x[:16] - x[16:], t, tie).mean()))


CASES = {"ranking_pairs": ranking("pairs"), "plackett_luce": ranking("plackett_luce"), "regression": regression,
         "soft_ties": soft_ties, "davidson": davidson}


def errors(case, g, dtype) -> tuple[float, float]:
    inputs, fused, ref = case(g, dtype)
    low = [x.to(dtype).requires_grad_() for x in inputs]  # what training hands the loss
    wide = [x.detach().double().requires_grad_() for x in low]  # the same values, in float64
    got, want = fused(*low), ref(*wide)
    got.backward()
    want.backward()
    loss_err = abs(float(got) - float(want)) / max(abs(float(want)), 1e-30)
    scale = max(float(w.grad.abs().max()) for w in wide)
    grad_err = max(float((x.grad.double() - w.grad).abs().max()) for x, w in zip(low, wide, strict=True)) / scale
    return loss_err, grad_err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    add_output(ap)
    a = ap.parse_args()
    result = {"batches": a.batches, "reference": "float64 autograd of the definition", "objectives": {}}
    for name, case in CASES.items():
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(a.seed)
            errs = [errors(case, g, dtype) for _ in range(a.batches)]
            result["objectives"].setdefault(name, {})[str(dtype).removeprefix("torch.")] = {
                "max_loss_rel_err": max(e[0] for e in errs), "max_grad_rel_err": max(e[1] for e in errs)}
    finish(result, a.output)


if __name__ == "__main__":
    main()
