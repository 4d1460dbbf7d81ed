"""Check one published run (reports/study/) against the current code: retrain it and compare.

    python workflow_scripts/verify_published.py --published reports/study --model model_09 --seed 0 \\
        --spec results/specs/model_09.json --data results/data/cifar10.npz --manifest results/data/cifar10.json \\
        --epochs 2 --scratch results/verify/model_09/seed_0/epochs_2.work --out results/verify/model_09/seed_0/epochs_2.json

The run is retrained from scratch, in ``--scratch`` (never a finished job's outputs), with the
thread count and precision its provenance records, for its full epoch count (schedules and weight
averages depend on it) but stopped after ``--epochs`` epochs; every history column but wall-clock
timing must equal the published rows, bit for bit. ``--epochs 0`` trains it to the end, evaluates
it and also compares its validation and test metrics.

Identical: ``--out`` records the check (commit, date, epochs, the code hashes it vouches for), which
``record`` then adds to the published metrics files' provenance:

    python workflow_scripts/verify_published.py record --published reports/study results/verify/*/seed_*/epochs_*.json

Otherwise the job fails naming the run, epoch and column, and says "machine differs" instead of
"code changed" where this machine or its packages cannot give what the run recorded (another
device or CPU, no bf16 instructions for a bf16 run, other TensorFlow, Keras or NumPy versions).
``--on-other-machine skip`` says so at once, without retraining: runs trained on another CPU kind
differed from their first epoch (docs/reproducibility.md), so retraining there costs hours to learn
what the provenance already tells.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pandas as pd

from cnnstudy import cli, protocols, provenance, runtime
from cnnstudy.errors import JobError
from cnnstudy.files import read_json, write_json

log = logging.getLogger("cnnstudy.verify")

# The evaluated numbers compared after a full retrain (--epochs 0); timing is never compared.
EVALUATED = ("test", "val", "kept_epoch", "last_epoch", "epochs_run", "stopped_early")
PACKAGES = ("tensorflow", "keras", "numpy")


def published_run(published: Path, model: str, seed: int) -> tuple[dict, pd.DataFrame]:
    metrics, history = (
        published / "metrics" / f"{model}_seed{seed}.json",
        published / "histories" / f"{model}_seed{seed}.csv",
    )
    for path in (metrics, history):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no published run {model} seed {seed} in {published}")
    return read_json(metrics), pd.read_csv(history)


def machine_differences(recorded: dict) -> list[str]:
    """What this machine and environment cannot give of what the run recorded (empty: nothing)."""
    found = []
    device = recorded.get("device") or {}
    if device.get("kind") == "CPU":
        name, flags = runtime.cpu_info()
        if device.get("name") and device["name"] != name:
            found.append(f"CPU {name!r}, the run's was {device['name']!r}")
        if recorded.get("precision") == "mixed_bfloat16" and not flags & set(runtime.BF16_CPU_FLAGS):
            found.append(
                f"this CPU has no bf16 instructions ({', '.join(runtime.BF16_CPU_FLAGS)}) for a mixed_bfloat16 run"
            )
    elif device.get("kind"):
        found.append(f"the run trained on a {device['kind']} ({device.get('name')}); verification runs on the CPU")
    if runtime.available_cpus() < (recorded.get("threads") or {}).get("intra_op", 1):
        found.append(
            f"{runtime.available_cpus()} CPU(s) for the run's {recorded['threads']['intra_op']} intra-op threads"
        )
    now = provenance.package_versions(PACKAGES)
    then = (recorded.get("training") or {}).get("packages") or {}
    found += [
        f"{name} {now[name]}, the run's {then[name]}" for name in PACKAGES if then.get(name) and then[name] != now[name]
    ]
    return found


def history_differences(published: pd.DataFrame, got: pd.DataFrame, epochs: int | None) -> list[str]:
    """Every (epoch, column) where ``got`` differs from the first ``epochs`` published rows."""
    expected = published if epochs is None else published.iloc[:epochs]
    from cnnstudy.training import TIMING_COLUMNS

    columns = [c for c in expected.columns if c not in TIMING_COLUMNS]
    found = [f"column {c} missing" for c in columns if c not in got.columns]
    found += [f"column {c} not in the published history" for c in got.columns if c not in expected.columns]
    if len(got) != len(expected):
        found.append(f"{len(got)} epoch(s) trained, {len(expected)} published")
    for (_, a), (_, b) in zip(expected.iterrows(), got.iterrows(), strict=True):
        for column in columns:
            if column in got.columns and not (a[column] == b[column] or (pd.isna(a[column]) and pd.isna(b[column]))):
                found.append(f"epoch {int(a['epoch'])}, column {column}: published {a[column]!r}, now {b[column]!r}")
    return found


def metric_differences(published: dict, got: dict) -> list[str]:
    return [
        f"{key}: published {published.get(key)!r}, now {got.get(key)!r}"
        for key in EVALUATED
        if published.get(key) != got.get(key)
    ]


def main(
    published: str,
    model: str,
    seed: int,
    spec: str,
    data: str,
    manifest: str,
    epochs: int,
    scratch: str,
    out: str,
    threads: int | None = None,
    on_other_machine: typing.Literal["retrain", "skip"] = "retrain",
) -> dict:
    metrics, history = published_run(Path(published), model, seed)
    job = f"{model} seed {seed}"
    machine = preconditions(job, metrics["provenance"], manifest, on_other_machine)
    threads = threads or metrics["provenance"]["threads"]["intra_op"]
    stop = epochs or None
    work = Path(scratch)
    info = retrain(job, metrics, Path(published), model, seed, spec, data, work, threads, stop)
    differences = history_differences(history, pd.read_csv(work / "history.csv"), stop)
    hashes = {"training": provenance.code_hash("train.py")}
    if not stop:
        differences += metric_differences(metrics, reevaluate(job, metrics, data, manifest, work, threads))
        hashes["evaluation"] = provenance.code_hash("evaluate.py")
    if differences:
        raise JobError(verdict(job, differences, machine))
    result = check_record(model, seed, metrics, stop, hashes, info, threads, machine)
    write_json(out, result)
    shutil.rmtree(work, ignore_errors=True)
    log.info("%s: identical to the published run (%s)", job, result["epochs"])
    return result


def preconditions(job: str, recorded: dict, manifest: str, on_other_machine: str) -> list[str]:
    """Refuse other data; warn of (or, with ``skip``, refuse) a machine that cannot give what the
    run recorded. Returns the machine's differences."""
    data_md5 = read_json(manifest)["md5"]
    if data_md5 != recorded["data"]["npz_md5"]:
        raise JobError(
            f"{job}: the preprocessed data (md5 {data_md5}) differ from the run's ({recorded['data']['npz_md5']}): "
            "verify with the full data and the run's split (data_source, val_fraction, split_seed, no subset)"
        )
    machine = machine_differences(recorded)
    for line in machine:
        log.warning("%s: machine differs: %s", job, line)
    if machine and on_other_machine == "skip":
        raise JobError(
            f"{job}: machine differs ({'; '.join(machine)}): not retrained (verify.on_other_machine: skip); "
            "check it on the machine kind it trained on, or retrain here with on_other_machine: retrain"
        )
    return machine


