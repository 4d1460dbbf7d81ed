"""Provenance recorded with every metrics file: what produced this number."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tensorflow", "keras", "numpy", "scikit-learn", "pandas", "snakemake")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None  # e.g. snakemake is not inside a job's conda env
    return versions


def git_commit(repo: Path = REPO) -> str | None:
    """HEAD of the workflow's checkout, with '-dirty' if tracked files were modified."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect(train_info: dict, data_manifest: dict, **extra) -> dict:
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": train_info.get("device"),
        "precision": train_info.get("precision"),
        "threads": train_info.get("threads"),
        "seed": train_info.get("seed"),
        "spec_hash": train_info.get("spec_hash"),
        "data": {
            "npz_md5": data_manifest.get("md5"),
            "raw_md5": data_manifest.get("raw_md5"),
            "counts": data_manifest.get("counts"),
            "val_fraction": data_manifest.get("val_fraction"),
            "split_seed": data_manifest.get("split_seed"),
            "subset": data_manifest.get("subset"),
        },
        "git_commit": git_commit(),
        "host": platform.node(),
        **extra,
    }
