# Resample/resize every case into one sharded Zarr store per split plus a manifest (`ctan preprocess`).


rule preprocess:
    input:
        raw=f"{RAW}/{{dataset}}",
        code=stage_code("preprocess"),
    output:
        directory(f"{PREPROCESSED}/{{dataset}}"),
    params:
        ctan=PARAMS,
        settings=preprocess_settings,
    log:
        f"{LOGS}/preprocess/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/preprocess/{{dataset}}.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan preprocess {wildcards.dataset} {params.ctan}) > {log} 2>&1"
