"""The workflow layer: Snakefile + rules, dvc.yaml, and how jobs are chosen.

Every test runs in a temporary copy of the workflow files, never in the checkout (Snakemake and DVC
write state next to the Snakefile). The mechanics tests run the real Snakefile with a stand-in `ctan`
on PATH that writes each stage's contract outputs in milliseconds; the end-to-end run of the real
`ctan` belongs in a module-scoped fixture built the same way (`workflow_copy` + `snakemake(...)`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPIED = [
    "Snakefile",
    "params.yaml",
    "dvc.yaml",
    ".dvcignore",
    "workflow",
    "src/ctan",
    ".dvc/config",
    "config",
]


def workflow_copy(dest: Path) -> Path:
    """The files the workflow reads, copied (symlinks kept, bytecode left out) into `dest`."""
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", MPLBACKEND="Agg")
    env["PATH"] = os.pathsep.join(str(p) for p in (extra_path, BIN) if p) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def snakemake(
    cwd: Path, *args: str, path: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "snakemake"), *args], cwd=cwd, env=_env(path), capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def planned_jobs(output: str) -> Counter:
    """Job counts per rule from the 'Job stats' table of a (dry) run."""
    counts: Counter = Counter()
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if not match:
            break
        if match[1] != "total":
            counts[match[1]] = int(match[2])
    return counts


def external_pairs(params: dict) -> list[dict[str, str]]:
    """{dataset, external} for every external test set of a dataset in run.datasets."""
    return [
        {"dataset": entry["external_of"], "external": name}
        for name, entry in params["datasets"].items()
        if entry.get("external_of") in params["run"]["datasets"]
    ]


def expected_jobs(params: dict) -> Counter:
    run, datasets = params["run"], params["datasets"]
    n_seeds = len(run["seeds"])
    mtl = [a for a in run["architectures"] if a != "stl"]
    n_external = len(external_pairs(params))
    counts = Counter(
        download=len(run["datasets"]) + n_external,
        preprocess=len(run["datasets"]),
        preprocess_external=n_external,
        evaluate_external=n_external * len(run["architectures"]) * n_seeds,
        train_mtl=len(run["datasets"]) * len(mtl) * n_seeds,
        train_stl=sum(len(datasets[d]["tasks"]) for d in run["datasets"]) * n_seeds
        if "stl" in run["architectures"]
        else 0,
        # Datasets with a dose task: `evaluate_dose`, the same job with the DVH figure as well.
        evaluate=sum("dose" not in datasets[d]["tasks"] for d in run["datasets"])
        * len(run["architectures"])
        * n_seeds,
        evaluate_dose=sum("dose" in datasets[d]["tasks"] for d in run["datasets"])
        * len(run["architectures"])
        * n_seeds,
        summarize=1,
        all=1,
    )
    return +counts


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    return workflow_copy(tmp_path / "repo")


def test_lint_is_clean(copy: Path) -> None:
    out = snakemake(copy, "--lint")
    assert "Congratulations" in out.stdout + out.stderr


@pytest.fixture(scope="module")
def default_dry_run(tmp_path_factory) -> tuple[Path, str]:
    """A copy of the workflow and the output of its dry run with the default parameters."""
    root = workflow_copy(tmp_path_factory.mktemp("default") / "repo")
    return root, snakemake(root, "--dry-run", "--printshellcmds").stdout


def test_dry_run_plans_the_full_default_dag(default_dry_run) -> None:
    root, out = default_dry_run
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert len(params["run"]["architectures"]) == 4
    assert planned_jobs(out) == expected_jobs(params)
    shell = "\n".join(line for line in out.splitlines() if line.startswith("Shell command:"))
    assert set(re.findall(r"\bctan ([a-z][a-z-]*)", shell)) == {
        "download",
        "preprocess",
        "train",
        "evaluate",
        "summarize",
        "plot-summary",
        "compare",
    }


def _rule_inputs(dry_run_output: str) -> dict[str, set[str]]:
    """Input files per rule, from the job blocks of a dry run."""
    inputs: dict[str, set[str]] = {}
    for rule, files in re.findall(r"^(?:local)?rule (\w+):\n\s+input: (.*)$", dry_run_output, flags=re.M):
        inputs.setdefault(rule, set()).update(files.split(", "))
    return inputs


def test_snakemake_and_dvc_stages_depend_on_the_same_code(default_dry_run) -> None:
    root, out = default_dry_run
    snake: dict[str, set[str]] = {}
    for rule, files in _rule_inputs(out).items():
        code = {f for f in files if f.startswith("src/")}
        if code:
            # Tuning trains too: the same code (its jobs appear only where the grid has several points).
            # External test sets run the same stages' code (download is one rule for both in Snakemake).
            rule = rule.removesuffix("_external").removesuffix("_dose")
            stage = "train" if rule.startswith(("train_", "tune_")) else rule
            snake.setdefault(stage, set()).update(code)
    dvc: dict[str, set[str]] = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        stage = stage.get("do", stage)
        for dep in (d for d in stage.get("deps", []) if d.startswith("src/")):
            path = root / dep
            assert path.exists(), f"dvc.yaml stage {name} depends on missing {dep}"
            found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            dvc.setdefault("train" if name == "tune" else name.removesuffix("_external"), set()).update(
                str(f.relative_to(root)) for f in found
            )
    assert snake == dvc


def test_configfile_is_merged_and_passed_to_every_command(copy: Path) -> None:
    (copy / "override.yaml").write_text(
        "run: {datasets: [ham10000_demo], architectures: [stl, ctan], seeds: [0, 1]}\n"
    )
    out = snakemake(copy, "--dry-run", "--printshellcmds", "--configfile", "override.yaml")
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["run"] = yaml.safe_load((copy / "override.yaml").read_text())["run"]
    assert planned_jobs(out.stdout) == expected_jobs(params)
    commands = [line for line in out.stdout.splitlines() if re.search(r"\bctan (?!plot-summary)", line)]
    assert commands and all("--params params.yaml --params override.yaml" in c for c in commands)


def test_config_on_the_command_line_is_refused(copy: Path) -> None:
    out = snakemake(copy, "--dry-run", "--config", "run={}", check=False)
    assert out.returncode != 0
    assert "--configfile" in out.stdout + out.stderr


def test_a_bad_parameter_file_is_named_with_the_clis_hint_before_any_job(copy: Path) -> None:
    """The workflow reads the parameter files as `ctan` does: the error names the file that set the
    bad value and suggests the key, instead of Snakemake's schema message on the merged config."""
    (copy / "override.yaml").write_text("training: {epoch: 3}\n")
    out = snakemake(copy, "--dry-run", "--configfile", "override.yaml", check=False)
    said = out.stdout + out.stderr
    assert out.returncode != 0
    assert "override.yaml" in said and "did you mean 'epochs'?" in said
    assert "Job stats" not in said


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_dvc_parses_the_same_stages(copy: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    names = _dvc(copy, "stage", "list", "--name-only").stdout.split()
    per_stage = Counter(n.split("@")[0] for n in names)
    run = params["run"]
    n = len(run["datasets"])
    runs = n * len(run["architectures"]) * len(run["seeds"])
    tunes = n * len(run["architectures"])  # one per network family; seeds share the choice
    ext = len(external_pairs(params))
    assert ext >= 1  # the demo has an external test set, so the main job exercises one
    assert per_stage == Counter(
        download=n,
        preprocess=n,
        tune=tunes,
        train=runs,
        evaluate=runs,
        summarize=1,
        download_external=ext,
        preprocess_external=ext,
        evaluate_external=ext * len(run["architectures"]) * len(run["seeds"]),
    )
    _dvc(copy, "dag")


def test_dvc_external_sets_match_params() -> None:
    """dvc.yaml's `external_sets` (DVC cannot derive it from params.yaml) lists every external test set."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    listed = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]["external_sets"]
    assert listed == external_pairs(params)


def test_dvc_summarize_depends_on_every_configured_dataset() -> None:
    """dvc.yaml cannot derive this list from params.yaml, so it is checked here."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["summarize"]
    for key in ("results", "models"):
        root = params["paths"][key]
        deps = [
            d.replace(f"${{paths.{key}}}", root) for d in stage["deps"] if d.startswith(f"${{paths.{key}}}")
        ]
        assert deps == [f"{root}/{d}" for d in params["run"]["datasets"]], key


# --- mechanics: a real Snakemake run with a stand-in `ctan` ------------------------------------------

FAKE_CTAN = textwrap.dedent(
    '''
    """Stand-in for `ctan`: writes each stage's contract outputs and logs the call."""
    import argparse, json, os, sys
    from pathlib import Path
    from ctan.config import dataset_settings, load_params

    with open("ctan-calls.log", "a") as log:
        log.write(" ".join(sys.argv[1:]) + "\\n")
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("positional", nargs="?")
    options = ("--dataset", "--arch", "--seed", "--task", "--threads", "--output", "--figure", "--table")
    for opt in (*options, "--on"):
        p.add_argument(opt)
    p.add_argument("--params", action="append")
    a = p.parse_args()
    params = load_params(a.params)

    def write(path, text="x"):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    if a.command == "init-tracking":
        write("mlflow-initialised")
    elif a.command in ("download", "preprocess"):
        s = dataset_settings(params, a.positional)
        out = s.raw_dir if a.command == "download" else s.preprocessed_dir
        name = "source.json" if a.command == "download" else "manifest.json"
        write(out / name, json.dumps(s.data_section))
    elif a.command == "train":
        s = dataset_settings(params, a.dataset)
        out = s.models_dir / a.arch / f"seed{a.seed}"
        for task in [a.task] if a.task else ([None] if a.arch != "stl" else s.tasks):
            for name in ("model.pt", "history.json", "curves.png", "checkpoint.pt"):
                write((out / task if task else out) / name, json.dumps(s.training))
    elif a.command == "evaluate":
        s = dataset_settings(params, a.dataset)
        if a.on:  # an external test set: metrics and examples only
            out = s.results_dir / "external" / a.on / a.arch / f"seed{a.seed}"
            for name in ("metrics.json", "examples.png"):
                write(out / name, "{}")
        else:
            out = s.results_dir / a.arch / f"seed{a.seed}"
            for name in ("metrics.json", "examples.png", "predictions/case.npz"):
                write(out / name, "{}")
        if "dose" in s.tasks and not a.on:
            write(out / "dvh.png")
    elif a.command == "summarize":
        write(a.output, "row_type,dataset,architecture,value\\n")
    elif a.command == "plot-summary":
        write(a.figure)
        write(a.table)
    elif a.command == "compare":
        for name in ("comparison.md", "comparison.json", "delta_mtl_ci.png", "training_cost.png"):
            write(Path(a.output) / name)
    '''
)

SMALL = {
    "run": {"datasets": ["openkbp_demo", "ham10000_demo"], "architectures": ["stl", "ctan"], "seeds": [0]},
}


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """The real Snakefile run to completion with the stand-in `ctan` on a two-dataset configuration."""
    root = workflow_copy(tmp_path_factory.mktemp("mechanics") / "repo")
    fake_bin = root.parent / "bin"
    fake_bin.mkdir()
    ctan = fake_bin / "ctan"
    ctan.write_text(f"#!{sys.executable}\n{FAKE_CTAN}")
    ctan.chmod(0o755)
    (root / "small.yaml").write_text(yaml.safe_dump(SMALL))
    snakemake(root, "--cores", "4", "--configfile", "small.yaml", path=fake_bin)
    return root


def _fake_dry_run(root: Path, *configfiles: str) -> Counter:
    args = [arg for f in configfiles for arg in ("--configfile", f)]
    out = snakemake(root, "--dry-run", *args, path=root.parent / "bin")
    return planned_jobs(out.stdout)


@pytest.mark.slow
def test_run_builds_every_output_and_initialises_tracking_first(fake_run: Path) -> None:
    calls = (fake_run / "ctan-calls.log").read_text().splitlines()
    assert calls[0].startswith("init-tracking --params params.yaml --params small.yaml")
    assert (fake_run / "results" / "summary.csv").is_file()
    assert (fake_run / "results" / "delta_mtl.png").is_file()
    for task in ("dose", "structures"):
        assert (fake_run / "models/openkbp_demo/stl/seed0" / task / "model.pt").is_file()
    assert (fake_run / "logs/benchmarks/train/ham10000_demo/ctan/seed0.tsv").is_file()


@pytest.mark.slow
def test_nothing_to_do_after_a_complete_run(fake_run: Path) -> None:
    assert _fake_dry_run(fake_run, "small.yaml") == Counter()


@pytest.mark.slow
def test_a_dataset_training_override_reruns_only_that_datasets_training(fake_run: Path) -> None:
    changed = yaml.safe_load((fake_run / "small.yaml").read_text())
    changed["datasets"] = {"ham10000_demo": {"training": {"epochs": 3}}}
    (fake_run / "changed.yaml").write_text(yaml.safe_dump(changed))
    # ham10000_demo: STL lesion + diagnosis and CTAN retrain; its two evaluations and the summary follow.
    assert _fake_dry_run(fake_run, "changed.yaml") == Counter(
        train_stl=2, train_mtl=1, evaluate=2, summarize=1, all=1
    )


@pytest.mark.slow
def test_dvc_hashes_a_snakemake_built_folder_without_its_timestamp(fake_run: Path) -> None:
    """`dvc commit` after Snakemake: `.dvcignore` keeps Snakemake's timestamp file out of the hash."""
    store = fake_run / "data/preprocessed/openkbp_demo"
    assert (store / ".snakemake_timestamp").is_file()
    subprocess.run(["git", "init", "-q"], cwd=fake_run, check=True)
    _dvc(fake_run, "commit", "--force", "preprocess@openkbp_demo")
    lock = yaml.safe_load((fake_run / "dvc.lock").read_text())["stages"]["preprocess@openkbp_demo"]
    assert lock["outs"][0]["nfiles"] == 1  # manifest.json only


@pytest.mark.slow
def test_report_shows_summary_curves_and_examples(fake_run: Path) -> None:
    snakemake(fake_run, "--configfile", "small.yaml", "--report", "report.html", path=fake_run.parent / "bin")
    html = (fake_run / "report.html").read_text()
    for category in ("Summary", "Learning curves", "Example predictions", "Dose-volume histograms"):
        assert f'"{category}"' in html
    assert "Learning curves of stl on openkbp_demo (single-task model for dose)" in html


def test_real_sample_configuration_plans_every_architecture_and_seed(copy: Path) -> None:
    """config/real-sample.yaml: the real samples, six architectures, each dataset's seeds (HAM10000 its
    own five, OpenKBP run.seeds); one tuning job per network, not per seed."""
    # --configfile takes several files: the target goes before it, as in the README.
    out = snakemake(copy, "-n", "results/summary.csv", "--configfile", "config/real-sample.yaml")
    jobs = planned_jobs(out.stdout + out.stderr)
    real = yaml.safe_load((REPO / "config" / "real-sample.yaml").read_text())
    n_datasets = len(real["run"]["datasets"])
    seeds = {d: real["datasets"][d].get("seeds", real["run"]["seeds"]) for d in real["run"]["datasets"]}
    assert len(seeds["ham10000_sample"]) >= 5 and len(seeds["openkbp_sample"]) >= 3
    n_runs = sum(map(len, seeds.values()))  # (dataset, seed) pairs
    assert jobs["download"] == jobs["preprocess"] == n_datasets
    assert jobs["train_stl"] == 2 * n_runs  # two tasks per dataset, one job each
    assert jobs["train_mtl"] == 5 * n_runs
    assert jobs["evaluate"] + jobs["evaluate_dose"] == 6 * n_runs
    assert jobs["evaluate_dose"] == 6 * len(seeds["openkbp_sample"])
    # The learning-rate grid is tuned once per network (not per seed), before the final training jobs:
    # every final job reads its network's choice, and the plan lists all tuning before any training.
    assert jobs["tune_stl"] == 2 * n_datasets and jobs["tune_mtl"] == 5 * n_datasets
    inputs = _rule_inputs(out.stdout)
    for d in real["run"]["datasets"]:
        for arch in real["run"]["architectures"]:
            if arch == "stl":
                for task in real["datasets"][d]["tasks"]:
                    assert f"models/{d}/stl/tuning/{task}/choice.json" in inputs["train_stl"]
            else:
                assert f"models/{d}/{arch}/tuning/choice.json" in inputs["train_mtl"]
    order = re.findall(r"^rule (tune|train)_\w+:", out.stdout, flags=re.M)
    assert order and order.index("train") > len(order) - order[::-1].index("tune") - 1


def _external_override(copy: Path, patients: Path) -> str:
    """The issue's override: only an external test set of openkbp_sample, a folder of pt_* patients."""
    entry = {"format": "openkbp", "external_of": "openkbp_sample", "source": str(patients), "sha256": None}
    (copy / "external.yaml").write_text(yaml.safe_dump({"datasets": {"openkbp_test_pats": entry}}))
    return "external.yaml"


def test_external_test_set_is_evaluated_for_every_architecture_and_seed(copy: Path, tmp_path: Path) -> None:
    """Adding only an `external_of` entry plans its download, preprocessing (with the training set's
    download as an input) and an evaluation of every architecture and seed, all in the summary."""
    override = _external_override(copy, tmp_path / "test-pats")
    out = snakemake(
        copy, "-n", "-p", "results/summary.csv", "--configfile", "config/real-sample.yaml", override
    )
    jobs = planned_jobs(out.stdout)
    real = yaml.safe_load((REPO / "config" / "real-sample.yaml").read_text())
    # An external set is evaluated with every model of its training dataset: that dataset's seeds.
    openkbp_seeds = real["datasets"]["openkbp_sample"].get("seeds", real["run"]["seeds"])
    n_runs = len(real["run"]["architectures"]) * len(openkbp_seeds)
    assert jobs["evaluate_external"] == n_runs
    assert jobs["preprocess_external"] == 1 and jobs["download"] == len(real["run"]["datasets"]) + 1
    assert jobs["evaluate_dose"] == n_runs  # the internal ones unchanged
    commands = re.findall(r"ctan evaluate .*--on openkbp_test_pats.*", out.stdout)
    assert len(commands) == n_runs and all("--dataset openkbp_sample" in c for c in commands)
    inputs = _rule_inputs(out.stdout)
    assert "data/raw/openkbp_sample" in inputs["preprocess_external"]
    summary_inputs = inputs["summarize"]
    for arch in real["run"]["architectures"]:
        for seed in openkbp_seeds:
            metrics = f"results/openkbp_sample/external/openkbp_test_pats/{arch}/seed{seed}/metrics.json"
            assert metrics in summary_inputs
    # Training and tuning never see it.
    assert not any(
        "openkbp_test_pats" in f for r in ("train_mtl", "train_stl", "tune_mtl") for f in inputs[r]
    )


def test_an_external_set_in_run_datasets_is_refused_before_any_job(copy: Path) -> None:
    (copy / "bad.yaml").write_text("run: {datasets: [openkbp_demo_external]}\n")
    out = snakemake(copy, "-n", "--configfile", "bad.yaml", check=False)
    assert out.returncode != 0
    assert "external test set of 'openkbp_demo'" in out.stdout + out.stderr


def test_tuning_jobs_come_before_the_final_training_jobs(copy: Path) -> None:
    """Each final training job of the real-sample plan waits for its network's tuning choice."""
    out = snakemake(copy, "-n", "results/summary.csv", "--configfile", "config/real-sample.yaml")
    inputs = _rule_inputs(out.stdout)
    choices = {f for f in inputs["train_mtl"] | inputs["train_stl"] if f.endswith("tuning/choice.json")} | {
        f for f in inputs["train_stl"] if "/tuning/" in f
    }
    assert any("/stl/tuning/lesion/choice.json" in f for f in choices)
    assert any("/ctan/tuning/choice.json" in f for f in choices)
