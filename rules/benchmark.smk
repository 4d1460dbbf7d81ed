# Speed benchmark, not part of `all`: `snakemake benchmark` writes reports/benchmark.md.
# It measures this machine, so run it alone on an otherwise idle machine.

BENCHMARK_MODELS = ["model_10", "model_17"]  # the first also runs the concurrency test


rule benchmark:
    input:
        data=rules.preprocess.output.npz,
        specs=expand(rules.spec.output[0], model=BENCHMARK_MODELS),
        script=script("benchmark.py"),
    output:
        f"{REPORTS}/benchmark.md",
    log:
        f"{RESULTS}/logs/benchmark.log",
    conda:
        TF_ENV
    threads: 64  # scaled down to --cores: the benchmark should have the whole machine
    shell:
        "python {input.script} --data {input.data:q} --specs {input.specs:q}"
        " --out {output:q} --threads {threads} > {log} 2>&1"
