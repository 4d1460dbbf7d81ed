# Speed benchmark, not part of `all`: `snakemake benchmark` writes reports/benchmark.md.
# It measures this machine, so run it alone on an otherwise idle machine.

# The first also runs the concurrency test.
BENCHMARK_MODELS = ["model_10", "model_17", "model_18"]
# Keras' backends side by side on this machine's CPU: TensorFlow's GPU build (tensorflow_build: gpu)
# has no JAX beside it, so there the backends section is left out.
BENCHMARK_SECTIONS = ["paths", "concurrency"] + (
    ["backends"] if config["tensorflow_build"] != "gpu" else []
)


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
    params:
        sections=BENCHMARK_SECTIONS,
    shell:
        "python {input.script} --data {input.data:q} --specs {input.specs:q}"
        " --sections {params.sections} --out {output:q} --threads {threads} > {log} 2>&1"
