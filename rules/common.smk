# Configuration, validated and resolved once before any job is planned.
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))
from cnnstudy import cifar, configuration

# Validates config.yaml (plus --config/--configfile overrides) against the schema, fills
# defaults and resolves the ladder's `base:` inheritance: a bad config stops here.
MODELS = configuration.load(config)
SEEDS = config["seeds"]
RESULTS = config["results_dir"]
REPORTS = config["reports_dir"]
RAW_DIR = "resources/cifar-10-batches-py"


wildcard_constraints:
    model="|".join(MODELS),
    seed=r"\d+",


def script(name):
    """Path of a job script, independent of the working directory."""
    return str(Path(workflow.basedir) / "workflow_scripts" / name)
