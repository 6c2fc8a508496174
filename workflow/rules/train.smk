# Train one architecture on one dataset with one seed (`ctan train`); resumes an unfinished checkpoint of the
# same parameters and code (a finished or changed one, e.g. after `snakemake -f`, starts over).
# GPU jobs: `resources: gpu=1` reaches SLURM (workflow/profiles/slurm); locally it only caps
# concurrency when you pass e.g. `--resources gpu=1`.


rule train_mtl:
    input:
        store=f"{PREPROCESSED}/{{dataset}}",
        code=stage_code("train"),
        tuning=tuning_choice,
    output:
        model=f"{MODELS}/{{dataset}}/{{arch}}/seed{{seed}}/model.pt",
        history=f"{MODELS}/{{dataset}}/{{arch}}/seed{{seed}}/history.json",
        curves=report(
            f"{MODELS}/{{dataset}}/{{arch}}/seed{{seed}}/curves.png",
            caption="../report/curves.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={"architecture": "{arch}", "task": "all", "seed": "{seed}"},
        ),
    wildcard_constraints:
        arch=MTL_ARCH,
    params:
        ctan=PARAMS,
        settings=train_settings,
    log:
        f"{LOGS}/train/{{dataset}}/{{arch}}/seed{{seed}}.log",
    benchmark:
        f"{LOGS}/benchmarks/train/{{dataset}}/{{arch}}/seed{{seed}}.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan train {params.ctan} --dataset {wildcards.dataset} --arch {wildcards.arch}"
        " --seed {wildcards.seed} --threads {threads}) > {log} 2>&1"


rule train_stl:
    input:
        store=f"{PREPROCESSED}/{{dataset}}",
        code=stage_code("train"),
        tuning=tuning_choice,
    output:
        model=f"{MODELS}/{{dataset}}/stl/seed{{seed}}/{{task}}/model.pt",
        history=f"{MODELS}/{{dataset}}/stl/seed{{seed}}/{{task}}/history.json",
        curves=report(
            f"{MODELS}/{{dataset}}/stl/seed{{seed}}/{{task}}/curves.png",
            caption="../report/curves.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={"architecture": "stl", "task": "{task}", "seed": "{seed}"},
        ),
    params:
        ctan=PARAMS,
        settings=train_settings,
    log:
        f"{LOGS}/train/{{dataset}}/stl/seed{{seed}}/{{task}}.log",
    benchmark:
        f"{LOGS}/benchmarks/train/{{dataset}}/stl/seed{{seed}}/{{task}}.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan train {params.ctan} --dataset {wildcards.dataset} --arch stl"
        " --seed {wildcards.seed} --task {wildcards.task} --threads {threads}) > {log} 2>&1"


# Hyperparameters chosen on the validation split before the final training jobs (`ctan tune`): one job
# per architecture, and per task for STL; listed only where the `tuning:` grid has several points.


rule tune_mtl:
    input:
        store=f"{PREPROCESSED}/{{dataset}}",
        code=stage_code("train"),
    output:
        choice=f"{MODELS}/{{dataset}}/{{arch}}/tuning/choice.json",
    wildcard_constraints:
        arch=MTL_ARCH,
    params:
        ctan=PARAMS,
        settings=tune_settings,
    log:
        f"{LOGS}/tune/{{dataset}}/{{arch}}.log",
    benchmark:
        f"{LOGS}/benchmarks/tune/{{dataset}}/{{arch}}.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=360,
        gpu=1,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan tune {params.ctan} --dataset {wildcards.dataset} --arch {wildcards.arch}"
        " --threads {threads}) > {log} 2>&1"


rule tune_stl:
    input:
        store=f"{PREPROCESSED}/{{dataset}}",
        code=stage_code("train"),
    output:
        choice=f"{MODELS}/{{dataset}}/stl/tuning/{{task}}/choice.json",
    params:
        ctan=PARAMS,
        settings=tune_settings,
    log:
        f"{LOGS}/tune/{{dataset}}/stl/{{task}}.log",
    benchmark:
        f"{LOGS}/benchmarks/tune/{{dataset}}/stl/{{task}}.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=360,
        gpu=1,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan tune {params.ctan} --dataset {wildcards.dataset} --arch stl --task {wildcards.task}"
        " --threads {threads}) > {log} 2>&1"
