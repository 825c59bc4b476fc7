"""rm-export-hf: write a reward.pt as a folder that plain transformers loads with
AutoModelForSequenceClassification (safetensors, sharded above --hf_shard_size, with the tokenizer and a
model card).

    rm-export-hf --model OUT/reward.pt --output_dir OUT/hf [--hf_shard_size 5GB]
"""

from __future__ import annotations

import sys

from rm_trainer.cli.parser import Parser, run

PROG = "rm-export-hf"


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the reward.pt to export")
    p.add_argument("--output_dir", required=True, help="the HF folder to write")
    p.add_argument("--hf_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from rm_trainer.artifact.hf_export import export_hf

        print(export_hf(args.model, args.output_dir, args.hf_shard_size))
        return 0

    return run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