def retrain(
    job: str,
    metrics: dict,
    published: Path,
    model: str,
    seed: int,
    spec: str,
    data: str,
    work: Path,
    threads: int,
    stop: int | None,
) -> dict:
    """Train the run afresh in ``work`` with the recorded precision, stopped after ``stop`` epochs
    (None: all); its train_info."""
    recorded = metrics["provenance"]
    log.info(
        "%s: retraining %s with %d thread(s), %s, comparing with %s",
        job,
        f"epochs 1-{stop} of {metrics['epochs_run']}" if stop else "every epoch",
        threads,
        recorded["precision"],
        published,
    )
    shutil.rmtree(work, ignore_errors=True)
    refit = (metrics.get("protocol") or {}).get("name") == "refit"  # its epoch count: the published holdout run's
    epochs_from = published / "metrics" / f"{protocols.holdout_name(model)}_seed{seed}.json"
    run_job(
        "train.py",
        job,
        "--data",
        data,
        "--spec",
        spec,
        "--model-out",
        work / "model.keras",
        "--history-out",
        work / "history.csv",
        "--info-out",
        work / "train_info.json",
        "--state-dir",
        work / "state",
        "--seed",
        seed,
        "--threads",
        threads,
        "--precision",
        recorded["precision"],
        "--require-gpu",
        "false",
        *(["--stop-after-epoch", stop] if stop else []),
        *(["--epochs-from", epochs_from] if refit else []),
    )
    return read_json(work / "train_info.json")


def reevaluate(job: str, metrics: dict, data: str, manifest: str, work: Path, threads: int) -> dict:
    """Evaluate the retrained run in ``work`` as the evaluate rule does; its metrics."""
    run_job(
        "evaluate.py",
        job,
        "--data",
        data,
        "--manifest",
        manifest,
        "--model",
        work / "model.keras",
        "--history",
        work / "history.csv",
        "--train-info",
        work / "train_info.json",
        "--metrics-out",
        work / "metrics.json",
        "--probs-out",
        work / "test_probs.npz",
        "--tta",
        metrics.get("tta", "none"),
        "--threads",
        threads,
    )
    return read_json(work / "metrics.json")


