# Collect every evaluation into results/summary.csv (Δ_MTL, provenance), draw the report's summary
# figure and table from it, and write the comparison report (results/comparison/: bootstrap intervals,
# training cost, run ids). One rule, so that `snakemake results/summary.csv` (the README's command)
# leaves nothing for the default target `all` to do.


rule summarize:
    input:
        metrics=all_metrics(),
        histories=all_histories(),
        code=stage_code("summary"),
    output:
        summary=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"content": "summary.csv: every row, with provenance"},
        ),
        figure=report(
            f"{RESULTS}/delta_mtl.png",
            caption="../report/delta_mtl.rst",
            category="Summary",
            labels={"content": "Δ_MTL per dataset and architecture"},
        ),
        table=report(
            f"{RESULTS}/metrics_table.html",
            caption="../report/metrics_table.rst",
            category="Summary",
            labels={"content": "per-task metrics"},
        ),
        comparison=f"{RESULTS}/comparison/comparison.md",
        comparison_json=f"{RESULTS}/comparison/comparison.json",
        comparison_figure=report(
            f"{RESULTS}/comparison/delta_mtl_ci.png",
            caption="../report/delta_mtl_ci.rst",
            category="Summary",
            labels={"content": "Δ_MTL with paired-bootstrap intervals"},
        ),
        cost_figure=report(
            f"{RESULTS}/comparison/training_cost.png",
            caption="../report/training_cost.rst",
            category="Summary",
            labels={"content": "training cost per architecture"},
        ),
    params:
        ctan=PARAMS,
        settings={"run": RUN, "comparison": config.get("comparison", {})},
    log:
        f"{LOGS}/summarize.log",
    benchmark:
        f"{LOGS}/benchmarks/summarize.tsv"
    conda:
        "../envs/ctan.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "(echo SLURM_JOB_ID=${{SLURM_JOB_ID:-none}} host=$(hostname)"
        " && ctan summarize {params.ctan} --output {output.summary}"
        " && ctan plot-summary {output.summary} --figure {output.figure} --table {output.table}"
        " && ctan compare {params.ctan} --output $(dirname {output.comparison}))"
        " > {log} 2>&1"
