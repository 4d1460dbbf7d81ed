"""The report: HTML report rendered in headless Chromium, Table 3, seeds, fast regeneration."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from cnnstudy import models as _registers_custom_layers  # noqa: F401
from cnnstudy.errors import JobError

from conftest import SCRIPTS, TINY, TWO_AT_ONCE, missing, snakemake
from daemons import apt_update
from test_workflow_static import _jobs

pytestmark = pytest.mark.slow


def chromium() -> str:
    """Debian's chromium, installed with apt if missing (CI machines start without it)."""
    path = shutil.which("chromium")
    if path:
        return path
    if os.geteuid() != 0:
        missing("headless Chromium is needed: apt-get install chromium (or run as root: the test installs it)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt_update(env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], check=True, timeout=900, env=env, capture_output=True
    )
    return shutil.which("chromium")


def _open_item(page, report, category, row_text):
    """Open the report, go to ``category`` and show the item in the row containing ``row_text``."""
    page.goto(report.as_uri())
    page.get_by_text(category, exact=True).click()
    page.locator("tr", has_text=row_text).first.locator("a[iconname=eye]").click()
    page.wait_for_timeout(500)


def test_html_report_renders_tables_and_figures(tiny_run, tmp_path):
    from playwright.sync_api import sync_playwright

    report = tmp_path / "report.html"
    snakemake("--directory", str(tiny_run["work"]), "--configfile", TINY, *tiny_run["config"], "--report", str(report))
    assert report.stat().st_size > 100_000
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})

        _open_item(page, report, "Tables", "Table 1 - Custom CNNs")
        frame = next(f for f in page.frames if "table1.html" in f.url)
        text = frame.inner_text("body")
        assert "Table 1 - Custom CNNs" in text and "model_10" in text and "Train accuracy (study)" in text
        assert frame.locator("tr").count() == 14  # header + 11 rungs + model_17 + model_18
        page.screenshot(path=str(tmp_path / "table1.png"))

        _open_item(page, report, "Tables", "Table 3 - The models")
        assert "What changed" in next(f for f in page.frames if "table3.html" in f.url).inner_text("body")

        for category, row in (
            ("Learning curves", "model_10"),
            ("Confusion matrices", "model_10"),
            ("Across models", "Per-class F1"),
        ):
            _open_item(page, report, category, row)
            images = page.locator("img")
            widths = [
                images.nth(i).evaluate("img => img.complete ? img.naturalWidth : 0") for i in range(images.count())
            ]
            assert max(widths, default=0) > 300, f"{category}: no rendered image"
            page.screenshot(path=str(tmp_path / f"{category.replace(' ', '_')}.png"))
        browser.close()


def test_table3_parameter_counts_are_those_of_the_saved_models(tiny_run):
    table = pd.read_csv(tiny_run["work"] / "reports" / "tiny" / "table3.csv").set_index("model")
    assert list(table.index) == list(tiny_run["models"])
    for name in ("model_01", "model_07", "model_10", "model_16"):
        model = keras.saving.load_model(
            tiny_run["work"] / "results" / "tiny" / "models" / name / "seed_0" / "model.keras"
        )
        assert table.loc[name, "params"] == model.count_params()
        assert table.loc[name, "layers"] == len(model.layers)
    assert table.loc["model_08", "changes"] == "batch_size: 512 → 128"
    assert table.loc["model_09", "augmentation"] == "RandomTranslation, RandomRotation"
    assert table.loc["model_16", "learning_rate"] == 1e-4


def test_provenance_and_benchmarks_are_reported(tiny_run):
    reports = tiny_run["work"] / "reports" / "tiny"
    prov = pd.read_csv(reports / "provenance.csv")
    assert len(prov) == len(tiny_run["models"])
    assert prov["TensorFlow"].eq("2.21.0").all() and prov["Device"].str.startswith("CPU").all()
    assert prov["Precision"].isin(["float32", "mixed_bfloat16"]).all() and prov["Data md5"].nunique() == 1
    assert prov["Code now"].eq("same").all() and prov["Training code"].nunique() == 1
    bench = pd.read_csv(reports / "benchmarks.csv")
    assert {"train/model_10/seed_0", "evaluate/model_10/seed_0", "preprocess"} <= set(bench["Job"])
    assert (bench["Wall time (s)"] > 0).all() and (bench["Peak RSS (MB)"] > 0).all()


