# Tracking stage: every finished run recorded in MLflow, from one local job at the end, so
# concurrent cluster jobs never write one SQLite file at once (see workflow_scripts/track.py).
#   mlflow ui --backend-store-uri sqlite:///results/mlflow/mlflow.db


localrules:
    track,


rule track:
    input:
        models=rules.model_info.output[0],
        metrics=runs(rules.evaluate.output.metrics),
        histories=runs(rules.train.output.history),
        plots=rules.plots.output.curves,
        script=script("track.py"),
    output:
        f"{RESULTS}/mlflow/recorded.json",
    log:
        f"{RESULTS}/logs/track.log",
    conda:
        "../envs/report.yaml"
    params:
        results=lambda wildcards, output: os.path.dirname(os.path.dirname(output[0])),
        uri=f"--tracking-uri {config['tracking_uri']}" if config["tracking_uri"] else "",
        plots=lambda wildcards, input: os.path.dirname(input.plots),
    shell:
        "python {input.script} --models {input.models:q} --metrics {input.metrics:q}"
        " --results {params.results:q} --plots {params.plots:q} --out {output:q} {params.uri} > {log} 2>&1"
