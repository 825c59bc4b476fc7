"""rm-prepare: build the tokenized-data cache of a run config in one process (a CPU node), ahead of the
GPU job that will load it. Takes the same flags as rm-train (= rm-train --prepare_only)."""

from __future__ import annotations

import sys

from rm_trainer.cli.train import main as train_main

PROG = "rm-prepare"


def main(argv: list[str] | None = None) -> int:
    return train_main(["--prepare_only", *(sys.argv[1:] if argv is None else argv)], prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