def test_a_report_only_change_replans_only_report_jobs(tiny_run):
    """Edit the report code (Snakemake 9 compares content: a bare touch is not a change)."""
    args = ("-n", "--directory", str(tiny_run["work"]), "--configfile", TINY, *tiny_run["config"])
    scripts = [SCRIPTS / "report.py", SCRIPTS / "plots.py"]
    saved = {path: (path.read_bytes(), os.stat(path)) for path in scripts}
    try:
        with open(scripts[0], "a") as fh:
            fh.write("\n# a report-only change\n")
        # the forest plot reads Table 4, and MLflow records the redrawn figures
        assert _jobs(snakemake(*args).stdout) == {"report": 1, "plots": 1, "track": 1, "all": 1}
        with open(scripts[1], "a") as fh:
            fh.write("\n# a plot-only change\n")
        assert _jobs(snakemake(*args).stdout) == {"report": 1, "plots": 1, "track": 1, "all": 1}
    finally:
        for path, (blob, st) in saved.items():
            path.write_bytes(blob)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "Nothing to be done" in snakemake(*args).stdout


@pytest.fixture(scope="session")
def seeds_run(tiny_run, tmp_path_factory):
    """model_01 and model_10 with seeds 0 and 1, grown from a copy of the tiny run: its seed-0 runs
    of these two entries (same spec, seed and data) are kept, so only the seed-1 jobs and the
    report rules run. The other entries' runs and the MLflow store are left out of the copy."""
    keep = {"model_01", "model_10"}

    def ignore(folder, names):
        folder = Path(folder)
        if folder.parent.name == "tiny" and folder.name in ("models", "metrics"):
            return [n for n in names if n not in keep]  # publish.py reads every run under metrics/
        return ["mlflow"] if folder.name == "tiny" and folder.parent.name == "results" else []

    work = tmp_path_factory.mktemp("seeds_run") / "work"
    shutil.copytree(tiny_run["work"], work, symlinks=True, ignore=ignore)
    extra = work / "seeds.yaml"
    # The tiny preset gives every entry one seed through model_overrides; two here instead.
    extra.write_text(yaml.safe_dump({"model_overrides": {"seeds": [0, 1]}, "run_models": sorted(keep)}))
    proc = snakemake("--directory", str(work), "--configfile", TINY, str(extra), *tiny_run["config"], *TWO_AT_ONCE)
    jobs = _jobs(proc.stdout + proc.stderr)
    assert jobs.get("train") == 2 and jobs.get("evaluate") == 2, f"only the seed-1 runs train: {jobs}"
    return work


def test_two_seeds_give_mean_std_and_n(seeds_run):
    table = pd.read_csv(seeds_run / "reports" / "tiny" / "table1.csv").set_index("model")
    assert list(table.index) == ["model_01", "model_10"] and (table["n"] == 2).all()
    for name in table.index:
        runs = [
            json.loads(
                (seeds_run / "results" / "tiny" / "metrics" / name / f"seed_{seed}" / "metrics.json").read_text()
            )
            for seed in (0, 1)
        ]
        for column, values in (
            ("test_accuracy", [r["test"]["accuracy"] for r in runs]),
            ("f1_macro", [r["test"]["f1_macro"] for r in runs]),
            ("val_loss", [r["val"]["loss"] for r in runs]),
            ("loss", [r["kept_epoch"]["cross_entropy"] for r in runs]),
        ):
            assert table.loc[name, f"{column}_mean"] == pytest.approx(np.mean(values))
            assert table.loc[name, f"{column}_std"] == pytest.approx(np.std(values, ddof=1))
    md = (seeds_run / "reports" / "tiny" / "table1.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| model_10"))
    assert row.count("±") >= 9 and row.rstrip(" |").endswith("2")
    # Each seed trained its own model.
    seeds = {
        json.loads(
            (seeds_run / "results" / "tiny" / "metrics" / "model_10" / f"seed_{s}" / "metrics.json").read_text()
        )["provenance"]["seed"]
        for s in (0, 1)
    }
    assert seeds == {0, 1}


