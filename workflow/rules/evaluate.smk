# Score the trained model(s) of one dataset/architecture/seed on the test split (`ctan evaluate`).
# Datasets with a dose task also get the DVH figure of the median test case (`evaluate_dose`: the
# same job with one more output; a rule's outputs cannot depend on its wildcards).


rule evaluate:
    input:
        models=trained_models,
        store=f"{PREPROCESSED}/{{dataset}}",
        code=stage_code("evaluate"),
    output:
        metrics=f"{RESULTS}/{{dataset}}/{{arch}}/seed{{seed}}/metrics.json",
        examples=report(
            f"{RESULTS}/{{dataset}}/{{arch}}/seed{{seed}}/examples.png",
            caption="../report/examples.rst",
            category="Example predictions",
            subcategory="{dataset}",
            labels={"architecture": "{arch}", "seed": "{seed}"},
        ),
    wildcard_constraints:
        dataset=one_of([d for d in config["datasets"] if d not in EXTERNAL_NAMES and not has_dose(d)]),
    params:
        ctan=PARAMS,
        settings=evaluate_settings,
    log:
        f"{LOGS}/evaluate/{{dataset}}/{{arch}}/seed{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate/{{dataset}}/{{arch}}/seed{{seed}}.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan evaluate {params.ctan} --dataset {wildcards.dataset} --arch {wildcards.arch}"
        " --seed {wildcards.seed} --threads {threads}) > {log} 2>&1"


use rule evaluate as evaluate_dose with:
    output:
        metrics=f"{RESULTS}/{{dataset}}/{{arch}}/seed{{seed}}/metrics.json",
        examples=report(
            f"{RESULTS}/{{dataset}}/{{arch}}/seed{{seed}}/examples.png",
            caption="../report/examples.rst",
            category="Example predictions",
            subcategory="{dataset}",
            labels={"architecture": "{arch}", "seed": "{seed}"},
        ),
        dvh=report(
            f"{RESULTS}/{{dataset}}/{{arch}}/seed{{seed}}/dvh.png",
            caption="../report/dvh.rst",
            category="Dose-volume histograms",
            subcategory="{dataset}",
            labels={"architecture": "{arch}", "seed": "{seed}"},
        ),
    wildcard_constraints:
        dataset=one_of([d for d in config["datasets"] if d not in EXTERNAL_NAMES and has_dose(d)]),


# The same models on every case of an external test set of the dataset (`ctan evaluate --on`).
rule evaluate_external:
    input:
        models=trained_models,
        store=f"{PREPROCESSED}/{{external}}",
        code=stage_code("evaluate"),
    output:
        metrics=f"{RESULTS}/{{dataset}}/external/{{external}}/{{arch}}/seed{{seed}}/metrics.json",
        examples=report(
            f"{RESULTS}/{{dataset}}/external/{{external}}/{{arch}}/seed{{seed}}/examples.png",
            caption="../report/examples_external.rst",
            category="Example predictions",
            subcategory="{external} (external, trained on {dataset})",
            labels={"architecture": "{arch}", "seed": "{seed}"},
        ),
    params:
        ctan=PARAMS,
        settings=evaluate_settings,
    log:
        f"{LOGS}/evaluate/{{dataset}}/external/{{external}}/{{arch}}/seed{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate/{{dataset}}/external/{{external}}/{{arch}}/seed{{seed}}.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan evaluate {params.ctan} --dataset {wildcards.dataset} --arch {wildcards.arch}"
        " --seed {wildcards.seed} --on {wildcards.external} --threads {threads}) > {log} 2>&1"
