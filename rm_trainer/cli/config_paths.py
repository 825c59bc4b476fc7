"""File checks of a run config, on the raw (merged) tree of config files and flags: run before pydantic
validation, so a missing file is reported beside every field error, and before anything reads or hashes
a file."""

from __future__ import annotations

from pathlib import Path

from rm_trainer.data.formats import looks_like_hub_name
from rm_trainer.data.read import check_file
from rm_trainer.errors import DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _get(tree: dict, sec: str, name: str) -> str | None:
    node = tree.get(sec)
    v = node.get(name) if isinstance(node, dict) else None
    return str(v) if v not in (None, "") else None


def _model_problems(tree: dict, model_only: bool) -> list[str]:
    problems = []
    path = _get(tree, "model", "path")
    if path and path.endswith(".pt"):
        if not Path(path).is_file():
            problems.append(f"model.path {path!r}: file not found (a reward.pt to continue from)")
    elif path and not Path(path).is_dir():
        problems.append(f"model.path {path!r}: not a folder (expected an HF save_pretrained folder)")
    elif path and not (Path(path) / "config.json").is_file():
        problems.append(f"model.path {path!r}: has no config.json")
    tok = _get(tree, "model", "tokenizer") or path
    if tok and not model_only and Path(tok).is_dir() and not any((Path(tok) / f).exists() for f in TOKENIZER_FILES):
        problems.append(f"tokenizer folder {tok!r} has none of {', '.join(TOKENIZER_FILES)}")
    return problems


def path_problems(tree: dict, model_only: bool = False) -> list[str]:
    """File checks on the raw (merged) tree, so they are reported even when other fields are invalid.
    model_only (rm-estimate): the model's config.json is all that is read, not its tokenizer."""
    problems = _model_problems(tree, model_only)
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    paths = [(f"data.{f}", _get(tree, "data", f)) for f in ("train_path", "test_path", "chat_template")]
    for i, src in enumerate(data.get("sources") or []):
        if isinstance(src, dict):
            paths += [(f"data.sources[{i}].{f}", src.get(f)) for f in ("path", "test_path")]
    for field, p in paths:
        if p and (Path(str(p)).exists() or Path(str(p)).is_symlink() or not looks_like_hub_name(str(p))):
            try:  # missing, a symlink loop, a FIFO, unreadable, empty: before anything reads (or hashes) it
                check_file(str(p), field, folder_ok=not field.endswith("chat_template"))
            except DataError as e:
                problems.append(str(e))
    ds = tree.get("ds_config")
    if ds and not Path(str(ds)).is_file():
        problems.append(f"ds_config {ds!r}: file not found")
    return problems
