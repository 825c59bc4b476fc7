"""One command-line surface for every command: the argparse Parser of the side commands (rm-consolidate,
rm-score, rm-serve, rm-eval, rm-export-hf), the option groups they share, and the one error wrapper.

Every command: `--max_len` and `--max-len` are the same flag; booleans are `--x` / `--no-x`; an unknown
flag gets the closest known one as a suggestion; old spellings keep working with a one-line note on
stderr; `--version` prints the version. A user error (rm_trainer.errors.UserError) prints
`rm-<command>: error: <message>` and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import typing
from collections.abc import Callable
from importlib import metadata

from rm_trainer.errors import UserError


def version() -> str:
    try:
        return f"rm_trainer {metadata.version('rm_trainer')}"
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "rm_trainer (not installed)"


def note(prog: str, message: str) -> None:
    """A one-line notice on stderr (deprecations), from rank 0 only under a launcher."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: note: {message}", file=sys.stderr, flush=True)


def run(prog: str, fn: Callable[[], int]) -> int:
    """The error wrapper of every command: UserError -> `prog: error: message`, exit 2."""
    try:
        return fn()
    except UserError as e:
        if not getattr(e, "quiet", False):  # quiet: another rank of the same run prints this message
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2


class Parser(argparse.ArgumentParser):
    """argparse with `--a-b` = `--a_b`, `--version` and a did-you-mean for unknown flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version())

    def _flags(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def _spelled(self, tok: str, known: set[str]) -> str:
        name, eq, val = tok.partition("=")
        for spelled in (name, "--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
            if spelled in known:
                return spelled + eq + val
        return tok

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        known = set(self._flags())
        argv = [self._spelled(t, known) if t.startswith("--") else t
                for t in (sys.argv[1:] if args is None else args)]
        return super().parse_args(argv, namespace)

    def error(self, message: str) -> typing.NoReturn:
        m = re.search(r"unrecognized arguments: (.*)", message)
        if m:
            hints = []
            plain = {f[2:].replace("-", "_"): f for f in self._flags()}
            for tok in m.group(1).split():
                close = difflib.get_close_matches(tok.split("=")[0][2:].replace("-", "_"), list(plain), n=1)
                if tok.startswith("--") and close:
                    hints.append(f"{tok.split('=')[0]} (did you mean {plain[close[0]]}?)")
            if hints:
                message += "; " + ", ".join(hints)
        super().error(message)


# ---------------------------------------------------------------- option groups the commands share
def add_model_options(p: Parser, batch_tokens: bool = True) -> None:
    """How a trained model is loaded and run: rm-score, rm-serve, rm-eval."""
    p.add_argument("--model", required=True, help="reward.pt or the hf/ folder of a run")
    p.add_argument("--device", default=None, help="default: this rank's GPU if there is one, else cpu")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=False,
                   help="(r - mean) / std with the held-out statistics saved with the model")
    p.add_argument("--chat_template", default=None,
                   help="Jinja file that replaces the chat template saved with the model (conversations only)")
    if batch_tokens:
        p.add_argument("--max_batch_tokens", type=int, default=16384, help="padded tokens per forward")


SHARE_MODES = ("auto", "on", "off")
SHARE_HELP = ("responses to one prompt encode it once (a responses list, rows or requests repeating a prompt): "
              "auto where a check on the model proves it exact and it costs less; on: wherever they share a "
              "prefix; off")


def add_on_error(p: Parser) -> None:
    p.add_argument("--on_error", choices=("error", "skip"), default="error",
                   help="a malformed row stops the run (naming file:line:field), or is counted and left out")


def model_options(args: argparse.Namespace):
    """The model options (artifact.load.ModelOptions) of a parsed command line."""
    from rm_trainer.artifact.load import ModelOptions

    return ModelOptions(args.model, args.device, args.normalize, args.chat_template)
