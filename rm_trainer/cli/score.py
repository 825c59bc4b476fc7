"""rm-score: score a file of texts with a trained reward model, for best-of-n, rejection sampling and data
filtering.

    rm-score --model OUT/reward.pt --data samples.jsonl --output scored.jsonl [--max_batch_tokens 16384]
    torchrun --nproc_per_node 8 -m rm_trainer.cli.score --model OUT/hf --data s.parquet --output s.scored.parquet

Rows hold `text`, or `prompt` + `response`, or `prompt` + `responses` (a list: best-of-n), or `messages`
(a conversation); the shape is decided once from the columns. Every sequence is tokenized exactly as
training did. The output has the same rows in the same order plus `reward` (or `rewards` and
`best_index`). Sharded over ranks and resumable: see rm_trainer/use/score.py.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields

from rm_trainer.cli.parser import SHARE_HELP, SHARE_MODES, Parser, add_model_options, add_on_error, model_options, run

PROG = "rm-score"


def parser() -> Parser:
    from rm_trainer.use.rows import RowKeys

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--data", required=True, help=".jsonl, .json or .parquet file of rows to score")
    p.add_argument("--output", required=True, help=".jsonl or .parquet")
    for f in fields(RowKeys):
        p.add_argument(f"--{f.name}_key", default=f.default, help=f"column of the {f.name} field")
    p.add_argument("--chunk_rows", type=int, default=2048, help="rows per resumable chunk")
    p.add_argument("--share_prompt", choices=SHARE_MODES, default="auto", help=SHARE_HELP)
    add_on_error(p)
    p.add_argument("--wait_timeout_s", type=float, default=86400, help="rank 0's wait for the other ranks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from rm_trainer.use.rows import RowKeys
        from rm_trainer.use.score import ScoreOptions
        from rm_trainer.use.score import run as score

        keys = RowKeys(**{f.name: getattr(args, f"{f.name}_key") for f in fields(RowKeys)})
        opts = ScoreOptions(args.data, args.output, keys, args.max_batch_tokens, args.chunk_rows, args.on_error,
                            args.wait_timeout_s, args.share_prompt)
        report = score(model_options(args), opts)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(report), flush=True)
        return 0

    return run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
