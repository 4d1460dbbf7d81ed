# CIFAR-10 CNN study, reproduced and extended (see README.md).
#
#   download ─► preprocess ─► train (model × seed) ─► evaluate (model × seed) ─► report, plots ─► track
#   (localrule)  normalised     Keras, one job each     scikit-learn metrics      tables, figures   MLflow
#                .npz     └─► benchmark (on demand: reports/benchmark.md)
#
# Settings: config.yaml (validated against schemas/config.schema.yaml before any job).
# Execution: profiles/ (local default, SLURM, Grid Engine).
import os


# The study's settings live beside this file; --configfile presets/... and --config override them.
configfile: os.path.join(workflow.basedir, "config.yaml")


report: "reports/captions/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/track.smk"
include: "rules/benchmark.smk"
include: "rules/verify.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
        rules.plots.output,
        rules.track.output,
