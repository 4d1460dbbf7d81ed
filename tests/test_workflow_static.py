"""The workflow as Snakemake sees it, without training: dry runs, lint, format."""

from __future__ import annotations

import re
import subprocess

from conftest import BIN, REPO, snakemake


def _jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = dry_run_output.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_dry_run_plans_the_whole_dag(tmp_path):
    proc = snakemake("-n", "--directory", str(tmp_path), "--config", "data_source=/some/where/cifar.tar.gz")
    jobs = _jobs(proc.stdout)
    assert jobs["download"] == 1 and jobs["preprocess"] == 1 and jobs["all"] == 1


def test_bad_config_stops_before_any_job(tmp_path):
    proc = snakemake("-n", "--directory", str(tmp_path), "--config", "val_fraction=2", "seeds=[-1]", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "val_fraction: 2 is greater than or equal to the maximum of 1" in output
    assert "seeds[0]: " in output  # the --config parser passes [-1] on as the string "-1"
    assert not (tmp_path / "results").exists()


def test_unknown_model_name_stops_the_run(tmp_path):
    proc = snakemake("-n", "--directory", str(tmp_path), "--config", "run_models=[model_42]", check=False)
    assert proc.returncode != 0
    assert "run_models: unknown model name(s) 'model_42'" in proc.stdout + proc.stderr


def test_snakemake_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_snakefmt_check_is_clean():
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