def test_the_results_page_shows_the_seed_spread_as_training_noise(seeds_run, tmp_path):
    """publish.py's page gives each multi-seed entry's test accuracy, mean ± std over its seeds."""
    import publish

    publish.main(str(seeds_run / "results" / "tiny"), str(tmp_path / "published"))
    readme = (tmp_path / "published" / "README.md").read_text()
    table = pd.read_csv(seeds_run / "reports" / "tiny" / "table1.csv").set_index("model")
    noise = readme[readme.index("**Training noise**") :].split("\n\n")[0].replace("\n", " ")
    for name in ("model_01", "model_10"):
        mean, std = table.loc[name, "test_accuracy_mean"], table.loc[name, "test_accuracy_std"]
        assert f"{name} {mean:.4f} ± {std:.4f} over 2 seeds" in noise
    assert "No step has both of its runs finished yet." in readme  # model_10's base, model_09, did not run
    # Table 1 on the page: our test accuracy minus the study's on the same images, per rung.
    entries = json.loads((seeds_run / "results" / "tiny" / "specs" / "models.json").read_text())
    for name in ("model_01", "model_10"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| {name} |"))
        gap = table.loc[name, "test_accuracy_mean"] - entries[name]["published"]["val_accuracy"]
        assert f"| {gap:+.4f} |" in row
    # Where early stopping ended each seed of model_10 (early stopping from model_06 on; model_01 has none).
    assert "model_01, the same configuration" not in readme
    for seed in (0, 1):
        m = json.loads(
            (seeds_run / "results" / "tiny" / "metrics" / "model_10" / f"seed_{seed}" / "metrics.json").read_text()
        )
        assert f"seed {seed}: stopped after {m['epochs_run']}, kept epoch {m['kept_epoch']['epoch']}, " in readme
    # The machine and precision, as the runs' provenance records them (this machine's).
    device = m["provenance"]["device"]
    ran_on = (
        f"a {device['count']}-core CPU ({device['name']})"
        if device["kind"] == "CPU"
        else f"a {device['kind']} ({device['name']})"
    )
    assert f"- **Precision.** {m['provenance']['precision']} on {ran_on};" in readme
    assert f"every run here trained on {ran_on};" in readme
    gpu = {"provenance": {"device": {"kind": "GPU", "name": "NVIDIA H200", "count": 1}, "precision": "mixed_float16"}}
    assert publish.machines([gpu, m, gpu]) == f"a GPU (NVIDIA H200) and {ran_on}"
    assert publish.precisions([gpu, m]) == ", ".join(sorted({"mixed_float16", m["provenance"]["precision"]}))


def test_the_tables_target_regenerates_the_tables_alone(seeds_run):
    table = seeds_run / "reports" / "tiny" / "table1.md"
    table.unlink()
    proc = snakemake(
        "tables", "--directory", str(seeds_run), "--configfile", TINY, str(seeds_run / "seeds.yaml"), "--cores", "2"
    )
    assert table.is_file()
    jobs = _jobs(proc.stdout + proc.stderr)
    assert jobs == {"report": 1, "tables": 1}, jobs


def test_report_scripts_need_no_tensorflow():
    """Regeneration stays fast: the report and plot scripts never import TensorFlow."""
    code = "import sys, report, plots; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], cwd=SCRIPTS, check=True)


def test_time_to_accuracy_reads_the_evaluated_model_after_each_epoch():
    from cnnstudy.tables import time_to

    metrics = {
        "time_to_accuracy": [
            {"train_seconds": 100.0, "test_accuracy": 0.80},
            {"train_seconds": 200.0, "test_accuracy": 0.90},
        ],
        "train_seconds": 210.0,
        "test": {"accuracy": 0.95},  # not a point of its own: the last epoch's point is the final model
    }
    assert time_to(metrics, 0.87) == 200.0
    assert np.isnan(time_to(metrics, 0.94))
    assert np.isnan(time_to({"train_seconds": 1.0, "test": {"accuracy": 0.99}}, 0.5))  # not recorded


def test_results_trained_by_other_code_are_marked(tiny_run, tmp_path):
    """Metrics whose training code hash differs from the current code get a † and 'differs'."""
    import report

    results = tiny_run["work"] / "results" / "tiny"
    metrics = []
    for name in ("model_01", "model_10"):
        m = json.loads((results / "metrics" / name / "seed_0" / "metrics.json").read_text())
        if name == "model_10":  # as if trained before the last change to the training code
            m["provenance"]["training"]["code_hash"] = "0123456789abcdef"
        (tmp_path / f"{name}.json").write_text(json.dumps(m))
        metrics.append(str(tmp_path / f"{name}.json"))
    report.main(str(results / "specs" / "models.json"), metrics, str(tmp_path / "out"), only=["table1", "provenance"])
    table = pd.read_csv(tmp_path / "out" / "table1.csv").set_index("model")
    assert table["trained_by_other_code"].to_dict() == {"model_01": False, "model_10": True}
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "| model_10 †" in md and "| model_01 " in md and "| model_01 †" not in md
    prov = pd.read_csv(tmp_path / "out" / "provenance.csv").set_index("Model")
    assert prov.loc["model_10", "Code now"].startswith("differs") and prov.loc["model_01", "Code now"] == "same"


def test_a_new_table_is_one_registry_entry(tiny_run, tmp_path, monkeypatch):
    """Register a table (name, title, caption, builder): report.py writes it in every format."""
    import report

    from cnnstudy import reporting, tables

    def sizes(inputs):
        frame = inputs.runs[["model", "params"]].drop_duplicates("model")
        return (
            frame,
            [tables.Column("model", "Model"), tables.Column("params", "Parameters")],
            "From model.count_params().",
        )

    monkeypatch.setattr(tables, "REGISTRY", [*tables.REGISTRY, tables.Table("sizes", "Model sizes", "table", sizes)])
    results = tiny_run["work"] / "results" / "tiny"
    metrics = sorted(str(p) for p in results.glob("metrics/*/seed_0/metrics.json"))
    written = report.main(str(results / "specs" / "models.json"), metrics, str(tmp_path), only=["sizes"])
    assert set(written) == {"sizes"} and {p.name for p in tmp_path.iterdir()} == {
        f"sizes.{f}" for f in reporting.FORMATS
    }
    assert "| model_10 " in (tmp_path / "sizes.md").read_text()


def test_publish_writes_the_study_folder_from_two_results_directories(tiny_run, tmp_path):
    """publish.py: the study's run and a later rung run in a directory of its own, in one folder."""
    import publish

    results = tiny_run["work"] / "results" / "tiny"
    study, later = tmp_path / "study", tmp_path / "later"
    shutil.copytree(results / "specs", study / "specs")
    shutil.copytree(results / "specs", later / "specs")
    entries = json.loads((results / "specs" / "models.json").read_text())
    (study / "specs" / "models.json").write_text(json.dumps({k: v for k, v in entries.items() if k != "model_18"}))
    (later / "specs" / "models.json").write_text(json.dumps({"model_18": entries["model_18"]}))
    for name in ("model_01", "model_02", "model_18"):
        home = later if name == "model_18" else study
        for sub in ("metrics", "models"):
            shutil.copytree(results / sub / name, home / sub / name)
    out = tmp_path / "published"
    written = publish.main([str(study), str(later)], str(out))
    assert written["runs"] == 3 and list(written["table1"]["model"]) == ["model_01", "model_02", "model_18"]
    assert {p.name for p in (out / "histories").iterdir()} == {
        "model_01_seed0.csv",
        "model_02_seed0.csv",
        "model_18_seed0.csv",
    }
    assert (out / "metrics" / "model_18_seed0.json").is_file() and (out / "figures" / "steps_forest.png").is_file()
    readme = (out / "README.md").read_text()
    assert "| model_18 |" in readme and "3 of " in readme
    # An entry run in two places is refused, naming both; nothing is published then.
    shutil.copytree(results / "metrics" / "model_01", later / "metrics" / "model_01")
    (later / "specs" / "models.json").write_text(json.dumps({k: entries[k] for k in ("model_01", "model_18")}))
    with pytest.raises(JobError, match=re.escape(f"model_01 has runs in both {study} and {later}")):
        publish.main([str(study), str(later)], str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()


def test_the_published_folder_is_what_this_checkout_writes(tmp_path):
    """reports/study is regenerated whenever its formats or the code's hashes change: a refresh of
    a copy of it (from the folder alone, as `make verify-published RECORD=1` does) changes no file."""
    import publish

    from conftest import REPO

    published, copy = REPO / "reports" / "study", tmp_path / "study"
    shutil.copytree(published, copy)
    publish.refresh(str(copy))
    files = {path.relative_to(folder) for folder in (published, copy) for path in folder.rglob("*") if path.is_file()}
    changed = sorted(
        str(name)
        for name in files
        if not ((published / name).is_file() and (copy / name).is_file())
        or (published / name).read_bytes() != (copy / name).read_bytes()
    )
    assert not changed, f"run `python tools/publish.py --refresh --out reports/study` and commit: {changed}"


def test_the_page_says_where_to_reproduce_each_checked_run_from():
    """A run checked with this checkout's training code is reproduced from this checkout, whatever
    commit checked it; any other from the commit of its latest check; an unchecked run from none."""
    import publish

    from cnnstudy import provenance

    here = provenance.code_hash("train.py")

    def run(*checks):
        return {
            "provenance": {
                "verified": [
                    {"commit": commit * 40, "epochs": epochs, "code_hashes": {"training": code}}
                    for commit, epochs, code in checks
                ]
            }
        }

    metrics = [
        run(("a", "1-2", "old"), ("a", "all 60 and the evaluation", "old")),
        run(("a", "1-2", "old"), ("c", "1-2", here)),  # checked again since: this checkout's code
        run(("b", "1-2", here)),
        run(("a", "1-2", "old"), ("d", "1-2", "older")),
        run(),
    ]
    line = next(line for line in publish.reproduced_by(metrics, 5) if line.startswith("**Reproduce"))
    assert line.startswith(
        f"**Reproduce these runs from:** this checkout, or any whose training code hashes {here} "
        f"(2 of 5 runs: epochs 1-2); commit {'a' * 12} (1 of 5 runs: epochs 1-2, "
        f"1 of 5 runs: epochs all 60 and the evaluation); commit {'d' * 12} (1 of 5 runs: epochs 1-2): "
    ), line
    assert not any(line.startswith("**Reproduce") for line in publish.reproduced_by([run()], 1))


def test_a_step_is_differenced_over_every_pair_of_training_runs():
    """Table 4's Δ per pair of runs: same seed where both have it, a single-seed entry against each
    seed of the other; a sign that changes between pairs is flagged."""
    from cnnstudy import stats

    accuracy = {("a", 0): 0.80, ("b", 0): 0.82, ("b", 1): 0.78, ("b", 2): 0.81, ("c", 1): 0.90, ("c", 2): 0.92}
    correct = {run: np.arange(1000) < round(acc * 1000) for run, acc in accuracy.items()}
    runs = pd.DataFrame([{"model": m, "seed": s, "test_accuracy": a} for (m, s), a in accuracy.items()])
    models = {"a": {}, "b": {"base": "a"}, "c": {"base": "b"}}
    frame = stats.steps_frame(models, runs, correct).set_index("model")
    # b (three seeds) against a (one): each seed of b against a's seed 0; the sign changes.
    assert frame.loc["b", "diff_per_seed"] == "+0.0200 / -0.0200 / +0.0100" and not frame.loc["b", "sign_holds"]
    # c against b: the seeds both have (1 and 2); c's seed 1 against b's seed 1.
    assert frame.loc["c", "diff_per_seed"] == "+0.1200 / +0.1100" and frame.loc["c", "sign_holds"]
    assert frame.loc["c", "seed"] == 1 and frame.loc["c", "diff"] == pytest.approx(0.12)


def test_the_results_page_names_every_claimed_step_within_training_noise():
    """A sign that changes between pairs of runs is named, whether the study's claim held for seed 0 or not."""
    import publish

    from cnnstudy import stats

    accuracy = {
        ("a", 0): 0.70,
        ("b", 0): 0.80,
        ("b", 1): 0.68,
        ("b", 2): 0.81,
        ("c", 0): 0.70,
        ("c", 1): 0.69,
        ("c", 2): 0.85,
        ("d", 0): 0.90,
    }
    correct = {run: np.arange(1000) < round(acc * 1000) for run, acc in accuracy.items()}
    runs = pd.DataFrame([{"model": m, "seed": s, "test_accuracy": a} for (m, s), a in accuracy.items()])
    claims = {"b": "improved", "c": "no significant change", "d": "improved"}
    models = {"a": {}, "b": {"base": "a"}, "c": {"base": "b"}, "d": {"base": "c"}}
    for name, verdict in claims.items():
        models[name]["claim"] = {"verdict": verdict, "says": "..."}
    for name, published in {"a": 0.60, "b": 0.70, "c": 0.65}.items():  # the study's own numbers; d has none
        models[name]["published"] = {"val_accuracy": published}
    table4 = stats.steps_frame(models, runs, correct)
    assert table4["study_diff"].tolist()[:2] == pytest.approx([0.10, -0.05]) and np.isnan(table4["study_diff"].iloc[2])
    # Seed 0: b improved (held), c worse (not held), d improved (held); b and c change sign between pairs.
    assert list(table4["agrees"]) == [True, False, True] and list(table4["sign_holds"]) == [False, False, True]
    text = " ".join(publish.claims_summary(table4))
    assert text.startswith("2 of 3 of the study's step claims held")
    assert "3 of the claimed steps can be checked against other training runs" in text
    assert "changes from one pair of runs to another for b vs a: the claim held" in text
    assert "also changes between pairs of runs for c vs b, where our verdict went against the study's claim" in text
    # c's claim (no change) did not hold for seed 0 (worse), and the study's own numbers also fell.
    assert "its own published numbers moved our way for c vs b (study -0.0500, ours -0.1000)" in text
    assert "The claim held for us" not in text  # b: the study's numbers rose (+0.10), as ours did
    models["b"]["published"]["val_accuracy"] = 0.55
    text = " ".join(publish.claims_summary(stats.steps_frame(models, runs, correct)))
    assert (
        "The claim held for us, though the study's own numbers moved the other way, for b vs a (study -0.0500" in text
    )
    models["b"]["published"]["val_accuracy"] = 0.70
    # A verdict of no significant change is not "the study's way" or "the other way" of one pair of numbers.
    unjudged = stats.steps_frame(models, runs, correct)
    unjudged.loc[0, ["verdict", "agrees"]] = ["no significant change", False]
    assert "b vs a (study" not in " ".join(publish.claims_summary(unjudged))
    models["c"]["published"]["val_accuracy"] = 0.75
    text = " ".join(publish.claims_summary(stats.steps_frame(models, runs, correct)))
    assert "moved our way" not in text and "other way for c vs b (study +0.0500, ours -0.1000)" in text
    table4["sign_holds"] = True
    assert "each keeps its sign in every pair of runs" in " ".join(publish.claims_summary(table4))


def test_the_forest_plot_marks_every_pair_of_training_runs(tmp_path, monkeypatch):
    """Table 4's forest plot, drawn from its CSV: each pair of runs of a multi-seed step as a mark."""
    from cnnstudy import figures, stats

    accuracy = {("a", 0): 0.80, ("b", 0): 0.82, ("b", 1): 0.78}
    correct = {run: np.arange(1000) < round(acc * 1000) for run, acc in accuracy.items()}
    runs = pd.DataFrame([{"model": m, "seed": s, "test_accuracy": a} for (m, s), a in accuracy.items()])
    stats.steps_frame({"a": {}, "b": {"base": "a"}}, runs, correct).to_csv(tmp_path / "table4.csv", index=False)
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig))
    figures.forest(pd.read_csv(tmp_path / "table4.csv"), tmp_path / "forest.png")
    marks = [line for line in drawn[0].axes[0].get_lines() if line.get_gid() == "run_pairs"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == pytest.approx([0.02, -0.02])


def test_paired_statistics_come_from_scipy_and_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar

    from cnnstudy import stats

    rng = np.random.default_rng(0)
    ref = rng.random(2000) < 0.80
    new = ref.copy()
    new[np.flatnonzero(~ref)[:60]] = True  # 60 images only the new model gets right
    new[np.flatnonzero(ref)[:20]] = False  # 20 only the old one does
    result = stats.paired(new, ref)
    assert result["diff"] == pytest.approx((60 - 20) / 2000) and (result["only_new"], result["only_ref"]) == (60, 20)
    both, neither = int(np.sum(new & ref)), int(np.sum(~new & ~ref))
    assert result["p"] == pytest.approx(mcnemar([[both, 60], [20, neither]], exact=True).pvalue)
    assert result["ci_low"] < result["diff"] < result["ci_high"] and result["ci_low"] > 0
    assert stats.verdict(0.02, 0.001) == "improved" and stats.verdict(-0.02, 0.001) == "worse"
    assert stats.verdict(0.02, 0.2) == "no significant change"


def test_the_training_code_hash_is_what_train_imports_by_content(tmp_path):
    """A report module's change leaves the training code hash alone; a training module's changes
    it; a moved script (same content, same imports) is no change."""
    from cnnstudy import provenance

    root = tmp_path / "workflow_scripts"
    shutil.copytree(provenance.SCRIPTS, root, ignore=shutil.ignore_patterns("__pycache__"))
    scripts = ("train.py", "evaluate.py", "report.py")
    before = {s: provenance.code_hash(s, root) for s in scripts}
    assert before["train.py"] == provenance.code_hash("train.py")
    closure = {p.relative_to(root).as_posix() for p in provenance.import_closure("train.py", root)}
    assert {
        "train.py",
        "cnnstudy/training.py",
        "cnnstudy/models.py",
        "cnnstudy/checkpoint.py",
        "cnnstudy/predict.py",
        "cnnstudy/datasets.py",
        "cnnstudy/runtime.py",
        "cnnstudy/weights.py",
    } <= closure
    assert not {"cnnstudy/tables.py", "cnnstudy/stats.py", "report.py", "publish.py"} & closure

    with open(root / "cnnstudy" / "tables.py", "a") as fh:
        fh.write("\n# a report-only change\n")
    after = {s: provenance.code_hash(s, root) for s in scripts}
    assert after["train.py"] == before["train.py"] and after["evaluate.py"] == before["evaluate.py"]
    assert after["report.py"] != before["report.py"]

    (root / "jobs").mkdir()
    shutil.move(root / "train.py", root / "jobs" / "train.py")
    assert provenance.code_hash("jobs/train.py", root) == before["train.py"], "a moved file is not a change"

    with open(root / "cnnstudy" / "training.py", "a") as fh:
        fh.write("\n# a change to the training loop\n")
    assert provenance.code_hash("jobs/train.py", root) != before["train.py"]
    assert provenance.code_hash("evaluate.py", root) == before["evaluate.py"], "evaluation does not import training"
