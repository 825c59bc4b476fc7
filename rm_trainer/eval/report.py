"""OUT/eval/: metrics.json, report.md (per-subset table with the "prefer the longer" baseline beside each
subset, RewardBench sections, diagnostics) and three pictures (matplotlib, imported here only): chosen vs
rejected reward histograms, the calibration curve, accuracy by length-gap bucket. Written by rm-eval and
at the end of training (held-out set)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _f(x, pct: bool = False, nd: int = 3) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.{nd}f}"


def markdown(result: dict, pictures: bool) -> str:
    d = result["diagnostics"]
    lines = [f"# Reward model evaluation: {result.get('model', '')}", "",
             f"{d['pairs']} pairs from {', '.join(result.get('files', [])) or 'the held-out set'}. "
             f"Accuracy **{100 * d['acc']:.2f}%**; a model that always prefers the longer response would get "
             f"{100 * d['prefer_longer_acc']:.2f}%.", ""]
    if result.get("dropped"):
        lines += [f"Left out (by reason): {json.dumps(result['dropped'])}", ""]
    ties = result.get("ties")
    if ties:  # --tie_key: tied pairs are outside the accuracy
        lines += [f"Tied pairs (not in the accuracy): {ties['pairs']}, mean |r_1 - r_2| {_f(ties['tie_gap'])} "
                  f"(median {_f(ties['tie_gap_median'])})" + (
                      f"; Davidson nu {_f(ties['nu'])}, mean P(tie) {_f(ties['p_tie_on_tied'])} on them, "
                      f"{_f(ties['p_tie_on_strict'])} on strict pairs" if "nu" in ties else "") + ".", ""]
    rb = result.get("rewardbench")
    if rb:
        lines += ["## RewardBench (v1 section weighting)", "", "| section | score |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in rb["sections"].items()]
        lines += [f"| **Score** | **{rb['score']:.2f}** |", ""]
    rb2 = result.get("rewardbench2")
    if rb2:
        lines += ["## RewardBench 2", "", "| subset | prompts | score |", "|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {100 * v['score']:.2f} |" for k, v in rb2["subsets"].items()]
        lines += [f"| **Score** | | **{rb2['score']:.2f}** |", ""]
    if d.get("groups"):
        lines += ["## Per subset / source", "", "| subset | pairs | accuracy % | prefer-longer % | mean margin |",
                  "|---|---|---|---|---|"]
        lines += [f"| {g} | {v['n']} | {_f(v['acc'], True)} | {_f(v['prefer_longer_acc'], True)} | {_f(v['margin'])} |"
                  for g, v in d["groups"].items()]
        lines.append("")
    m = d["margin"]
    lines += ["## Diagnostics", "",
              f"- correlation of reward gap with length gap (Pearson): {_f(d['length_corr'])}",
              f"- calibration: ECE of sigmoid(r_c - r_r) = {_f(d['ece'], nd=4)} ({len(d['calibration'])} bins)",
              f"- margin r_c - r_r: mean {_f(m['mean'])}, std {_f(m['std'])}, p5 {_f(m['p5'])}, p50 {_f(m['p50'])}, "
              f"p95 {_f(m['p95'])}; negative for {100 * m['frac_negative']:.1f}% of pairs", "",
              "| length gap | pairs | accuracy % | prefer-longer % |", "|---|---|---|---|"]
    lines += [f"| {b['bucket']} | {b['n']} | {_f(b['acc'], True)} | {_f(b['prefer_longer_acc'], True)} |"
              for b in d["length_buckets"]]
    if pictures:
        lines += ["", "![chosen vs rejected rewards](rewards.png)", "![calibration](calibration.png)",
                  "![accuracy by length gap](length_gap.png)"]
    return "\n".join(lines) + "\n"


def plots(out: Path, d: dict, r_c: torch.Tensor, r_r: torch.Tensor) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    lo, hi = float(min(r_c.min(), r_r.min())), float(max(r_c.max(), r_r.max()))
    bins = torch.linspace(lo, hi + 1e-6, 41).tolist()
    ax.hist(r_c.tolist(), bins=bins, alpha=0.6, label=f"chosen (mean {d['reward']['chosen_mean']:.2f})",
            color="tab:green")
    ax.hist(r_r.tolist(), bins=bins, alpha=0.6, label=f"rejected (mean {d['reward']['rejected_mean']:.2f})",
            color="tab:red")
    ax.set(xlabel="reward", ylabel="responses", title=f"Rewards of {d['pairs']} pairs (accuracy {100 * d['acc']:.1f}%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    cal = d["calibration"]
    ax.plot([0.5, 1], [0.5, 1], "--", color="grey", label="perfectly calibrated")
    ax.plot([b["confidence"] for b in cal], [b["accuracy"] for b in cal], "o-", label="this model")
    for b in cal:
        ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.set(xlim=(0.48, 1.02), ylim=(0, 1.02), xlabel="predicted P(preferred side wins) = max(σ(Δ), 1-σ(Δ))",
           ylabel="observed accuracy", title=f"Calibration (ECE {d['ece']:.3f}; labels: pairs per bin)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4))
    bk = d["length_buckets"]
    x = range(len(bk))
    ax.bar([i - 0.2 for i in x], [100 * (b["acc"] or 0) for b in bk], width=0.4, label="reward model")
    ax.bar([i + 0.2 for i in x], [100 * (b["prefer_longer_acc"] or 0) for b in bk], width=0.4,
           label="prefer the longer", color="tab:grey")
    ax.set_xticks(list(x), [f"{b['bucket'].replace('chosen ', '')}\n(n={b['n']})" for b in bk], fontsize=8)
    ax.set(ylabel="accuracy %", ylim=(0, 105), xlabel="chosen response length vs rejected",
           title="Accuracy by length gap")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "length_gap.png", dpi=110)
    plt.close(fig)
    return True


def write(out: Path, result: dict, r_c: torch.Tensor, r_r: torch.Tensor) -> dict:
    """metrics.json, report.md and (with matplotlib) the PNGs into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = plots(out, result["diagnostics"], r_c, r_r)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(markdown(result, pictures))
    return {"report": str(out / "report.md"), "pictures": pictures}


def log_histograms(tb, step: int, r_c: torch.Tensor, r_r: torch.Tensor) -> None:
    """Reward histograms at an evaluation (tensorboard's Histograms tab)."""
    tb.add_histogram("eval/reward_chosen", r_c, step)
    tb.add_histogram("eval/reward_rejected", r_r, step)
    tb.add_histogram("eval/margin", r_c - r_r, step)
