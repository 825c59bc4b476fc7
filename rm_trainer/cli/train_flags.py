"""rm-train's (and rm-prepare's and rm-estimate's) flags: every field of the run config, read from
YAML/JSON files and `--flag value` overrides into one validated RunConfig, with every problem reported at
once; and the --help text, generated from the same pydantic models.

Flags are `--section.field`, or `--field` where the name is unique, or one of the familiar ALIASES;
`--max_len` and `--max-len` are the same flag. Booleans are `--x` / `--no-x` (`--x false` works too, with
a note). Imports no torch: a config error costs well under a second.
"""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rm_trainer.cli.config_paths import path_problems
from rm_trainer.config import SECTIONS, RunConfig
from rm_trainer.data.read import read_text
from rm_trainer.errors import ConfigError, DataError

# Short flags users know from the seed script and from other trainers, beyond the automatic
# "unique field name" short forms (--lr, --max_len, --micro_batch_size, ...).
ALIASES = {
    "model": "model.path",
    "data": "data.train_path",
    "train_data": "data.train_path",
    "test_data": "data.test_path",
    "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "learning_rate": "train.lr",
    "deepspeed_config": "ds_config",
}
# Flags consumed by launchers rather than by the config.
LAUNCHER_FLAGS = {"local_rank", "local-rank"}
BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}
# Options of the memory report (--dry-run, rm-estimate), not of the run itself: name -> type.
REPORT_OPTIONS = {"gpu_memory_gb": float, "world_size": int, "gpus_per_node": int}


def field_index() -> dict[str, str]:
    """Map every accepted flag name (without --, underscored) to its dotted config path."""
    index: dict[str, str] = {"ds_config": "ds_config"}
    seen: dict[str, list[str]] = {}
    for sec in SECTIONS:
        for name in RunConfig.model_fields[sec].annotation.model_fields:
            index[f"{sec}.{name}"] = f"{sec}.{name}"
            seen.setdefault(name, []).append(sec)
    for name, secs in seen.items():
        if len(secs) == 1:
            index.setdefault(name, f"{secs[0]}.{name}")
    index.update(ALIASES)
    return index


def _annotation(dotted: str):
    """The type of a `section.field`; None for anything else."""
    sec, _, name = dotted.partition(".")
    field = RunConfig.model_fields[sec].annotation.model_fields.get(name) if name else None
    return field.annotation if field is not None else None


def is_bool_field(dotted: str) -> bool:
    return _annotation(dotted) is bool


def is_switch(dotted: str) -> bool:
    """An auto/on/off field (config.switch): `--x` is on, `--no-x` off, `--x auto` auto."""
    return {"auto", "on", "off"} <= set(typing.get_args(_annotation(dotted)))


def takes_no(dotted: str) -> bool:
    """Whether `--no-x` exists for the field: booleans and switches."""
    return is_bool_field(dotted) or is_switch(dotted)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{'.'.join(parts[:-1])} is not a section")
        tree = node
    tree[parts[-1]] = value


def _is_sequence(dotted: str) -> bool:
    """A list or tuple field (also `list[...] | None`)."""
    ann = _annotation(dotted)
    return any(typing.get_origin(k) in (list, tuple) for k in [ann, *typing.get_args(ann)])


