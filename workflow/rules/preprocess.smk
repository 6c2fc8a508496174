# Resample/resize every case into one sharded Zarr store per split plus a manifest (`ctan preprocess`).


rule preprocess:
    input:
        raw=f"{RAW}/{{dataset}}",
        code=stage_code("preprocess"),
    output:
        directory(f"{PREPROCESSED}/{{dataset}}"),
    wildcard_constraints:
        dataset=TRAINING_RE,
    params:
        ctan=PARAMS,
        settings=preprocess_settings,
    log:
        f"{LOGS}/preprocess/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/preprocess/{{dataset}}.tsv"
    conda:
        "../envs/ctan.yaml"
    # One core, and ahead of training: with 2 it waited for both cores to be idle, so on a 2-core
    # machine each dataset's preprocessing ran only between other datasets' training (issue 12).
    priority: 5
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan preprocess {wildcards.dataset} {params.ctan} --threads {threads}) > {log} 2>&1"


# An external test set (`external_of:`): the training dataset's plan, every case in test.zarr. It needs
# the training set's download to check structures and classes against, and runs before training jobs
# where it can (priority), so a mismatching set stops the workflow before anything trains.
rule preprocess_external:
    input:
        raw=f"{RAW}/{{dataset}}",
        training=training_raw,
        code=stage_code("preprocess"),
    output:
        directory(f"{PREPROCESSED}/{{dataset}}"),
    wildcard_constraints:
        dataset=EXTERNAL_RE,
    params:
        ctan=PARAMS,
        settings=preprocess_settings,
    log:
        f"{LOGS}/preprocess/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/preprocess/{{dataset}}.tsv"
    conda:
        "../envs/ctan.yaml"
    priority: 10
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan preprocess {wildcards.dataset} {params.ctan} --threads {threads}) > {log} 2>&1"
