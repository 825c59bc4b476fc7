"""The tokenized dataset, prepared once and reused by every start, resume and requeue.

The cache folder is named by a hash of everything that decides its content (`data_identity`): the
sha256 of every source file and of the tokenizer and chat template (the same fingerprint a resume
checks), max_len, the data options, the seed (it draws the held-out split and the mixture), the
transformers/tokenizers versions and the source of the modules that turn rows into ids. Change any of
them and a new folder is built; nothing else can make a start re-tokenize.

    <data.cache_dir, default OUT/data_cache>/<key>/
        train/ test/        datasets.save_to_disk folders (memory-mapped arrow when loaded)
        identity.json       what the key was made of
        report.json         the data report of the build (copied to OUT/data_report.json at every start)
        sources.json        source names, for per-source eval metrics

A folder appears only when complete (built in <key>.tmp-<pid>, then renamed). In a multi-rank run rank 0
builds or loads it while the other ranks wait on the process group's key-value store, polling, not in
a collective, so a long preparation cannot hit a collective timeout (data.prepare_timeout_s bounds the
wait instead). `--prepare_only` (or `rm-prepare`) builds it in one process on a CPU node ahead of the
GPU job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rm_trainer import disk
from rm_trainer.data.sources import prepare_sources
from rm_trainer.errors import DataError, UserError

# what turns a row into token ids: these modules of data/, the objectives' row machinery (base.py) and
# each objective's own reader modules (Objective.row_modules)
CODE = ("formats.py", "truncation.py", "tokenize.py", "sources.py", "cache.py", "schema.py")
READY_KEY = "rm_trainer/data_cache"


def data_identity(cfg, objective) -> dict[str, Any]:
    """Everything that decides which rows exist, their token ids and their order: the files, the tokenizer,
    max_len, the data options, the seed, and what the objective reads (Objective.identity)."""
    d = cfg.data
    return {
        "data_and_tokenizer_sha256": fingerprint(
            [p for s in d.source_list() for p in (s.path, s.test_path)] + [d.chat_template],
            cfg.model.tokenizer or cfg.model.path),
        "max_len": d.max_len,
        "options": {k: getattr(d, k) for k in ("test_fraction", "format", "on_error")}
        | {"sources": [[s.name, s.weight, s.test_fraction] for s in d.sources or []]},
        "seed": cfg.train.seed,
        "objective": {"name": objective.name} | objective.identity(),
    }


def fingerprint(paths: list[str | None], tokenizer_dir: str | None) -> str:
    """sha256 over the data files' bytes and the tokenizer files: a resume on other data is refused,
    and the tokenized-data cache is keyed by it."""
    return _fingerprint(tuple(p for p in paths if p), tokenizer_dir)


@functools.lru_cache(maxsize=8)  # hashed once per process, however often it is asked for
def _fingerprint(paths: tuple[str, ...], tokenizer_dir: str | None) -> str:
    h = hashlib.sha256()
    files = []
    for p in map(Path, paths):  # files, every file of a save_to_disk folder; hub names by name only
        files += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    if tokenizer_dir:
        files += sorted(p for p in Path(tokenizer_dir).glob("*") if p.is_file() and "token" in p.name)
    h.update("\0".join(p for p in paths if not Path(p).exists()).encode())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_identity(cfg, objective) -> dict[str, Any]:
    import importlib

    import tokenizers
    import transformers

    here = Path(__file__).parent
    files = [here / f for f in CODE] + [Path(importlib.import_module(m).__file__) for m in
                                        ("rm_trainer.objectives.base", *objective.row_modules)]
    code = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    return data_identity(cfg, objective) | {"code_sha256": code, "transformers": transformers.__version__,
                                            "tokenizers": tokenizers.__version__}


def cache_dir(cfg, objective) -> Path:
    ident = json.dumps(cache_identity(cfg, objective), sort_keys=True)
    root = Path(cfg.data.cache_dir or Path(cfg.output.output_dir) / "data_cache")
    return root / hashlib.sha256(ident.encode()).hexdigest()[:20]


def build(cfg, tok, objective, dest: Path) -> dict:
    """Read, check and tokenize every source into dest (atomically). Returns the report."""
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    made = [d for d in tmp.parents if not d.exists()]  # folders this build creates, nearest first
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        # datasets' own arrow files (the parsed sources, map results) go to a scratch folder that is
        # deleted afterwards, not into the home directory's cache
        train, test, report, names = prepare_sources(cfg, tok, objective, work_dir=str(tmp / "scratch"))
        train.save_to_disk(str(tmp / "train"))
        if test is not None:
            test.save_to_disk(str(tmp / "test"))
        report["_total"]["prepare_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "sources.json").write_text(json.dumps(names))
        (tmp / "identity.json").write_text(json.dumps(cache_identity(cfg, objective), indent=2) + "\n")
        del train, test
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        if dest.exists():  # built meanwhile by another process: identical content, keep that one
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
    except BaseException as e:  # nothing of a failed build is left, not even the folders it created
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:
            try:
                d.rmdir()
            except OSError:  # not empty: something else lives there
                break
        cause = disk.disk_cause(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise disk.DiskFullError(disk.message("preparing the tokenized data in", dest.parent, cause)
                                     + "; the partial cache was removed: free space, or point --cache_dir at a "
                                     "disk with room, and rerun") from None
        raise
    return report


def prepare_or_load(cfg, tok, objective) -> tuple[Path, bool]:
    """The cache folder for this config, built if missing. Returns (folder, whether it already existed)."""
    dest = cache_dir(cfg, objective)
    if (dest / "identity.json").is_file():
        return dest, True
    build(cfg, tok, objective, dest)
    return dest, False


def load(dest: Path) -> tuple[Any, Any, list[str], dict]:
    import datasets

    train = datasets.load_from_disk(str(dest / "train")).with_format("python")
    test = datasets.load_from_disk(str(dest / "test")).with_format("python") if (dest / "test").exists() else None
    return train, test, json.loads((dest / "sources.json").read_text()), json.loads((dest / "report.json").read_text())


def load_data(cfg, tok, objective, rt, out: Path):
    """(train, test, source names) on every rank. Rank 0 builds or loads the cache; the others poll the
    store for the folder's name (no collective is pending meanwhile, so no collective timeout applies).
    rt: the run's ranks (train.engine.Runtime: is_main, publish, wait_for)."""
    if rt.is_main:
        try:
            t0 = time.perf_counter()
            dest, hit = prepare_or_load(cfg, tok, objective)
        except BaseException as e:  # tell the waiting ranks, so they stop instead of waiting out the timeout
            rt.publish(READY_KEY, json.dumps({"error": f"{type(e).__name__}: {e}", "user": isinstance(e, UserError)}))
            raise
        rt.publish(READY_KEY, json.dumps({"dir": str(dest)}))
        report = json.loads((dest / "report.json").read_text())
        (out / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
        how = "loaded the cached" if hit else "prepared the"
        print(f"[rm_trainer] data: {how} tokenized dataset {dest} in {time.perf_counter() - t0:.1f}s: "
              f"{json.dumps(report)}", flush=True)
    else:
        msg = json.loads(rt.wait_for(READY_KEY, cfg.data.prepare_timeout_s))
        if "error" in msg:
            err = DataError(f"rank 0 could not prepare the data ({msg['error']}); see rank 0's message")
            err.quiet = bool(msg.get("user"))  # rank 0 prints that one message; a bug is said by every rank
            raise err
        dest = Path(msg["dir"])
    train, test, names, _ = load(dest)
    return train, test, names
