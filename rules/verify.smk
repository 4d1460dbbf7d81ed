# Verification stage (on demand: `make verify-published`, or `snakemake verify_published`):
# retrain each published run of reports/study for its first epochs with the current code, and
# require its published history, bit for bit. Not part of `all`.


rule verify_run:
    input:
        published=f"{config['verify']['published']}/metrics/{{model}}_seed{{seed}}.json",
        history=f"{config['verify']['published']}/histories/{{model}}_seed{{seed}}.csv",
        spec=rules.spec.output[0],
        data=rules.preprocess.output.npz,
        manifest=rules.preprocess.output.manifest,
        script=script("verify_published.py"),
    output:
        f"{RESULTS}/verify/{{model}}/seed_{{seed}}/epochs_{{epochs}}.json",
    log:
        f"{RESULTS}/logs/verify/{{model}}/seed_{{seed}}/epochs_{{epochs}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/verify/{{model}}/seed_{{seed}}/epochs_{{epochs}}.tsv"
    conda:
        TF_ENV
    threads: recorded_threads
    params:
        published=lambda wildcards, input: Path(input.published).parent.parent,
        scratch=lambda wildcards, output: f"{output[0]}.work",
        # A check holds for the code that made it: changed training or evaluation code checks again.
        code=[CODE["train"], CODE["evaluate"]],
        on_other_machine=config["verify"]["on_other_machine"],
    shell:
        "python {input.script} --published {params.published:q} --model {wildcards.model}"
        " --seed {wildcards.seed} --spec {input.spec:q} --data {input.data:q}"
        " --manifest {input.manifest:q} --epochs {wildcards.epochs} --scratch {params.scratch:q}"
        " --out {output:q} --threads {threads} --on-other-machine {params.on_other_machine} > {log} 2>&1"


rule verify_published:
    input:
        # A function, so the published runs are read only when this target is asked for.
        lambda wildcards: [
            f"{RESULTS}/verify/{model}/seed_{seed}/epochs_{config['verify']['epochs']}.json"
            for model, seed in published_runs()
        ],
