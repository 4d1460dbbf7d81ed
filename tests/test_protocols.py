"""Training protocols (cnnstudy/protocols.py): refit and study runs beside their holdout run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cnnstudy import configuration, protocols

from conftest import REPO, TINY, TWO_AT_ONCE, copy_workdir, early, require_mirror, snakemake, until_session_end
from test_workflow_static import _jobs

HOLDOUT, REFERENCE = "model_06", "model_05"  # model_06 early-stops; model_05 is its Table 4 step
REFIT, STUDY = f"{HOLDOUT}__protocol-refit", f"{HOLDOUT}__protocol-study"
PROTOCOLS_RUN = {
    "run_models": [REFERENCE, HOLDOUT, "protocols"],
    "sweeps": [{"name": "protocols", "base": HOLDOUT, "grid": {"protocol": ["refit", "study"]}}],
    # Patience 1 stops the tiny runs early; the refit must train the holdout run's kept epochs.
    "model_overrides": {"epochs": 6, "seeds": [0], "early_stopping": {"patience": 1}},
}


@pytest.fixture()
def cfg() -> dict:
    with open(REPO / "config.yaml") as fh:
        return yaml.safe_load(fh)


# ---- configuration: names, specs ------------------------------------------------------------------


def test_a_protocol_entry_is_named_after_it_and_refits_its_holdout_spec(cfg):
    cfg["sweeps"] = [{"name": "p", "base": "model_10", "grid": {"protocol": ["study", "refit"]}}]
    models = configuration.load(copy.deepcopy(cfg))
    refit = configuration.training_part(models["model_10__protocol-refit"])
    holdout = configuration.training_part(models["model_10"])
    assert refit["protocol"] == "refit" and "protocol" not in holdout  # holdout specs as before protocols
    assert configuration.spec_hash(protocols.holdout_spec(refit)) == configuration.spec_hash(holdout)
    assert not configuration.in_study_tables(models["model_10__protocol-study"])
    assert configuration.in_study_tables(models["model_10"])


def test_a_protocol_override_renames_every_entry_and_run_models_still_selects_by_config_name(cfg):
    cfg["model_overrides"] = {"protocol": "study"}
    cfg["run_models"] = ["model_02", "model_11"]
    models = configuration.load(copy.deepcopy(cfg))
    assert list(models) == ["model_02__protocol-study", "model_11__protocol-study"]
    assert models["model_11__protocol-study"]["base"] == "model_10"  # inheritance by config names
    cfg["model_overrides"] = {"protocol": "reift"}
    with pytest.raises(configuration.ConfigError, match="model_overrides.protocol: 'reift' is not one of"):
        configuration.load(copy.deepcopy(cfg))


def test_the_published_runs_specs_are_unchanged_by_protocols(cfg):
    """Every published run's recorded (or verified) training spec is the current entry's: no
    published holdout run retrains, and a refit may read its kept epoch."""
    models = configuration.load(copy.deepcopy(cfg))
    for path in sorted((REPO / "reports" / "study" / "metrics").glob("*_seed*.json")):
        metrics = json.loads(path.read_text())
        if protocols.of(models.get(metrics["model"], {})) != "holdout" or metrics["model"] not in models:
            continue
        spec_hash = configuration.spec_hash(configuration.training_part(models[metrics["model"]]))
        assert protocols.vouches(metrics, spec_hash), path.name


def test_a_refit_of_a_published_run_reads_its_metrics_and_retrains_nothing_else(tmp_path):
    extra = tmp_path / "refit.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "run_models": ["refit"],
                "sweeps": [{"name": "refit", "base": "model_17", "grid": {"protocol": ["refit"]}, "seeds": [1]}],
                "refit_epochs_from": str(REPO / "reports" / "study" / "metrics"),
            }
        )
    )
    proc = snakemake(
        "-n", "-p", "--directory", str(tmp_path), "--configfile", str(extra), "--config", "data_source=/x.tar.gz"
    )
    jobs = _jobs(proc.stdout)
    assert jobs["train"] == jobs["evaluate"] == 1, proc.stdout
    assert f"--epochs-from {REPO}/reports/study/metrics/model_17_seed1.json" in proc.stdout
    # Another spec (the tiny preset's one epoch, and its seeds [0]): the published run does not vouch
    # for it, so a refit needs its holdout run trained here, and says so if the run does not include it.
    proc = snakemake(
        "-n",
        "--directory",
        str(tmp_path),
        "--configfile",
        TINY,
        str(extra),
        "--config",
        "data_source=/x.tar.gz",
        check=False,
    )
    assert proc.returncode != 0
    assert "refits model_17 seed 0, whose metrics are neither in" in proc.stdout + proc.stderr
    assert "add model_17 with seed 0 to the run" in proc.stdout + proc.stderr


# ---- the three protocols run on the tiny preset ------------------------------------------------------


@early("protocols_run", needs=("tiny_prepared",))
def _protocols_run(tmp_path_factory, started) -> tuple[Path, list[str]]:
    """The tiny preset's model_05 and model_06 beside model_06's refit and study runs (made early)."""
    work = copy_workdir(started["tiny_prepared"].result(), tmp_path_factory.mktemp("protocols_run"))
    extra = work / "protocols.yaml"
    extra.write_text(yaml.safe_dump(PROTOCOLS_RUN))
    args = ["--directory", str(work), "--configfile", TINY, str(extra), "--config", f"data_source={require_mirror()}"]
    snakemake(*args, *TWO_AT_ONCE, timeout=until_session_end(), nice=10)
    return work, args


@pytest.fixture(scope="module")
def protocols_run(started_early):
    work, args = started_early["protocols_run"].result()
    results = work / "results" / "tiny"

    def read(kind: str, name: str):
        folder = results / ("metrics" if kind == "metrics" else "models") / name / "seed_0"
        if kind == "history":
            return pd.read_csv(folder / "history.csv")
        return json.loads((folder / ("metrics.json" if kind == "metrics" else "train_info.json")).read_text())

    return {"work": work, "args": args, "results": results, "reports": work / "reports" / "tiny", "read": read}


@pytest.mark.slow
def test_a_refit_trains_on_train_and_validation_for_its_holdout_runs_kept_epochs(protocols_run):
    read = protocols_run["read"]
    holdout, refit = read("metrics", HOLDOUT), read("metrics", REFIT)
    info = read("info", REFIT)
    assert holdout["stopped_early"] and holdout["epochs_run"] < 6, "the tiny holdout run should stop early"
    kept = holdout["kept_epoch"]["epoch"]
    assert info["n_train"] == read("info", HOLDOUT)["n_train"] + holdout["n_val"] == 700  # 500 + 200 images
    assert refit["epochs_run"] == kept and not refit["stopped_early"] and refit["kept_epoch"]["epoch"] == kept
    assert refit["protocol"]["name"] == "refit" and refit["protocol"]["epochs"] == kept
    assert refit["protocol"]["epochs_from"].endswith(f"metrics/{HOLDOUT}/seed_0/metrics.json")
    assert refit["val"] is None and not any(c.startswith("val_") for c in read("history", REFIT).columns)
    assert refit["n_train"] == 700 and not refit["protocol"]["test_selected"]


@pytest.mark.slow
def test_a_study_run_early_stops_on_the_test_split_and_is_marked(protocols_run):
    read = protocols_run["read"]
    study, history = read("metrics", STUDY), read("history", STUDY)
    assert study["protocol"] == {
        **study["protocol"],
        "name": "study",
        "test_selected": True,
        "epochs_chosen_on": "test set",
    }
    assert study["val"] is None and study["n_train"] == 700
    # Its validation columns measure the test images: at the kept epoch (best weights restored, no
    # weight average or TTA in model_06) Keras' cross-entropy on them is the evaluated test loss.
    kept = history.loc[history["epoch"] == study["kept_epoch"]["epoch"]].iloc[0]
    assert kept["val_cross_entropy"] == pytest.approx(study["test"]["loss"], rel=2e-3)
    assert abs(kept["val_accuracy"] - study["test"]["accuracy"]) <= 1 / study["n_test"]
    log = (protocols_run["results"] / "logs" / "train" / STUDY / "seed_0.log").read_text()
    assert "protocol study: 700 training images, epochs chosen on the test set" in log


@pytest.mark.slow
def test_refit_and_study_runs_stay_out_of_the_holdout_tables_and_fill_the_protocols_table(protocols_run):
    reports = protocols_run["reports"]
    table1, table4 = pd.read_csv(reports / "table1.csv"), pd.read_csv(reports / "table4.csv")
    assert set(table1["model"]) == {REFERENCE, HOLDOUT}
    assert set(table4["model"]) | set(table4["compared_to"]) == {REFERENCE, HOLDOUT}
    assert set(pd.read_csv(reports / "compare.csv")["model"]) == {REFERENCE, HOLDOUT}
    table = pd.read_csv(reports / "protocols.csv")
    assert list(zip(table["model"], table["protocol"], table["entry"], strict=True)) == [
        (HOLDOUT, "holdout", HOLDOUT),
        (HOLDOUT, "refit", REFIT),
        (HOLDOUT, "study", STUDY),
    ]
    assert (table["n"] == 1).all() and table["test_selected"].tolist() == [False, False, True]
    test = {
        p: protocols_run["read"]("metrics", e)["test"]["accuracy"]
        for p, e in zip(table["protocol"], table["entry"], strict=True)
    }
    assert table.set_index("protocol")["test_accuracy_mean"].to_dict() == pytest.approx(test)
    # Each protocol against holdout on the seeds both ran (here seed 0): its run minus the holdout run.
    paired = table.set_index("protocol")
    assert paired["paired_seeds"].tolist() == [0, 1, 1] and pd.isna(paired.loc["holdout", "diff_to_holdout"])
    for p in ("refit", "study"):
        assert paired.loc[p, "diff_to_holdout"] == pytest.approx(test[p] - test["holdout"])
    shown = (reports / "protocols.md").read_text()
    assert "study (test-selected)" in shown and shown.count("none (trained on it)") == 2


@pytest.mark.slow
def test_the_protocols_run_is_complete_and_plots_without_holdout_entries(protocols_run, tmp_path):
    """Nothing left to do; the figures draw from refit and study runs alone (a protocols-only run)."""
    import plots

    proc = snakemake("-n", *protocols_run["args"])
    assert "Nothing to be done" in proc.stdout + proc.stderr
    results = protocols_run["results"]
    runs = [REFIT, STUDY]
    written = plots.main(
        str(results / "specs" / "models.json"),
        [str(results / f"metrics/{m}/seed_0/metrics.json") for m in runs],
        [str(results / f"models/{m}/seed_0/history.csv") for m in runs],
        str(tmp_path),
    )
    assert all(Path(p).stat().st_size > 0 for p in written)
    assert (tmp_path / "curves" / f"{REFIT}_seed0.png").is_file()


def _identical_check(name: str, published: Path) -> dict:
    """An identical two-epoch check of ``name`` seed 0, shaped as verify_published.py writes it."""
    from cnnstudy import provenance

    metrics = json.loads((published / "metrics" / f"{name}_seed0.json").read_text())
    return {
        "model": name,
        "seed": 0,
        "verdict": "identical",
        "commit": "c" * 40,
        "dirty": False,
        "date": "2026-12-05",
        "epochs": "1-2",
        "code_hashes": {"training": provenance.code_hash("train.py")},
        "spec_hash": metrics["provenance"].get("spec_hash", ""),
        "threads": 1,
        "precision": "float32",
        "machine": {"device": metrics["provenance"]["device"], "packages": {}, "differences": []},
    }


@pytest.mark.slow
def test_publish_adds_refit_and_study_runs_beside_the_study_and_answers_per_rung(protocols_run, tmp_path):
    """publish --add: the holdout runs published first, the refit and study runs added from their own
    results directory; the page answers how much of the gap each protocol closes."""
    import shutil

    import publish
    import verify_published

    from cnnstudy.errors import JobError

    results = protocols_run["results"]
    study, later = tmp_path / "study", tmp_path / "later"
    entries = json.loads((results / "specs" / "models.json").read_text())
    for home, names in ((study, [REFERENCE, HOLDOUT]), (later, [REFIT, STUDY])):
        (home / "specs").mkdir(parents=True)
        (home / "specs" / "models.json").write_text(json.dumps({n: entries[n] for n in names}))
        for name in names:
            for sub in ("metrics", "models"):
                shutil.copytree(results / sub / name, home / sub / name)
    out = tmp_path / "published"
    publish.main([str(study)], str(out))
    assert not (out / "tables" / "protocols.md").exists()  # no refit or study runs yet
    table4 = (out / "tables" / "table4.md").read_text()
    publish.main([str(later)], str(out), add_only=True)
    assert {p.name for p in (out / "metrics").iterdir()} == {
        f"{n}_seed0.json" for n in (REFERENCE, HOLDOUT, REFIT, STUDY)
    }
    assert (out / "figures" / "curves" / f"{STUDY}_seed0.png").is_file() and (
        out / "tables" / "table4.md"
    ).read_text() == table4
    table = pd.read_csv(out / "tables" / "protocols.csv")
    assert table["protocol"].tolist() == ["holdout", "refit", "study"]
    assert pd.read_csv(out / "tables" / "table1.csv")["model"].tolist() == [REFERENCE, HOLDOUT]
    readme = (out / "README.md").read_text()
    assert "## Method or irreproducibility? Three protocols" in readme and f"- **{HOLDOUT}** (study " in readme
    assert any(f"the study's protocol {verb}" in readme for verb in ("closes", "widens", "moves"))
    assert "4 of 4 runs finished" in readme
    # Adding them again keeps a run published unchanged with the checks recorded in it (as
    # verify_published.py record adds them), and replaces a run retrained since (another history).
    checks = []
    for name in (REFIT, STUDY):
        checks.append(tmp_path / f"{name}.check.json")
        checks[-1].write_text(json.dumps(_identical_check(name, out)))
    verify_published.record(str(out), [str(c) for c in checks])
    retrained = later / "models" / STUDY / "seed_0" / "history.csv"
    history = pd.read_csv(retrained)
    history.loc[0, "epoch_time"] += 1.0  # a rerun: its wall-clock times differ
    history.to_csv(retrained, index=False)
    publish.main([str(later)], str(out), add_only=True)
    verified = {n: json.loads((out / "metrics" / f"{n}_seed0.json").read_text())["provenance"] for n in (REFIT, STUDY)}
    assert "verified" in verified[REFIT] and "verified" not in verified[STUDY]
    assert (out / "histories" / f"{STUDY}_seed0.csv").read_text() == retrained.read_text()
    # The study's own runs are never replaced by --add.
    with pytest.raises(JobError, match=f"{HOLDOUT} already published"):
        publish.main([str(study)], str(out), add_only=True)
    # A run still going: its entries still training are counted in the page's status, and a rung none
    # of whose refit or study entries has finished a run has no rows in the protocols table yet.
    going, planned = tmp_path / "going", f"{REFERENCE}__protocol-refit"
    shutil.copytree(later, going)
    shutil.rmtree(going / "metrics" / REFIT)
    (going / "specs" / "models.json").write_text(
        json.dumps({**{n: entries[n] for n in (REFIT, STUDY)}, planned: entries[REFIT]})
    )
    publish.main([str(going)], str(out), add_only=True)
    assert "4 of 5 runs finished (the run is still going" in (out / "README.md").read_text()
    assert pd.read_csv(out / "tables" / "protocols.csv")["model"].tolist() == [HOLDOUT] * 3
    # Once it has a run (here the refit run's files under its name), its rung joins the table in the
    # ladder's order (model_05 before model_06), not in the order the runs were added.
    for sub in ("metrics", "models"):
        shutil.copytree(later / sub / REFIT, going / sub / planned)
    metrics_file = going / "metrics" / planned / "seed_0" / "metrics.json"
    metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), "model": planned}))
    publish.main([str(going)], str(out), add_only=True)
    assert "5 of 5 runs finished." in (out / "README.md").read_text()
    table = pd.read_csv(out / "tables" / "protocols.csv")
    assert list(table[["model", "protocol"]].itertuples(index=False, name=None)) == [
        (REFERENCE, "holdout"),
        (REFERENCE, "refit"),
        (HOLDOUT, "holdout"),
        (HOLDOUT, "refit"),
        (HOLDOUT, "study"),
    ]


def test_the_pages_answer_compares_like_with_like_where_the_protocols_ran_other_seeds():
    """A protocol run on fewer seeds than holdout: the page gives the difference on the seeds both ran
    beside the means' (one refit seed against three holdout seeds); where the seeds are the same, the
    means already compare like with like and nothing is added."""
    import publish

    def row(protocol, n, mean, diff, paired):
        return {
            "model": "model_10",
            "protocol": protocol,
            "n": n,
            "test_accuracy_mean": mean,
            "test_accuracy_std": np.nan if n == 1 else 0.02,
            "epochs_run_mean": 20.0,
            "study_test_accuracy": 0.8678,
            "gap_to_study": mean - 0.8678,
            "diff_to_holdout": diff,
            "paired_seeds": paired,
        }

    rows = pd.DataFrame(
        [row("holdout", 3, 0.8330, np.nan, 0), row("refit", 1, 0.7825, -0.0341, 1), row("study", 3, 0.8354, 0.0024, 3)]
    )
    answer = publish._rung_answer("model_10", rows, "model_10's seed spread")
    assert "refit widens the gap by 145% (to -0.0853; − holdout on the same seeds -0.0341, n 1)" in answer
    assert "the study's protocol closes 7% of the gap (to -0.0324)" in answer and "+0.0024" not in answer


def test_the_pages_early_stopping_spread_reads_holdout_runs_only():
    """The page's 'same configuration over seeds' lines describe stopping on the validation split:
    a study run (stopped on the test set) of the same rung is not listed among them."""
    import publish

    def run(name, seed, protocol):
        kept = {"epoch": 10 + seed, "accuracy": 0.9}
        return {"model": name, "seed": seed, "epochs_run": 15 + seed, "kept_epoch": kept,
                "test": {"accuracy": 0.85}, "protocol": {"name": protocol}}  # fmt: skip

    study = "model_10__protocol-study"
    metrics = [run("model_10", s, "holdout") for s in (0, 1)] + [run(study, s, "study") for s in (0, 1)]
    info = {n: {"early_stopping": {"patience": 5}, "published": {}} for n in ("model_10", study)}
    text = "\n".join(publish.stopping(metrics, info))
    assert "model_10, the same configuration over seeds" in text and "seed 1: stopped after 16, kept epoch 11" in text
    assert study not in text


def test_the_page_sums_up_each_protocol_across_the_studys_rungs():
    """A protocol run on two or more of the study's rungs: one line with its same-seed difference to
    holdout per rung, their mean and how many it raised; rungs beyond the study and a protocol on one
    rung are left out."""
    import publish

    def row(model, protocol, diff, study=0.85):
        return {"model": model, "protocol": protocol, "diff_to_holdout": diff, "study_test_accuracy": study}

    frame = pd.DataFrame(
        [
            row("model_02", "holdout", np.nan),
            row("model_02", "study", -0.0461),
            row("model_07", "holdout", np.nan),
            row("model_07", "study", 0.0309),
            row("model_10", "refit", -0.0246),
            row("model_18", "refit", 0.0033, study=np.nan),
        ]
    )
    lines = publish._across_rungs(frame, "model_10's seed spread (0.018)")
    assert lines == [
        "- **Across the study's rungs**, study − holdout on the same seeds: model_02 -0.0461, model_07 +0.0309 "
        "(mean -0.0076; above holdout on 1 of 2), against model_10's seed spread (0.018)."
    ]
