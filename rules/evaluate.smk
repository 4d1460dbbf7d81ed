# Evaluation stage: scikit-learn metrics of each trained model on the untouched test set.


rule evaluate:
    input:
        data=rules.preprocess.output.npz,
        manifest=rules.preprocess.output.manifest,
        model=rules.train.output.model,
        history=rules.train.output.history,
        info=rules.train.output.info,
        script=script("evaluate.py"),  # a changed evaluation re-evaluates, never retrains
    output:
        metrics=f"{RESULTS}/metrics/{{model}}/seed_{{seed}}/metrics.json",
        probs=f"{RESULTS}/metrics/{{model}}/seed_{{seed}}/test_probs.npz",
    log:
        f"{RESULTS}/logs/evaluate/{{model}}/seed_{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}/seed_{{seed}}.tsv"
    conda:
        TF_ENV
    threads: 2
    params:
        tta=lambda wildcards: MODELS[wildcards.model]["tta"],
    shell:
        "python {input.script} --data {input.data:q} --manifest {input.manifest:q}"
        " --model {input.model:q} --history {input.history:q} --train-info {input.info:q}"
        " --metrics-out {output.metrics:q} --probs-out {output.probs:q}"
        " --tta {params.tta} --threads {threads} > {log} 2>&1"
