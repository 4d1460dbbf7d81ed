"""File helpers shared by the job scripts: atomic writes, checksums, JSON."""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import JobError

# A full disk, or a quota reached (clusters): the job can do nothing but stop and say so.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the filesystem is full (also h5py's OSErrors, which carry the errno
    only in their message)."""
    return isinstance(exc, OSError) and (
        exc.errno in DISK_FULL or "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)
    )


def collect_quietly() -> None:
    """Garbage-collect now, without the errors that objects of a failed write (h5py's files on a
    full disk) raise while they are closed: they were reported already."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def ensure_space(path: str | os.PathLike, needed: int, what: str, then: str) -> None:
    """Fail before writing ``needed`` bytes under ``path`` if its filesystem has not that much free.

    A write that meets a full disk half-way can leave a library's file handles broken (h5py's
    then crash the process at exit); checking first turns the common case into a clean error.
    """
    free = shutil.disk_usage(Path(path) if Path(path).exists() else Path(path).parent).free
    if free < needed:
        raise disk_full_error(path, what, f"{needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free; {then}")


def disk_full_error(path: str | os.PathLike, what: str, then: str) -> JobError:
    return JobError(f"the disk is full (no space left on device, or quota reached) writing {what} {path}: {then}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    Readers never see a half-written file, and a failure leaves nothing behind.
    ``suffix`` keeps an extension that a writer insists on (Keras wants ``.keras``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if disk_full(exc):
            raise disk_full_error(path, "output", "nothing half-written is left; free space and rerun") from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def md5sum(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()
