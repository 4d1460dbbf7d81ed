"""A training job's resumable state on disk, safe against ``kill -9`` at any moment.

Layout of a job's state directory (kept outside the job's outputs)::

    job.json            what the state belongs to (entry hash, seed, precision, data), and
                        the settings a resume must keep (intra-op threads)
    p1-e0003/           one checkpoint per finished epoch: phase 1, after epoch 3
        model.weights.h5        Model.save_weights: weights, BatchNorm statistics,
                                optimizer variables (step, momentum, EMA)
        best.weights.npz        EarlyStopping's best weights, if it keeps them
        state.json              the rest: history rows, EarlyStopping's counters, and
                                the SHA-256 of every file above
    .tmp-...            a checkpoint being written; ignored and removed
    *.unreadable-...    a checkpoint that failed its checksums, set aside

A checkpoint is written in a temporary directory and renamed into place, so it is either
complete or absent. The newest one whose checksums match is resumed; one that does not
match is set aside (and logged), and the one before it is used, or none. Only the two
newest are kept. Deleting the whole directory at the end is a rename first, so a kill
during the deletion leaves nothing a later run would mistake for state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cnnstudy.checkpoint")

NAME = re.compile(r"^p(\d+)-e(\d+)$")
STATE = "state.json"
JOB = "job.json"
KEEP = 2


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    phase: int
    epoch: int  # epochs finished (1-based count over all phases)
    state: dict

    def file(self, name: str) -> Path:
        return self.path / name


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TrainingState:
    """The state directory of one training job (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, job: dict):
        self.root = Path(root)
        self.job = job
        self._trash_leftovers()
        recorded = self._read_job()
        if recorded is not None and recorded.get("job") != job:
            log.info(
                "discarding training state in %s: it belongs to another job (entry, seed, precision or data changed)",
                self.root,
            )
            self.remove()
            recorded = None
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob(".tmp-*"):  # a checkpoint whose writing was interrupted
            shutil.rmtree(tmp, ignore_errors=True)
        self.settings: dict = (recorded or {}).get("settings", {})
        self._write_job()
        self.latest = self._latest_readable()

    # ---- the job record ------------------------------------------------------------------
    def _read_job(self) -> dict | None:
        try:
            return json.loads((self.root / JOB).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as another job's

    def _write_job(self) -> None:
        from .files import write_json

        write_json(self.root / JOB, {"job": self.job, "settings": self.settings})

    def keep(self, key: str, value):
        """A setting a resumed job must keep (e.g. threads: reduction order changes results).

        Returns the value recorded when the state was started, recording ``value`` if none.
        """
        if key not in self.settings:
            self.settings[key] = value
            self._write_job()
        elif self.settings[key] != value:
            log.warning(
                "keeping %s=%s recorded when this job started (not %s), so the resumed run matches",
                key,
                self.settings[key],
                value,
            )
        return self.settings[key]

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, int, Path]]:
        found = []
        for path in self.root.iterdir() if self.root.is_dir() else ():
            match = NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)

    def _verify(self, path: Path) -> dict:
        state = json.loads((path / STATE).read_text())
        for name, digest in state["files"].items():
            if _sha256(path / name) != digest:
                raise ValueError(f"{name}: checksum mismatch (truncated or corrupt)")
        return state

    def _latest_readable(self) -> Checkpoint | None:
        for phase, epoch, path in reversed(self.checkpoints()):
            try:
                return Checkpoint(path, phase, epoch, self._verify(path))
            except (OSError, ValueError, KeyError) as exc:
                aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
                path.rename(aside)
                log.warning(
                    "checkpoint %s is unreadable (%s): set aside as %s; trying the one before it",
                    path.name,
                    exc,
                    aside.name,
                )
        return None

    def begin(self, phase: int, epoch: int) -> Path:
        """A fresh temporary directory for the checkpoint after ``epoch``."""
        tmp = self.root / f".tmp-p{phase}-e{epoch:04d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, phase: int, epoch: int, state: dict) -> Checkpoint:
        """Seal ``tmp`` (checksums, fsync) and rename it into place; prune old checkpoints."""
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        state = {**state, "phase": phase, "epoch": epoch, "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        for name in (*files, STATE):
            _fsync(tmp / name)
        _fsync(tmp)
        final = self.root / f"p{phase}-e{epoch:04d}"
        if final.exists():  # the same epoch again (a resumed no-op): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.root)
        for *_, old in self.checkpoints()[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        self.latest = Checkpoint(final, phase, epoch, state)
        return self.latest

    # ---- removal ---------------------------------------------------------------------------
    def _trash_leftovers(self) -> None:
        for trash in self.root.parent.glob(f"{self.root.name}.deleting-*"):
            shutil.rmtree(trash, ignore_errors=True)

    def remove(self) -> None:
        """Delete the state: renamed away first, so a kill mid-way leaves no half state."""
        if not self.root.exists():
            return
        trash = self.root.with_name(f"{self.root.name}.deleting-{os.getpid()}")
        os.rename(self.root, trash)
        shutil.rmtree(trash, ignore_errors=True)
