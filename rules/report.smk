# Report stage: tables and figures from the metrics. Cheap, and rerun whenever the report
# code, the metrics or the models' descriptions change; it never retrains or re-evaluates.
#   snakemake tables                          just the tables
#   snakemake --report reports/report.html    the HTML report (after a run)


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


# Every table of the registry (cnnstudy/tables.py): its HTML in the Snakemake report, with its
# caption, and Markdown, CSV and LaTeX beside it.
rule report:
    input:
        models=rules.model_info.output[0],
        metrics=runs(rules.evaluate.output.metrics),
        probs=runs(rules.evaluate.output.probs),
        benchmarks=benchmark_files,
        script=script("report.py"),
    output:
        [
            report(
                f"{REPORTS}/{table.name}.html",
                caption=f"../reports/captions/{table.caption}.rst",
                category="Tables",
                labels={"table": table.title},
            )
            for table in tables.wanted(MODELS)
        ],
        expand(
            f"{REPORTS}/{{name}}.{{fmt}}",
            name=[table.name for table in tables.wanted(MODELS)],
            fmt=("md", "csv", "tex"),
        ),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/report.yaml"
    params:
        outdir=lambda wildcards, output: os.path.dirname(output[0]),
        benchmark_root=f"{RESULTS}/benchmarks",
        # The tables mark results trained by other code: a change to it redoes them.
        training_code=CODE["train"],
    shell:
        "python {input.script} --models {input.models:q} --metrics {input.metrics:q}"
        " --probs {input.probs:q} --benchmarks {input.benchmarks:q}"
        " --benchmark-root {params.benchmark_root:q} --outdir {params.outdir:q} > {log} 2>&1"


rule plots:
    input:
        models=rules.model_info.output[0],
        metrics=runs(rules.evaluate.output.metrics),
        histories=runs(rules.train.output.history),
        steps=f"{REPORTS}/table4.csv",
        script=script("plots.py"),
    output:
        curves=report(
            directory(f"{RESULTS}/plots/curves"),
            patterns=["{model}_seed{seed}.png"],
            caption="../reports/captions/learning_curve.rst",
            category="Learning curves",
            labels={"model": "{model}", "seed": "{seed}"},
        ),
        confusion=report(
            directory(f"{RESULTS}/plots/confusion"),
            patterns=["{model}_seed{seed}.png"],
            caption="../reports/captions/confusion.rst",
            category="Confusion matrices",
            labels={"model": "{model}", "seed": "{seed}"},
        ),
        overlay=report(
            f"{RESULTS}/plots/ladder_overlay.png",
            caption="../reports/captions/overlay.rst",
            category="Across models",
            labels={"figure": "Validation curves of the ladder"},
        ),
        ladder=report(
            f"{RESULTS}/plots/ladder_accuracy.png",
            caption="../reports/captions/ladder.rst",
            category="Across models",
            labels={"figure": "The ladder, study and ours"},
        ),
        forest=report(
            f"{RESULTS}/plots/steps_forest.png",
            caption="../reports/captions/forest.rst",
            category="Across models",
            labels={"figure": "Did each step help?"},
        ),
        sweeps=report(
            f"{RESULTS}/plots/sweeps.png",
            caption="../reports/captions/sweeps.rst",
            category="Across models",
            labels={"figure": "Sweeps"},
        ),
        f1=report(
            f"{RESULTS}/plots/f1_heatmap.png",
            caption="../reports/captions/f1_heatmap.rst",
            category="Across models",
            labels={"figure": "Per-class F1"},
        ),
    log:
        f"{RESULTS}/logs/plots.log",
    conda:
        "../envs/report.yaml"
    params:
        outdir=lambda wildcards, output: os.path.dirname(output.overlay),
    shell:
        "python {input.script} --models {input.models:q} --metrics {input.metrics:q}"
        " --histories {input.histories:q} --steps {input.steps:q} --outdir {params.outdir:q} > {log} 2>&1"


# Regenerate the tables alone (Markdown, CSV, LaTeX, HTML).
rule tables:
    input:
        rules.report.output,
