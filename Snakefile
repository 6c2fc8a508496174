# ctan workflow: download -> preprocess -> train -> evaluate -> summarize (docs/pipeline.md).
# Parameters: params.yaml, plus any --configfile merged over it (config/real-sample.yaml: the real samples).
configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/summary.smk"


# Included files cannot set the default target, so it lives here.
rule all:
    input:
        f"{RESULTS}/summary.csv",
        f"{RESULTS}/delta_mtl.png",
        f"{RESULTS}/metrics_table.html",