def _parse_value(dotted: str, raw: str) -> Any:
    # Tuples/lists come as JSON ("[0.9, 0.95]") or comma lists; everything else stays a string and
    # pydantic coerces it ("1e-5" -> float, "8" -> int, "true" -> bool).
    if _is_sequence(dotted):
        raw = raw.strip()
        return json.loads(raw) if raw.startswith("[") else [s.strip() for s in raw.split(",") if s.strip()]
    return raw


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_config_file(path: str) -> dict:
    p = Path(path)
    try:
        text = read_text(path, "--config")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except DataError as e:
        raise ConfigError([str(e)]) from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError([f"--config {path}: cannot parse: {e}"]) from None
    except RecursionError:
        raise ConfigError([f"--config {path}: cannot parse: nested too deeply"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path}: top level must be a mapping of sections"])
    return data


class _Argv:
    """rm-train's argv, read left to right: config files, overrides, the run's mode flags."""

    def __init__(self, argv: list[str]):
        self.argv, self.i = argv, 0
        self.index = field_index()
        self.overrides: dict = {}
        self.problems: list[str] = []
        self.flags: dict[str, Any] = {}
        self.notes: list[str] = []

    def value(self, eq: str, val: str) -> str | None:
        """The flag's value: after '=' or the next token."""
        if eq:
            return val
        if self.i < len(self.argv):
            self.i += 1
            return self.argv[self.i - 1]
        return None

    def skip_value(self, eq: str) -> None:
        if not eq and self.i < len(self.argv) and not self.argv[self.i].startswith("--"):
            self.i += 1

    def mode_flag(self, key: str, eq: str, val: str) -> bool:
        """--config, --dry-run, --prepare_only, launcher and report flags; False if `key` is none of them."""
        plain = key.replace("-", "_")
        if key in LAUNCHER_FLAGS:  # deepspeed passes --local_rank=N; LOCAL_RANK env says the same
            self.skip_value(eq)
        elif plain in ("prepare_only", "dry_run"):
            self.flags[plain] = True
        elif plain == "config":
            path = self.value(eq, val)
            if path is None:
                self.problems.append("--config needs a file path")
            else:
                self.overrides.setdefault("__config_files__", []).append(path)
        elif plain in REPORT_OPTIONS:
            raw = self.value(eq, val) or ""
            try:
                self.flags[plain] = REPORT_OPTIONS[plain](raw)
            except ValueError:
                self.problems.append(f"--{key} needs a {REPORT_OPTIONS[plain].__name__}, got {raw!r}")
        else:
            return False
        return True

    def resolve(self, key: str) -> tuple[str | None, bool]:
        """(dotted field, negated) of a flag name: `--no-x` is x=false for a boolean field."""
        plain = key.replace("-", "_")
        negated = plain.startswith("no_") and takes_no(self.index.get(plain[3:], ""))
        return self.index.get(plain[3:] if negated else plain), negated

    def override(self, key: str, eq: str, val: str) -> None:
        dotted, negated = self.resolve(key)
        if dotted is None:
            hint = difflib.get_close_matches(key.replace("-", "_"), list(self.index) + list(REPORT_OPTIONS), n=1)
            self.problems.append(f"unknown option --{key}" + (f" (did you mean --{hint[0]}?)" if hint else ""))
            self.skip_value(eq)
            return
        if negated:
            _set_dotted(self.overrides, dotted, "false")
            return
        if not eq:
            nxt = self.argv[self.i] if self.i < len(self.argv) else None
            words = BOOL_WORDS | ({"auto"} if is_switch(dotted) else set())
            if takes_no(dotted) and (nxt is None or nxt.startswith("--") or nxt.lower() not in words):
                _set_dotted(self.overrides, dotted, "true")  # bare boolean flag (a switch: on)
                return
            if nxt is None or (nxt.startswith("--") and not _looks_numeric(nxt)):
                self.problems.append(f"--{key} needs a value")
                return
            val, self.i = nxt, self.i + 1
        if is_bool_field(dotted) or (is_switch(dotted) and val.lower() in BOOL_WORDS - {"on", "off"}):
            flag = dotted.split(".")[-1]
            self.notes.append(f"--{key} {val} is deprecated; use --{flag} or --no-{flag}")
        _set_dotted(self.overrides, dotted, _parse_value(dotted, val))

    def parse(self) -> None:
        while self.i < len(self.argv):
            tok = self.argv[self.i]
            self.i += 1
            if not tok.startswith("--"):
                self.problems.append(f"unexpected argument {tok!r}: options look like --train.lr 1e-5")
                continue
            key, eq, val = tok[2:].partition("=")
            if not self.mode_flag(key, eq, val):
                self.override(key, eq, val)


def parse_cli(argv: list[str]) -> tuple[dict, list[str], dict[str, Any]]:
    """Parse ``--key value`` overrides into a nested dict.

    Returns (overrides, problems, extra flags: dry_run, prepare_only, the report options, and `notes`
    (deprecation notices) when there are any). Unknown flags are problems with a did-you-mean hint,
    collected rather than raised so the user sees all of them at once.
    """
    p = _Argv(argv)
    p.parse()
    if p.notes:
        p.flags["notes"] = list(dict.fromkeys(p.notes))
    return p.overrides, p.problems, p.flags


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pydantic_problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if e["type"] == "value_error" and not loc:
            problems.extend(m.strip() for m in msg.split(";"))
            continue
        got = e.get("input")
        shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        problems.append(f"{loc}: {msg}{shown}")
    return problems


def load_run_config(argv: list[str], model_only: bool = False) -> tuple[RunConfig, dict[str, Any]]:
    """Config file(s) < CLI overrides. Raises ConfigError listing every problem found. model_only: the
    data and the output folder are not required (rm-estimate)."""
    overrides, problems, flags = parse_cli(argv)
    notes = flags.pop("notes", [])
    tree: dict = {}
    for path in overrides.pop("__config_files__", []):
        try:
            tree = _merge(tree, load_config_file(path))
        except ConfigError as e:
            problems.extend(e.problems)
    tree = _merge(tree, overrides)
    problems += path_problems(tree, model_only)
    try:
        cfg = RunConfig.model_validate(tree, context={"model_only": model_only})
    except ValidationError as e:
        raise ConfigError(problems + _pydantic_problems(e)) from None
    if problems:
        raise ConfigError(problems)
    if notes:
        flags["notes"] = list(dict.fromkeys(notes))
    return cfg, flags


def type_name(annotation) -> str:
    import typing

    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "").replace("NoneType", "None")


