"""Provenance: what produced a number (code, packages, machine), recorded by the job that made it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]  # workflow_scripts/
REPO = SCRIPTS.parent
PACKAGES = ("tensorflow", "keras", "numpy", "scikit-learn", "pandas", "snakemake")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None  # e.g. snakemake is not inside a job's conda env
    return versions


def git_state(repo: Path = REPO) -> dict:
    """HEAD of the workflow's checkout and whether tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def code_hash(script: str) -> str:
    """SHA-256 (16 hex digits) of the code a job runs: its script and the shared cnnstudy package.

    Content only (paths relative to workflow_scripts/), so the same code hashes the same in
    any checkout, and any change to what trains, however small, changes the hash.
    """
    digest = hashlib.sha256()
    for path in sorted([SCRIPTS / script, *(SCRIPTS / "cnnstudy").glob("*.py")]):
        digest.update(path.relative_to(SCRIPTS).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def record(script: str, packages: bool = True, **extra) -> dict:
    """What a job records about itself: code (commit, dirty, code hash), machine and, once per
    result (the training job), the package versions."""
    git = git_state()
    return {
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "code_hash": code_hash(script),
        **({"packages": package_versions(), "python": platform.python_version()} if packages else {}),
        "host": platform.node(),
        **extra,
    }
