# Data stage: fetch the archive (head node), verify, normalise into one .npz.


localrules:
    download,


rule download:
    output:
        expand("{dir}/{name}", dir=RAW_DIR, name=cifar.MD5),
    log:
        f"{RESULTS}/logs/download.log",
    retries: 3
    conda:
        "../envs/data.yaml"
    params:
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
        script=script("download.py"),
    run:
        # The source is deliberately not a param: the files are checked against fixed md5s,
        # so switching between a mirror and the official URL must not redo anything downstream.
        source = config["data_source"]
        shell(
            "python {params.script} --source {source:q} --outdir {params.outdir:q} > {log} 2>&1"
        )


rule preprocess:
    input:
        rules.download.output,
    output:
        npz=f"{RESULTS}/data/cifar10.npz",
        manifest=f"{RESULTS}/data/cifar10.json",
    log:
        f"{RESULTS}/logs/preprocess.log",
    benchmark:
        f"{RESULTS}/benchmarks/preprocess.tsv"
    conda:
        "../envs/data.yaml"
    params:
        raw_dir=lambda wildcards, input: os.path.dirname(input[0]),
        val_fraction=config["val_fraction"],
        seed=config["split_seed"],
        subset=lambda wildcards: " ".join(
            f"--subset-{split} {config['subset'].get(split)}"
            for split in ("train", "val", "test")
        ),
        script=script("preprocess.py"),
    shell:
        "python {params.script} --raw-dir {params.raw_dir:q} --out {output.npz:q}"
        " --manifest {output.manifest:q} --val-fraction {params.val_fraction}"
        " --seed {params.seed} {params.subset} > {log} 2>&1"
