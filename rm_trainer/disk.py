"""Writes that fail because of the disk (full, over quota, read-only, an I/O error), turned into one
message: which path, what failed, how much the write needed and how much was free. Every writer of the
project (checkpoint save, data cache, metrics, consolidation, HF export, rm-score chunks) uses it, so a
full disk is a user error (exit 2) and never a traceback. A failure that is not the disk's stays a bug.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from rm_trainer.errors import UserError

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# torch.save reports a failed write as a RuntimeError from its C++ stream writer, without an errno
TORCH_WRITE_FAILURES = ("file write failed", "unexpected pos", "iostream error", "No space left", "Disk quota")


class DiskFullError(UserError):
    """A write the disk refused. quiet: raised on a rank whose message another rank prints."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def is_disk_failure(e: BaseException) -> bool:
    """Whether an exception from a write is the disk's doing (see DISK_ERRNOS, TORCH_WRITE_FAILURES)."""
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return True
    if isinstance(e, OSError) and e.errno is None:  # pyarrow's IOError, whose message carries the reason
        return any(s in str(e) for s in ("No space left", "Disk quota", "Read-only file system"))
    return isinstance(e, RuntimeError) and any(s in str(e) for s in TORCH_WRITE_FAILURES)


def disk_cause(e: BaseException) -> BaseException | None:
    """The disk failure behind an exception (itself, or one it was raised from: libraries wrap them)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if is_disk_failure(e):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return "No space left on device (the write stopped part-way)" if "unexpected pos" in text else text[:200]


def message(what: str, path: str | Path, e: BaseException, needed: int | None = None) -> str:
    """'<what> <path> failed: <reason>; it needed about N and M were free'."""
    need = f"it needed about {human(needed)}, and " if needed else ""
    return f"{what} {path} failed: {reason(e)}; {need}{human(free_bytes(path))} were free there"


def tree_bytes(path: str | Path) -> int:
    """The size of a file, or of every file under a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def remove(path: str | Path) -> None:
    """Remove a half-written file or folder, whatever is left of it."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def write_atomically(what: str, dest: str | Path, write, needed: int | None = None) -> None:
    """write(tmp) into `dest`.tmp, then rename it into place (into a folder that already has files, file
    by file: other files there stay): `dest` is complete or as it was. A write the disk refuses removes
    the .tmp and raises DiskFullError naming the path, the reason and the space needed and free; any
    other failure removes the .tmp and propagates."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    remove(tmp)
    try:
        write(tmp)
        if tmp.is_dir() and dest.is_dir() and any(dest.iterdir()):  # a user's folder: files replaced, others kept
            for f in tmp.iterdir():
                if (dest / f.name).is_dir():
                    remove(dest / f.name)
                os.replace(f, dest / f.name)
            tmp.rmdir()
        else:
            if tmp.is_dir() and dest.is_dir():
                dest.rmdir()
            tmp.replace(dest)
    except (OSError, RuntimeError) as e:
        remove(tmp)
        if not is_disk_failure(e):
            raise
        raise DiskFullError(message(what, dest, e, needed) + f". Nothing half-written was left ({tmp.name} was "
                            "removed); free space and rerun") from None
