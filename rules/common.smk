# Configuration, validated and resolved once before any job is planned.
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow_scripts"))
from cnnstudy import cifar, configuration, protocols, provenance, tables
from snakemake.logging import logger

# Validates config.yaml (plus --config/--configfile overrides) against the schema, fills
# defaults and resolves the ladder's `base:` inheritance: a bad config stops here.
MODELS = configuration.load(config)

# profiles/default (picked up automatically) caps `gpu` for a workstation; as a workflow
# profile it overrides --profile settings, so on a cluster it would run one GPU job at a time.
if workflow.non_local_exec:
    _gpu_limit = workflow.global_resources.get("gpu")
    _gpu_limit = getattr(_gpu_limit, "value", _gpu_limit)
    if isinstance(_gpu_limit, int) and _gpu_limit < 2:
        logger.warning(
            f"resource limit gpu={_gpu_limit} (from profiles/default?): only {_gpu_limit} GPU job(s) "
            "at a time on the cluster. Add --workflow-profile none to cluster runs."
        )
RESULTS = config["results_dir"]
REPORTS = config["reports_dir"]
RAW_DIR = "resources/cifar-10-batches-py"
WEIGHTS = config["weights_cache"]
# The code that makes a result, hashed once per run (cnnstudy.provenance): params of the rules
# whose outputs depend on it.
CODE = {stage: provenance.code_hash(f"{stage}.py") for stage in ("train", "evaluate")}


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    seed=r"\d+",
    backbone=r"[A-Za-z0-9]+",
    size=r"\d+",
    epochs=r"\d+",


def script(name):
    """Path of a job script, independent of the working directory."""
    return str(Path(workflow.basedir) / "workflow_scripts" / name)


# Training jobs' conda environment: TensorFlow CPU-only or its GPU build (tensorflow[and-cuda]);
# on the JAX backend, JAX (CPU).
TF_ENV = (
    "../envs/jax.yaml"
    if config["backend"] == "jax"
    else f"../envs/tensorflow{'-gpu' if config['tensorflow_build'] == 'gpu' else ''}.yaml"
)


def runs(pattern):
    """``pattern`` filled for every (model, seed) pair: each entry with its own seeds."""
    return [
        pattern.format(model=name, seed=seed)
        for name, spec in MODELS.items()
        for seed in spec["seeds"]
    ]


def training_spec(model):
    """The part of a model entry that training depends on, as canonical JSON; with the
    backend where it is not TensorFlow (the numbers differ between backends)."""
    spec = configuration.training_part(MODELS[model])
    if config["backend"] != "tensorflow":
        spec["backend"] = config["backend"]
    return json.dumps(spec, sort_keys=True, indent=1)


def table_info():
    """The resolved entries, in config order, as JSON: what the tables and plots describe."""
    return json.dumps(MODELS, indent=1)


def write_text(path, text, log):
    """Body of the tiny config-to-file rules: atomic write, one log line."""
    from cnnstudy.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(f"{text}\n")
    Path(log).write_text(f"wrote {path}\n")


def weights_manifest(backbone):
    return f"{WEIGHTS}/{backbone['name']}-{backbone['input_size']}px.json"


def weights_input(wildcards):
    """Train input: the fetched ImageNet manifest, a user's weights file, or nothing."""
    weights = configuration.weights_source(MODELS[wildcards.model])
    if weights == "none":
        return []
    if weights == "imagenet":
        return weights_manifest(MODELS[wildcards.model]["backbone"])
    return weights


def refit_epochs_from(wildcards):
    """A refit job's epoch count: its holdout run's metrics. The published file, where it was
    trained or verified with the refit's holdout spec (so published runs are not retrained);
    else the holdout run's, trained and evaluated in this results directory."""
    entry = MODELS[wildcards.model]
    if protocols.of(entry) != "refit":
        return []
    holdout = protocols.holdout_spec(configuration.training_part(entry))
    name, seed = holdout["name"], wildcards.seed
    published = Path(config["refit_epochs_from"]) / f"{name}_seed{seed}.json"
    spec_hash = configuration.spec_hash(holdout)
    if published.is_file() and protocols.vouches(
        json.loads(published.read_text()), spec_hash
    ):
        return str(published)
    if name not in MODELS or int(seed) not in MODELS[name]["seeds"]:
        raise ValueError(
            f"{wildcards.model} seed {seed} refits {name} seed {seed}, whose metrics are neither in "
            f"{config['refit_epochs_from']} (trained with this spec, {spec_hash}) nor planned in this run: "
            f"add {name} with seed {seed} to the run (run_models, seeds)"
        )
    return rules.evaluate.output.metrics.format(model=name, seed=seed)


def train_options(wildcards, input):
    """The train job's optional flags: ImageNet weights, a refit's epoch count."""
    options = []
    if configuration.weights_source(MODELS[wildcards.model]) == "imagenet":
        options.append(f"--weights-manifest {input.weights}")
    if input.epochs_from:
        options.append(f"--epochs-from {input.epochs_from}")
    return " ".join(options)


def all_weights_manifests():
    return sorted(
        {
            weights_manifest(spec["backbone"])
            for spec in MODELS.values()
            if configuration.weights_source(spec) == "imagenet"
        }
    )


def benchmark_files(wildcards):
    """Benchmark TSVs of the heavy jobs, for the benchmark summary table."""
    jobs = runs("{model}/seed_{seed}.tsv")
    stages = expand(f"{RESULTS}/benchmarks/{{stage}}", stage=("train", "evaluate"))
    return [f"{stage}/{job}" for stage in stages for job in jobs] + [
        rules.preprocess.benchmark
    ]


def train_runtime(wildcards, attempt):
    """Minutes of wall time for a training job on a cluster GPU, by model family.

    Transfer models (big backbones, two phases) get more; every retry gets more again.
    """
    family_minutes = 180 if MODELS[wildcards.model].get("backbone") else 90
    return family_minutes * attempt


def published_runs():
    """The published runs to check, as (model, seed): config verify.runs, else all of them."""
    root = Path(config["verify"]["published"])
    names = config["verify"]["runs"] or sorted(
        p.stem for p in (root / "metrics").glob("*_seed*.json")
    )
    found = [re.fullmatch(r"(.+)_seed(\d+)", name).groups() for name in names]
    unknown = [m for m, _ in found if m not in MODELS]
    if unknown:
        raise ValueError(
            f"verify: {', '.join(unknown)} not in this config's models (run_models? the refit and study "
            "runs are presets/protocols.yaml's: make verify-published loads it)"
        )
    return found


def recorded_threads(wildcards):
    """The intra-op threads the published run trained with: the job's threads."""
    metrics = f"{config['verify']['published']}/metrics/{wildcards.model}_seed{wildcards.seed}.json"
    return json.loads(Path(metrics).read_text())["provenance"]["threads"]["intra_op"]
