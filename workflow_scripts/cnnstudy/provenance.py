"""Provenance: what produced a number (code, packages, machine), recorded by the job that made it."""

from __future__ import annotations

import ast
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
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _local_module(name: str, root: Path) -> Path | None:
    """The file under ``root`` (workflow_scripts/) that module ``name`` is (None: not the workflow's code)."""
    for candidate in (root / Path(*name.split(".")).with_suffix(".py"), root / Path(*name.split(".")) / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(script: str, root: Path = SCRIPTS) -> list[Path]:
    """The workflow's own files that ``script`` (under workflow_scripts/) imports, itself included,
    followed through every import, also those inside functions: the code that can change its result."""
    todo, seen = [root / script], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        # The package a module is in ('' for a script, wherever it lies; 'cnnstudy' for its modules).
        package = "" if path == root / script else ".".join(path.parent.relative_to(root).parts)
        names = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                    base = ".".join([*parent, *([base] if base else [])])
                names.append(base)
                names += [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
                found = _local_module(".".join(parts[:i]), root)
                if found is not None:
                    todo.append(found)
    return sorted(seen)


def code_hash(script: str, root: Path = SCRIPTS) -> str:
    """SHA-256 (16 hex digits) of the code a job runs: its script and every workflow module it
    imports (import_closure), and nothing else: a report module's change leaves a training job's
    hash alone.

    By content only (the sorted digests of the files, not their paths), so the same code hashes
    the same in any checkout, a moved file is no change, and any change to what runs, however
    small, changes the hash.
    """
    digests = sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in import_closure(script, root))
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


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
