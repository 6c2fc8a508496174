# Fetch a dataset's official files, a local archive/folder, or generate demo data (`ctan download`).


rule download:
    output:
        directory(f"{RAW}/{{dataset}}"),
    input:
        code=stage_code("download"),
    params:
        ctan=PARAMS,
        settings=download_settings,
    log:
        f"{LOGS}/download/{{dataset}}.log",
    benchmark:
        f"{LOGS}/benchmarks/download/{{dataset}}.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan download {wildcards.dataset} {params.ctan}) > {log} 2>&1"