def verdict(job: str, differences: list[str], machine: list[str]) -> str:
    """The failure message: the differing run, epochs and columns, and whether code or machine."""
    detail = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
    if machine:
        return (
            f"{job}: machine differs: {detail}. machine differs ({'; '.join(machine)}): "
            "the numbers cannot tell whether the code changed"
        )
    return (
        f"{job}: code changed: {detail}. code changed: the current code no longer reproduces the published run; "
        "retrain and republish it"
    )


def check_record(
    model: str, seed: int, metrics: dict, stop: int | None, hashes: dict, info: dict, threads: int, machine: list[str]
) -> dict:
    """The identical check, as ``record`` adds it to the run's provenance."""
    git = provenance.git_state()
    return {
        "model": model,
        "seed": seed,
        "verdict": "identical",
        "commit": git["commit"],
        "dirty": git["dirty"],
        "date": datetime.date.today().isoformat(),
        "epochs": f"1-{stop}" if stop else f"all {metrics['epochs_run']} and the evaluation",
        "code_hashes": hashes,
        "spec_hash": info["spec_hash"],
        "threads": threads,
        "precision": info["precision"],
        "machine": {
            "device": info["device"],
            "packages": provenance.package_versions(PACKAGES),
            "differences": machine,
        },
    }


def run_job(script: str, job: str, *args) -> None:
    """Run a job script of this folder as its rule runs it, in its own process (its log lines go to
    this job's log): the check retrains and evaluates with the jobs' own code and nothing else."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / script), *map(str, args)])
    if proc.returncode != 0:
        raise JobError(f"{job}: {script} failed (exit {proc.returncode}); its log is above")


def compared_epochs(check: dict) -> int | None:
    """The epochs a check compared (None: the whole run, and its evaluation)."""
    return None if check["epochs"].startswith("all") else int(check["epochs"].split("-")[1])


def attribute(record: dict, stage: str, check: dict) -> None:
    """Re-attribute ``stage``'s provenance ("training" or "evaluation") to the check's commit, whose
    code reproduces the run; the original commit and code hash stay, as "original"."""
    block = record.setdefault(stage, {})
    block.setdefault("original", {k: block.get(k) for k in ("git_commit", "git_dirty", "code_hash")})
    block.update(
        git_commit=check["commit"],
        git_dirty=False,
        code_hash=check["code_hashes"][stage],
        attributed=f"verify_published {check['date']}: epochs {check['epochs']} retrained, identical",
    )


def record(published: str, checks: list[str]) -> list[str]:
    """Add each identical check to its run's published provenance (``verified``), once per commit
    and epochs; a check made from uncommitted code cannot be cited and is refused. A check of two
    epochs or more (the per-epoch reseeding exercised) re-attributes the training provenance to its
    commit; a whole-run check, the evaluation's too."""
    written = []
    for path in checks:
        check = read_json(path)
        if check.get("verdict") != "identical":
            raise JobError(f"{path}: not an identical check ({check.get('verdict')})")
        if check["dirty"] or not check["commit"]:
            raise JobError(
                f"{path}: made from a checkout with uncommitted changes (or outside git): check out a commit and verify again"
            )  # noqa: E501
        target = Path(published) / "metrics" / f"{check['model']}_seed{check['seed']}.json"
        metrics = read_json(target)
        entry = {
            k: check[k]
            for k in ("commit", "date", "epochs", "code_hashes", "spec_hash", "threads", "precision", "machine")
        }
        kept = [
            v
            for v in metrics["provenance"].get("verified", [])
            if (v["commit"], v["epochs"]) != (entry["commit"], entry["epochs"])
        ]
        metrics["provenance"]["verified"] = [*kept, entry]
        epochs = compared_epochs(check)
        if epochs is None or epochs >= 2:
            attribute(metrics["provenance"], "training", check)
        if epochs is None:
            attribute(metrics["provenance"], "evaluation", check)
        write_json(target, metrics)
        written.append(str(target))
        log.info(
            "%s seed %s: verified at %s (%s)", check["model"], check["seed"], check["commit"][:12], check["epochs"]
        )
    return written


HELP = {
    "published": "the published study folder (reports/study)",
    "spec": "the entry's training spec from the current config (results/specs/<model>.json)",
    "data": "the full-data .npz",
    "manifest": "its manifest (md5 compared with the run's)",
    "epochs": "epochs to compare (0: all, and the evaluated metrics)",
    "scratch": "a scratch folder for the retrained run (removed when identical)",
    "out": "the check's record (written only when identical)",
    "threads": "default: the run's recorded intra-op threads",
}


def record_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Add identical checks to the published runs' provenance.")
    p.add_argument("--published", default="reports/study")
    p.add_argument("checks", nargs="+", help="check records written by verify_published.py")
    return p


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"]:
        sys.argv.pop(1)
        sys.exit(cli.run(record, record_parser()))
    sys.exit(cli.run(main, help=HELP))
