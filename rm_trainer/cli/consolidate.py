"""rm-consolidate: merge a committed ZeRO-2/3 checkpoint into a verified reward.pt (and optionally the
HF folder and, for LoRA runs, the peft adapter folder). Reads pickled DeepSpeed files: use it only on
checkpoints you trust.

    rm-consolidate --checkpoint_dir OUT/checkpoints --output reward.pt [--hf_output_dir hf] [--tag step_N]
"""

from __future__ import annotations

import argparse
import json
import sys

from rm_trainer.cli.parser import Parser, run

PROG = "rm-consolidate"


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_dir", required=True, help="OUT/checkpoints (the folder holding 'latest' and step_N/)")
    p.add_argument("--output", required=True, help="path of the reward.pt to write")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="re-score the probe batch the live engine scored, from the merged weights")
    p.add_argument("--hf_output_dir", default=None, help="also write the HF folder here (from the same tensors)")
    p.add_argument("--hf_shard_size", default="5GB", help="largest safetensors shard of the HF folder")
    p.add_argument("--lora_output_dir", default=None,
                   help="LoRA runs: also write the unmerged adapters + head here as a peft adapter folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        from rm_trainer.artifact.consolidate import consolidate

        report = consolidate(args.checkpoint_dir, args.output, args.tag, verify=args.verify,
                             hf_out=args.hf_output_dir, hf_shard_size=args.hf_shard_size,
                             lora_out=args.lora_output_dir)
        print(json.dumps(report, indent=2))
        return 0

    return run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
