"""The published study results stay true (reports/study/, written by workflow_scripts/publish.py).

One cheap rung's first epoch is trained again on the full data, through the workflow, with
the thread count the study run used; its history row must equal the published one in every
column but wall-clock timing (training is deterministic on this machine kind). If a code or
config change alters the numerics, this fails: regenerate the published results.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import REPO, require_mirror, snakemake

PUBLISHED = REPO / "reports" / "study"
RUNG = "model_01"  # the cheapest rung: one epoch on 45 000 images takes seconds
TIMING = ["epoch_time", "images_per_s"]


@pytest.mark.slow
def test_the_published_first_epoch_is_reproduced(tmp_path):
    mirror = require_mirror()
    history = PUBLISHED / "histories" / f"{RUNG}_seed0.csv"
    assert history.is_file(), f"{history} is missing: publish the study run (workflow_scripts/publish.py)"
    provenance = json.loads((PUBLISHED / "metrics" / f"{RUNG}_seed0.json").read_text())["provenance"]
    threads = provenance["threads"]["intra_op"]
    extra = tmp_path / "one-epoch.yaml"
    extra.write_text(yaml.safe_dump({"run_models": [RUNG], "model_overrides": {"epochs": 1}}))
    target = f"results/models/{RUNG}/seed_0/history.csv"
    snakemake(target, "--directory", str(tmp_path), "--configfile", str(extra), "--config", f"data_source={mirror}",
              "--cores", str(threads), timeout=900)  # fmt: skip
    manifest = json.loads((tmp_path / "results" / "data" / "cifar10.json").read_text())
    assert manifest["md5"] == provenance["data"]["npz_md5"], "the preprocessed data differ from the study run's"
    got = pd.read_csv(tmp_path / target).drop(columns=TIMING)
    expected = pd.read_csv(history).drop(columns=TIMING).iloc[:1]
    message = f"{RUNG} epoch 1 no longer matches reports/study: the published results must be regenerated"
    pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=message)