def field_flags(dotted: str, index: dict[str, str] | None = None) -> list[str]:
    """The spellings of one field's flag that help shows: an alias, the short or dotted form, and
    `--no-x` for a boolean."""
    index = index or field_index()
    alias = next((f for f, d in ALIASES.items() if d == dotted), None)
    short = next((f for f, d in index.items() if d == dotted and "." not in f and f not in ALIASES), dotted)
    flags = ([f"--{alias}"] if alias else []) + [f"--{short}"]
    return flags + ([f"--no-{short}"] if takes_no(dotted) else [])


def train_help(prog: str = "rm-train", model_only: bool = False) -> str:
    """rm-train's help, generated from RunConfig: every field of every section, its flag(s), type,
    default and description (the pydantic Field description)."""
    index = field_index()
    what = ("Estimate per-GPU memory for a run config: parameters (LoRA counted), model states from "
            "DeepSpeed's own formulas, activations of the 2B forward. Starts nothing, reads no weights."
            if model_only else
            "Train a Bradley-Terry reward model: a scalar `score` head on an SFT decoder, DeepSpeed ZeRO-2/3, "
            "one concatenated chosen+rejected forward, the reward read at the last real token. Ends with a "
            "verified OUT/reward.pt and OUT/hf.")
    lines = [
        f"usage: {prog} --model DIR " + ("[--config run.yaml] [options]" if model_only else
                                         "--data FILE --output_dir DIR [--config run.yaml] [options]"),
        "" if model_only else "       deepspeed launch/train_reward.py --ds_config ds_configs/zero3.json ... "
                              "(torchrun, srun: the same)",
        "", what, "A user error exits 2 with one message; a bug keeps its traceback.", "",
        "Flags are --section.field, or --field where the name is unique; --max_len and --max-len are the same;",
        "booleans are --x / --no-x. A YAML/JSON --config file holds the same sections; flags override it.",
        "Every problem is listed at once.", "",
        "commands:",
        "  --config FILE          YAML or JSON run config (repeatable; later wins)",
    ]
    if not model_only:
        lines += ["  --dry-run              print the resolved configs and the memory estimate, start nothing",
                  "  --prepare_only         build the tokenized-data cache and exit (rm-prepare)"]
    lines += [f"  {', '.join('--' + k for k in REPORT_OPTIONS)}   the memory report's cluster and GPU size",
              "  --version              print the version", "  -h, --help             this help", "",
              "ds_config:", f"  --ds_config FILE       {RunConfig.model_fields['ds_config'].description}"]
    for sec in SECTIONS:
        lines += ["", f"{sec}:"]
        for name, field in RunConfig.model_fields[sec].annotation.model_fields.items():
            default = "required" if field.is_required() else repr(field.default)
            lines.append(f"  {', '.join(field_flags(f'{sec}.{name}', index))}  "
                         f"({type_name(field.annotation)}, default {default})")
            if field.description:
                lines.append(f"      {field.description}")
    return "\n".join(lines)
