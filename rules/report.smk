# Report stage: aggregate every model's metrics into the tables. Cheap and rerun whenever
# the report code, the metrics or the models' descriptions change; never retrains.


localrules:
    model_info,


rule model_info:
    output:
        f"{RESULTS}/specs/models.json",
    log:
        f"{RESULTS}/logs/model_info.log",
    params:
        info=table_info(),
    run:
        write_text(output[0], params.info, log[0])


rule report:
    input:
        models=rules.model_info.output[0],
        metrics=expand(rules.evaluate.output.metrics, model=MODELS, seed=SEEDS),
        script=script("report.py"),
    output:
        expand(f"{REPORTS}/table{{n}}.{{fmt}}", n=TABLES, fmt=TABLE_FORMATS),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/report.yaml"
    params:
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
        tables=" ".join(map(str, TABLES)),
    shell:
        "python {input.script} --models {input.models:q} --metrics {input.metrics:q}"
        " --outdir {params.outdir:q} --tables {params.tables} > {log} 2>&1"
