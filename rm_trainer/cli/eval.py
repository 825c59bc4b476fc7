"""rm-eval: evaluate a reward model on preference files, RewardBench v1/v2 among them, with diagnostics.

    rm-eval --model OUT/reward.pt --data reward-bench.parquet [more files] [--output_dir OUT/eval/NAME]

Pair files are read as training reads them (the same shapes, column-key flags and --chat_template);
RewardBench 2 files (list-valued chosen/rejected) are scored one chosen against all its rejected. Writes
metrics.json, report.md, scores.jsonl and the pictures (rm_trainer/eval/files.py, report.py). An attribute
head (--objective regression) is scored on pairs by its combined reward; its rating files ({prompt, response,
<attribute>: number}) give each attribute's RMSE and Pearson r in attributes.json and attribute_scores.jsonl
(rm_trainer/eval/ratings.py). Ranking files (K responses per prompt with scores or ranks, or UltraFeedback
rows) give the pairwise accuracy over all ordered pairs and the top-1 rate in rankings.json and
ranking_scores.jsonl (rm_trainer/eval/rankings.py), each response scored once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rm_trainer.cli.parser import Parser, add_model_options, add_on_error, model_options, run

PROG = "rm-eval"


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--data", required=True, nargs="+", help="preference files (.jsonl, .json, .parquet, ...)")
    p.add_argument("--output_dir", default=None,
                   help="default: eval/<first data file's name>/ beside the model (the run's own eval/ report "
                        "of its held-out set stays)")
    p.add_argument("--format", choices=("auto", "hh", "prompt", "conversational"), default="auto",
                   help="the pair files' shape (auto: decided from each file's first row)")
    for name in ("prompt", "chosen", "rejected"):
        p.add_argument(f"--{name}_key", default=name, help=f"column of the {name} field in pair files")
    p.add_argument("--response_key", default="response",
                   help="an attribute head's rating files: column of the rated response (each attribute is the "
                        "column of its name); their RMSE and Pearson r per attribute are reported")
    p.add_argument("--ranking_score", default="overall_score",
                   help="UltraFeedback ranking files: which score of each completion rates it (overall_score, "
                        "fine-grained_score)")
    p.add_argument("--tie_key", default=None,
                   help="column marking tied pairs (true, or a strength of 0): left out of the accuracy and "
                        "reported apart, as their mean |r_1 - r_2|")
    p.add_argument("--padding_side", choices=("right", "left"), default="right",
                   help="how batches are padded (the results do not depend on it)")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="render RewardBench's plain prompts with the chat template (auto: if the tokenizer has one)")
    p.add_argument("--truncation", choices=("single", "pair"), default="single",
                   help="single: each response scored on its own, the reward rm-score, rm-serve and score_texts "
                        "give; pair: as the training loss saw each pair (one prompt cut for both sides), with "
                        "training's drops; the run's own eval/* metrics use it")
    add_on_error(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from rm_trainer.eval.files import EvalOptions, evaluate, write
        from rm_trainer.objectives.pair_rows import PairKeys

        name = Path(args.data[0]).name.split(".")[0] or "data"
        out = Path(args.output_dir or Path(args.model).resolve().parent / "eval" / name)
        opts = EvalOptions(PairKeys(args.prompt_key, args.chosen_key, args.rejected_key, tie=args.tie_key),
                           args.format, args.chat,
                           args.on_error, args.max_batch_tokens, args.padding_side, args.truncation)
        model = model_options(args).load()
        ranked, rest = split_ranked(args)
        rated, pairs = split_rated(model, args, rest)
        summary = {}
        if rated:  # an attribute head's rating files: per-attribute RMSE and Pearson r
            summary = write_ratings(out, model, rated, args)
        if ranked:  # K-wise rankings: pairwise accuracy over all ordered pairs, top-1
            summary |= write_rankings(out, model, ranked, args)
        if pairs or not (rated or ranked):  # pairs (and RewardBench): the accuracy of the (combined) reward
            result, rows, r_c, r_r = evaluate(model, pairs, opts)
            result["model"] = str(args.model)
            summary |= write(out, result, rows, r_c, r_r)
        print(json.dumps(summary), flush=True)
        return 0

    return run(PROG, go)


def split_ranked(args) -> tuple[list, list[str]]:
    """(ranking files [(path, rows, layout, refused)], the other files)."""
    from rm_trainer.eval.rankings import ranked_rows
    from rm_trainer.objectives.ranking_rows import RankingKeys

    keys = RankingKeys(prompt=args.prompt_key, uf_score=args.ranking_score)
    ranked, rest = [], []
    for path in args.data:
        got = ranked_rows(path, keys, args.on_error)
        (ranked.append((path, *got)) if got is not None else rest.append(path))
    return ranked, rest


def split_rated(model, args, paths: list[str]) -> tuple[list, list[str]]:
    """(rating files [(path, rows, refused)], the other files): rating files only for an attribute head."""
    if not model.attributes:
        return [], paths
    from rm_trainer.eval.ratings import rated_rows
    from rm_trainer.objectives.rating_rows import RatingKeys

    keys = RatingKeys(tuple(model.attributes), args.prompt_key, args.response_key, mask_missing=True)
    rated, pairs = [], []
    for path in paths:
        got = rated_rows(path, keys, args.on_error)
        (rated.append((path, *got)) if got is not None else pairs.append(path))
    return rated, pairs


def write_ratings(out: Path, model, rated: list, args) -> dict:
    """attributes.json and attribute_scores.jsonl into `out`; the summary line's part."""
    from rm_trainer.eval.ratings import evaluate_ratings
    from rm_trainer.objectives.rating_rows import RatingKeys

    keys = RatingKeys(tuple(model.attributes), args.prompt_key, args.response_key, mask_missing=True)
    result, rows = evaluate_ratings(model, rated, keys, args.on_error, args.max_batch_tokens, args.padding_side)
    _write(out, "attributes.json", "attribute_scores.jsonl", result | {"model": str(args.model)}, rows)
    return {"rated_rows": result["rows"], "attributes": result["attributes"], "rated_dropped": result["dropped"]}


def write_rankings(out: Path, model, ranked: list, args) -> dict:
    """rankings.json and ranking_scores.jsonl into `out`; the summary line's part."""
    from rm_trainer.eval.rankings import evaluate_rankings
    from rm_trainer.objectives.ranking_rows import RankingKeys

    keys = RankingKeys(prompt=args.prompt_key, uf_score=args.ranking_score)
    result, rows = evaluate_rankings(model, ranked, keys, args.on_error, args.max_batch_tokens, args.padding_side,
                                     args.truncation)
    _write(out, "rankings.json", "ranking_scores.jsonl", result | {"model": str(args.model)}, rows)
    return {"rankings": {k: result[k] for k in ("prompts", "pairs", "acc", "top1")},
            "ranking_dropped": result["dropped"]}


def _write(out: Path, summary: str, scores: str, result: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / summary).write_text(json.dumps(result, indent=1) + "\n")
    with open(out / scores, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
