"""What a reward model's accuracy hides, computed from per-pair rewards and lengths: how much the reward
gap follows the length gap, accuracy by length-gap bucket against a "prefer the longer" baseline,
calibration (ECE of sigmoid(r_c - r_r)), the margin distribution, and accuracy per group (source or
subset). Used by rm-eval and at every evaluation during training (tensorboard).

Lengths are response tokens: each sequence's tokens after the prefix it shares with the other side (the
prompt, plus any common start of the two responses).
"""

from __future__ import annotations

import numpy as np
import torch

# (label, lower, upper] on the relative length gap (len_c - len_r) / max(len_c, len_r)
BUCKETS = (("chosen shorter by >25%", -1.01, -0.25), ("chosen shorter by 5-25%", -0.25, -0.05),
           ("within 5%", -0.05, 0.05), ("chosen longer by 5-25%", 0.05, 0.25),
           ("chosen longer by >25%", 0.25, 1.0))
CALIBRATION_BINS = 10
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def response_lengths(chosen, rejected) -> tuple[int, int]:
    """Tokens of each side after the prefix the two share (token-id sequences)."""
    c, r = np.asarray(chosen), np.asarray(rejected)
    m = min(len(c), len(r))
    diff = np.flatnonzero(c[:m] != r[:m])
    k = int(diff[0]) if len(diff) else m
    return len(c) - k, len(r) - k


def correct(delta: torch.Tensor) -> torch.Tensor:
    """1 where chosen wins, 0 where it loses, 0.5 on an exact tie (a coin flip's expectation)."""
    return (delta > 0).double() + 0.5 * (delta == 0).double()


def prefer_longer(len_c: torch.Tensor, len_r: torch.Tensor) -> torch.Tensor:
    return correct((len_c - len_r).double())


def calibration(delta: torch.Tensor, bins: int = CALIBRATION_BINS) -> tuple[float, list[dict]]:
    """ECE of p = sigmoid(delta) for "chosen wins". Each pair counts in both orders, so the confidence is
    max(p, 1 - p) in [0.5, 1] and the outcome is whether that more likely side is the chosen one."""
    p = torch.sigmoid(delta.double())
    conf = torch.maximum(p, 1 - p)
    hit = correct(delta)
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    ece, table = 0.0, []
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        m = (conf >= lo) & ((conf < hi) if b < bins - 1 else (conf <= hi))
        n = int(m.sum())
        if n:
            c, a = float(conf[m].mean()), float(hit[m].mean())
            ece += n / len(delta) * abs(a - c)
            table.append({"lo": float(lo), "hi": float(hi), "n": n, "confidence": c, "accuracy": a})
    return ece, table


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float((x.square().sum() * y.square().sum()).sqrt())
    return float((x * y).sum()) / den if len(x) > 2 and den > 0 else None


def diagnose(r_c: torch.Tensor, r_r: torch.Tensor, len_c: torch.Tensor, len_r: torch.Tensor,
             groups: list[str] | None = None) -> dict:
    """Every diagnostic for N pairs (1-D tensors; groups: a source or subset name per pair)."""
    delta = r_c.double() - r_r.double()
    lc, lr = len_c.double(), len_r.double()
    hit, longer = correct(delta), prefer_longer(lc, lr)
    rel = (lc - lr) / torch.maximum(torch.maximum(lc, lr), torch.ones_like(lc))
    buckets = []
    for label, lo, hi in BUCKETS:
        m = (rel > lo) & (rel <= hi)
        n = int(m.sum())
        buckets.append({"bucket": label, "n": n, "acc": float(hit[m].mean()) if n else None,
                        "prefer_longer_acc": float(longer[m].mean()) if n else None})
    ece, bins = calibration(delta)
    q = torch.quantile(delta, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    out = {
        "pairs": len(delta), "acc": float(hit.mean()), "prefer_longer_acc": float(longer.mean()),
        "length_corr": pearson(delta, lc - lr), "ece": ece, "calibration": bins, "length_buckets": buckets,
        "margin": {"mean": float(delta.mean()), "std": float(delta.std()) if len(delta) > 1 else 0.0,
                   **{f"p{int(100 * k)}": v for k, v in zip(QUANTILES, q, strict=True)},
                   "frac_negative": float((delta < 0).double().mean())},
        "reward": {"chosen_mean": float(r_c.double().mean()), "rejected_mean": float(r_r.double().mean())},
    }
    if groups is not None:
        per = {}
        for g in sorted(set(groups)):
            m = torch.tensor([x == g for x in groups])
            per[g] = {"n": int(m.sum()), "acc": float(hit[m].mean()), "prefer_longer_acc": float(longer[m].mean()),
                      "margin": float(delta[m].mean())}
        out["groups"] = per
    return out


def scalars(d: dict) -> dict[str, float]:
    """The one-number diagnostics, for the metrics log and tensorboard."""
    out = {"prefer_longer_acc": d["prefer_longer_acc"], "ece": d["ece"], "margin_p50": d["margin"]["p50"],
           "frac_negative_margin": d["margin"]["frac_negative"]}
    if d["length_corr"] is not None:
        out["length_corr"] = d["length_corr"]
    for b in d["length_buckets"]:
        if b["acc"] is not None:
            out["acc_by_length_gap/" + b["bucket"].replace(" ", "_").replace(">", "gt").replace("%", "pct")] = b["acc"]
    return out
