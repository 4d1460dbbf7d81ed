"""Record every finished run in an MLflow tracking store, to browse and compare runs.

One MLflow run per (entry, seed): params (the resolved entry as training reads it, flattened,
plus the TTA), per-epoch metrics (the history), final metrics (validation and test accuracy,
loss, macro F1, per-class test F1), tags (model, seed, table, sweep, git commit, code hash)
and its figures (learning curves, confusion matrix) as artifacts.

It runs as a local rule at the end of the workflow, in one process: concurrent cluster jobs
never write one SQLite file at once (SQLite over a network filesystem would corrupt). The
default store is SQLite under the results directory (a real database, no server:
``mlflow ui --backend-store-uri sqlite:///results/mlflow/mlflow.db``); ``tracking_uri`` in the
config points at a shared server instead. Recording again updates a run, never duplicates
it: a run is found by its tags, and metrics are logged with fixed timestamps, which MLflow
stores once.

    python workflow_scripts/track.py --models results/specs/models.json --results results \\
        --metrics results/metrics/*/seed_*/metrics.json --out results/mlflow/recorded.json
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd

from cnnstudy import cli, configuration
from cnnstudy.files import read_json, write_json

log = logging.getLogger("cnnstudy.track")

EXPERIMENT = "cifar10-cnn-study"


def default_uri(results: str) -> str:
    return f"sqlite:///{(Path(results) / 'mlflow' / 'mlflow.db').resolve()}"


def flatten(value, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys, lists as JSON."""
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(value) if isinstance(value, list) else str(value)}


def _metrics(m: dict, history: pd.DataFrame, t0: int) -> list:
    from mlflow.entities import Metric

    out = []
    for _, row in history.iterrows():  # per epoch, step = epoch
        step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and pd.notna(value):
                out.append(Metric(key, float(value), t0 + step, step))
    final = {
        f"final_{split}_{k}": m[split][k]
        for split in ("val", "test")
        if m.get(split)
        for k in ("accuracy", "loss", "f1_macro")
    }
    final.update({f"final_test_f1_{name}": c["f1-score"] for name, c in m["test"]["per_class"].items()})
    out += [Metric(key, float(value), t0, 0) for key, value in final.items()]
    return out


def record(
    client, experiment_id: str, entry: dict, m: dict, history: pd.DataFrame, artifacts: list[Path], results: str
) -> str:
    """Create or update the MLflow run of one (entry, seed); return its run id."""
    from mlflow.entities import Param, RunTag

    trained = m["provenance"].get("training") or {}
    identity = {
        "model": m["model"],
        "seed": str(m["seed"]),
        "spec_hash": m["provenance"]["spec_hash"],
        "results_dir": str(Path(results).resolve()),
    }
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in identity.items())
    found = client.search_runs([experiment_id], filter_string=query, max_results=2)
    tags = {
        **identity,
        "table": str(entry["table"]),
        "sweep": entry.get("sweep") or "",
        "protocol": entry.get("protocol", "holdout"),
        "git_commit": trained.get("git_commit") or "",
        "code_hash": trained.get("code_hash") or "",
        "mlflow.runName": f"{m['model']} seed {m['seed']}",
    }
    started = int(float(trained.get("started") or 0) * 1000) or None  # the run's own times, not the recording's
    run_id = (
        found[0].info.run_id if found else client.create_run(experiment_id, start_time=started, tags=tags).info.run_id
    )
    params = {**flatten(configuration.training_part(entry)), "tta": entry["tta"], "seed": str(m["seed"])}
    t0 = int(float(trained.get("finished") or 0) * 1000)  # fixed timestamps: re-recording stores nothing twice
    metrics = _metrics(m, history, t0)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    params_list = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(params_list), 100):  # MLflow's limits per batch
        client.log_batch(run_id, params=params_list[start : start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    for path in artifacts:  # results/plots/<kind>/<model>_seed<s>.png -> figures/<kind>/
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=f"figures/{path.parent.name}")
    client.set_terminated(run_id, end_time=t0 or None)
    return run_id


def main(
    models: str,
    metrics: list[str],
    results: str,
    out: str,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    plots: str | None = None,
) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    info = configuration.complete(read_json(models))
    uri = tracking_uri or default_uri(results)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    artifact_root = (Path(results) / "mlflow" / "artifacts").resolve().as_uri() if uri.startswith("sqlite") else None
    experiment_id = (
        found.experiment_id if found else client.create_experiment(experiment, artifact_location=artifact_root)
    )
    runs = {}
    for path in metrics:
        m = read_json(path)
        history = pd.read_csv(Path(results) / "models" / m["model"] / f"seed_{m['seed']}" / "history.csv")
        figures = (
            [Path(plots) / kind / f"{m['model']}_seed{m['seed']}.png" for kind in ("curves", "confusion")]
            if plots
            else []
        )
        runs[f"{m['model']}/seed_{m['seed']}"] = record(
            client, experiment_id, info[m["model"]], m, history, figures, results
        )
    write_json(out, {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id, "runs": runs})
    log.info("recorded %d run(s) in %s (experiment %s)", len(runs), uri, experiment)
    return runs


HELP = {
    "models": "the resolved entries (results/specs/models.json)",
    "metrics": "metrics.json files",
    "results": "the results directory (histories, default store)",
    "out": "JSON summary: store, experiment, run ids",
    "tracking_uri": "MLflow tracking URI (default: SQLite under the results)",
    "plots": "results/plots: curves and confusion matrices as artifacts",
}

if __name__ == "__main__":
    sys.exit(cli.run(main, help=HELP))
