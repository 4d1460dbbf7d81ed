# Training stage: one job per model and seed.


localrules:
    spec,
    fetch_weights,
    weights,


# Rewritten only when the training-relevant part of the entry changes (Snakemake's params
# trigger), so a changed learning rate retrains that model and nothing else.
rule spec:
    output:
        f"{RESULTS}/specs/{{model}}.json",
    log:
        f"{RESULTS}/logs/spec/{{model}}.log",
    params:
        spec=lambda wildcards: training_spec(wildcards.model),
    run:
        write_text(output[0], params.spec, log[0])


# Keras' own ImageNet file for a backbone, into the cache, on the head node: compute nodes
# without internet then train from disk. `snakemake weights` fetches them all ahead.
rule fetch_weights:
    output:
        f"{WEIGHTS}/{{backbone}}-{{size}}px.json",
    log:
        f"{RESULTS}/logs/fetch_weights/{{backbone}}-{{size}}px.log",
    retries: 3
    conda:
        TF_ENV
    params:
        cache=lambda wildcards, output: os.path.dirname(output[0]),
        script=script("fetch_weights.py"),
    run:
        # Like the data source, the mirror is not a param: the file is hash-verified, so
        # where it came from must not retrain anything.
        mirror = (
            f"--mirror {config['weights_mirror']}"
            if config["weights_mirror"]
            else ""
        )
        shell(
            "python {params.script} --backbone {wildcards.backbone} --input-size {wildcards.size}"
            " --cache {params.cache:q} --manifest {output:q} {mirror} > {log} 2>&1"
        )


rule weights:
    input:
        all_weights_manifests(),


rule train:
    input:
        data=rules.preprocess.output.npz,
        spec=rules.spec.output[0],
        weights=weights_input,
        epochs_from=refit_epochs_from,  # a refit's holdout run's metrics (its kept epoch)
    output:
        model=f"{RESULTS}/models/{{model}}/seed_{{seed}}/model.keras",
        history=f"{RESULTS}/models/{{model}}/seed_{{seed}}/history.csv",
        info=f"{RESULTS}/models/{{model}}/seed_{{seed}}/train_info.json",
    log:
        f"{RESULTS}/logs/train/{{model}}/seed_{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{model}}/seed_{{seed}}.tsv"
    conda:
        TF_ENV
    threads: 8
    resources:
        gpu=1,
        runtime=train_runtime,
    params:
        # Resumable state (sealed per-epoch checkpoints: cnnstudy/checkpoint.py) outside the
        # outputs: Snakemake's cleanup of a failed or killed job's outputs must not delete it.
        state_dir=lambda wildcards: f"{RESULTS}/train_state/{wildcards.model}/seed_{wildcards.seed}",
        precision=config["precision"],
        device=f"--require-gpu {config['require_gpu']} --deterministic-ops {str(config['deterministic_ops']).lower()}",
        # Optional flags: ImageNet weights, a refit's epoch count. Still named `weights`: the
        # shell text below is Snakemake's code trigger, and a new name would rerun every run.
        weights=train_options,
        script=script("train.py"),
    shell:
        "python {params.script} --data {input.data:q} --spec {input.spec:q}"
        " --model-out {output.model:q} --history-out {output.history:q} --info-out {output.info:q}"
        " --state-dir {params.state_dir:q} --seed {wildcards.seed} --threads {threads}"
        " --precision {params.precision} {params.device} {params.weights} > {log} 2>&1"
