"""One command-line surface for every command: readable --help (rm-train's generated from the config
models, grouped by section, with each field's type, default and description), both `--max_len` and
`--max-len` spellings, `--version`, and a did-you-mean for unknown flags."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import typing
from importlib import metadata


def version() -> str:
    try:
        return f"rm_trainer {metadata.version('rm_trainer')}"
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "rm_trainer (not installed)"


class Parser(argparse.ArgumentParser):
    """argparse for the side commands (rm-consolidate, rm-score, ...): `--a-b` and `--a_b` are the same
    flag, `--version` exists, and an unknown flag gets the closest known one as a suggestion."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version())

    def _flags(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        known = set(self._flags())
        out = []
        for tok in sys.argv[1:] if args is None else args:
            if tok.startswith("--") and tok not in known:
                name, eq, val = tok.partition("=")
                for spelled in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if spelled in known:
                        tok = spelled + eq + val
                        break
            out.append(tok)
        return super().parse_args(out, namespace)

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


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "").replace("NoneType", "None")


def train_help(prog: str = "rm-train") -> str:
    """rm-train's help, generated from RunConfig: every field of every section, its flag(s), type,
    default and description (the pydantic Field description)."""
    from rm_trainer.config import ALIASES, DRY_RUN_OPTIONS, SECTIONS, RunConfig, _field_index

    index = _field_index()
    short = {dotted: flag for flag, dotted in index.items() if "." not in flag and flag not in ALIASES}
    alias = {}
    for flag, dotted in ALIASES.items():
        alias.setdefault(dotted, flag)
    lines = [
        f"usage: {prog} --model DIR --data FILE --output_dir DIR [--config run.yaml] [options]",
        "       deepspeed launch/train_reward.py --ds_config ds_configs/zero3.json ... (torchrun, srun: the same)",
        "",
        "Train a Bradley-Terry reward model: a scalar `score` head on an SFT decoder, DeepSpeed ZeRO-2/3, one",
        "concatenated chosen+rejected forward, the reward read at the last real token. Ends with a verified",
        "OUT/reward.pt and OUT/hf. A user error exits 2 with one message; a bug keeps its traceback.",
        "",
        "Flags are --section.field, or --field where the name is unique; --max_len and --max-len are the same.",
        "A YAML/JSON --config file holds the same sections; flags override it. Every problem is listed at once.",
        "",
        "commands:",
        "  --config FILE          YAML or JSON run config (repeatable; later wins)",
        "  --dry-run              print the resolved configs and the memory estimate, start nothing",
        f"                         (with {', '.join('--' + k for k in DRY_RUN_OPTIONS)})",
        "  --prepare_only         build the tokenized-data cache and exit (rm-prepare)",
        "  --version              print the version",
        "  -h, --help             this help",
        "",
        "ds_config:",
        f"  --ds_config FILE       {RunConfig.model_fields['ds_config'].description}",
    ]
    for sec in SECTIONS:
        cls = RunConfig.model_fields[sec].annotation
        lines += ["", f"{sec}:"]
        for name, field in cls.model_fields.items():
            dotted = f"{sec}.{name}"
            flags = ([f"--{alias[dotted]}"] if dotted in alias else []) + [f"--{short.get(dotted, dotted)}"]
            default = "required" if field.is_required() else repr(field.default)
            lines.append(f"  {', '.join(flags)}  ({_type_name(field.annotation)}, default {default})")
            if field.description:
                lines.append(f"      {field.description}")
    return "\n".join(lines)
