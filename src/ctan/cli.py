"""The one door: every Snakemake rule, DVC stage and user calls `ctan <command>`.

Heavy modules (torch, zarr, mlflow) are imported inside each command so that `ctan --help` is fast.
A `CtanError` becomes one line on stderr (`ctan: error: FILE: problem`) and exit status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ctan.errors import CtanError
from ctan.jobcost import usage_line
from ctan.models import ARCHITECTURES

JOB_COMMANDS = {"download", "preprocess", "train", "tune", "evaluate", "summarize", "plot-summary", "compare"}
"""The commands workflow rules run: each ends by printing its wall and CPU time (`ctan.jobcost`)."""


def _seed(text: str) -> int:
    """A --seed value: an integer >= 0, checked before anything is created (numpy refuses negatives)."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= 2**32 - 1:
        raise CtanError("--seed", f"must be an integer from 0 to 2**32 - 1, got {text!r}")
    return seed


def _threads(text: str) -> int:
    """A --threads value: an integer >= 1 (torch refuses fewer)."""
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise CtanError("--threads", f"must be an integer >= 1, got {text!r}")
    return threads


def _nearest_folder(path: Path) -> None:
    """Refuse an output path that no folder can hold: under a file, or in a folder we cannot write."""
    from ctan.workspace import blocking_parent

    blocked = blocking_parent(path)
    if blocked and blocked[1] == "file":
        raise CtanError(path, f"cannot be written: {blocked[0]} is a file, not a folder")
    if blocked:
        raise CtanError(path, f"cannot be written: no permission to write in {blocked[0]}")


def _output_file(text: str) -> Path:
    """An output file option (summarize, plot-summary, openkbp-score): not a folder, and in a folder that
    is or can be made. Checked while parsing, so a bad path fails before the work, not after it."""
    path = Path(text)
    if path.is_dir():
        raise CtanError(path, "is a folder; give the path of a file to write")
    _nearest_folder(path)
    return path


def _output_folder(text: str) -> Path:
    """An output folder option (compare): a folder, or a path where one can be made."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise CtanError(path, "is a file; give the folder to write into")
    _nearest_folder(path)
    return path


def _figure_file(text: str) -> Path:
    """An output figure: an `_output_file` in a format matplotlib writes (``.png`` added where the name
    has no suffix, as matplotlib does, so that the path printed is the file written)."""
    from ctan.plots import figure_path

    return _output_file(str(figure_path(text)))


def _name(kind: str) -> Callable[[str], str]:
    """A dataset or task name given on the command line: a plain identifier (ctan.workspace)."""

    def check(text: str) -> str:
        from ctan.workspace import check_name

        return check_name(kind, text)

    return check


def _settings(args: argparse.Namespace):
    from ctan.config import dataset_settings, load_params

    return dataset_settings(load_params(args.params), args.dataset)


def _cmd_download(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from ctan.fetch import download_dataset

    out = download_dataset(settings, source=args.source, sha256=args.sha256, force=args.force)
    print(out)
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from ctan.config import dataset_settings, load_params
    from ctan.preprocess.pipeline import preprocess_dataset

    params = load_params(args.params)
    settings = dataset_settings(params, args.dataset)
    # An external test set is preprocessed with its training dataset's plan and checked against its data.
    training = dataset_settings(params, settings.external_of) if settings.external_of else None
    _set_torch_threads(args.threads)
    out = preprocess_dataset(settings, force=args.force, training=training)
    print(out)
    return 0


def _set_threads(threads: int | None) -> None:
    """Compute set-up of the torch commands: their thread count, and malloc keeping freed memory."""
    from ctan.device import keep_freed_memory

    keep_freed_memory()
    _set_torch_threads(threads)


def _set_torch_threads(threads: int | None) -> None:
    """torch's thread count (intra-op and OpenMP). Beyond one job's share of the cores its idle
    OpenMP workers keep spinning after each operator, CPU taken from the job beside it."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _tracked(args: argparse.Namespace) -> dict:
    """The parameters of a command that logs to MLflow, whose store is checked before any work: an
    MLflow server that does not answer took MLflow ~4 minutes of retries to say so, after the set-up."""
    from ctan.config import load_params
    from ctan.tracking import check_tracking

    params = load_params(args.params)
    check_tracking(params)
    return params


def _cmd_train(args: argparse.Namespace) -> int:
    from ctan.training.trainer import train

    params = _tracked(args)
    _set_threads(args.threads)
    train(params, args.dataset, args.arch, args.seed, task=args.task, device=args.device)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from ctan.training.tuning import tune

    params = _tracked(args)
    _set_threads(args.threads)
    for path in tune(params, args.dataset, args.arch, task=args.task, device=args.device):
        print(path)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ctan.evaluation import evaluate

    params = _tracked(args)
    _set_threads(args.threads)
    out = evaluate(params, args.dataset, args.arch, args.seed, device=args.device, on=args.on)
    print(out)
    return 0


def _cmd_openkbp_score(args: argparse.Namespace) -> int:
    import json

    from ctan.metrics.dose import score_directories

    result = score_directories(Path(args.reference), Path(args.predictions))
    text = json.dumps(result, indent=2)
    if args.output:
        from ctan.outputs import staged

        with staged(args.output) as (temp,):
            temp.write_text(text + "\n")
    print(text)
    return 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    from ctan.config import load_params
    from ctan.summary import summarize

    out = summarize(load_params(args.params), args.output)
    print(out)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from ctan.comparison import compare
    from ctan.config import load_params

    print(compare(load_params(args.params), args.output))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from ctan.audit import audit, grid_of
    from ctan.config import load_params

    grid = grid_of(load_params(args.params), ", ".join(args.params)) if args.params else None
    return audit(Path(args.summary), grid)


def _cmd_init_tracking(args: argparse.Namespace) -> int:
    from ctan.config import load_params
    from ctan.tracking import init_tracking

    print(init_tracking(load_params(args.params)))
    return 0


def _cmd_plot_summary(args: argparse.Namespace) -> int:
    from ctan.plots import plot_summary

    for out in plot_summary(Path(args.summary), args.figure, args.table):
        print(out)
    return 0


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params",
        action="append",
        metavar="FILE",
        help="parameter file; repeat to merge overrides in order (default: params.yaml)",
    )


def _add_run_ids(p: argparse.ArgumentParser, task: bool = False, seed: bool = True) -> None:
    """--dataset, --arch, [--seed], [--task], --device, --threads: names checked before any work."""
    p.add_argument(
        "--dataset",
        required=True,
        type=_name("dataset"),
        help="dataset name, a key under `datasets:` in params.yaml",
    )
    p.add_argument("--arch", required=True, choices=ARCHITECTURES, help="architecture")
    if seed:
        p.add_argument("--seed", required=True, type=_seed, help="random seed (an integer >= 0)")
    if task:
        p.add_argument(
            "--task", type=_name("task"), help="for --arch stl: the single task's network (one job per task)"
        )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_threads(p)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="CPU threads for torch; Snakemake passes the rule's threads so results don't depend on the host",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctan",
        description=(
            "Cross-Task Attention Network (CTAN) and multi-task baselines (STL, HPS, MTAN) for medical "
            "imaging. Stages: download -> preprocess -> train -> evaluate -> summarize -> audit. "
            "Normally run through `snakemake --cores 8 results/summary.csv` or `dvc repro`."
        ),
    )
    from ctan import __version__

    parser.add_argument("--version", action="version", version=f"ctan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], argparse.ArgumentParser]] = {}

    def add(name: str, func, help_: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description)
        p.set_defaults(func=func)
        commands[name] = (func, p)
        return p

    p = add(
        "download",
        _cmd_download,
        "fetch a dataset's official files (or generate demo data) into data/raw/DATASET",
        "Fetch DATASET from its configured source (official URL, local archive or folder, or `demo`), "
        "verify the pinned SHA-256, extract safely (no `..`, absolute paths or links) and move the "
        "result into place only when complete.",
    )
    _add_params(p)
    p.add_argument(
        "dataset", type=_name("dataset"), help="dataset name, a key under `datasets:` in params.yaml"
    )
    p.add_argument("--source", help="override the configured source: a local archive, folder or URL")
    p.add_argument("--sha256", help="override the pinned SHA-256 of the source archive")
    p.add_argument("--force", action="store_true", help="replace an existing download")

    p = add(
        "preprocess",
        _cmd_preprocess,
        "resample/resize a downloaded dataset into one sharded Zarr store per split",
        "Read every case of DATASET from data/raw, resample to the configured spacing/shape "
        "(linear for CT and dose, nearest for masks), write one Zarr store per split plus a manifest "
        "with source and content hashes. Output appears only when complete.",
    )
    _add_params(p)
    p.add_argument(
        "dataset", type=_name("dataset"), help="dataset name, a key under `datasets:` in params.yaml"
    )
    p.add_argument("--force", action="store_true", help="replace existing stores")
    _add_threads(p)

    p = add(
        "train",
        _cmd_train,
        "train one architecture on one dataset with one seed (resumes from its last checkpoint)",
        "Train ARCH on DATASET with SEED using the settings in params.yaml; selects the best epoch on "
        "the validation split and logs the run to MLflow. A killed job started again resumes.",
    )
    _add_params(p)
    _add_run_ids(p, task=True)

    p = add(
        "tune",
        _cmd_tune,
        "choose hyperparameters (the `tuning:` grid) on the validation split, before training",
        "Train ARCH on DATASET once per point of the `tuning:` grid (training split, `tuning.seed`), "
        "score each on the validation split at the epoch the selection rule keeps, and write the "
        "winner to models/DATASET/ARCH/tuning[/TASK]/choice.json, which `ctan train` then applies. "
        "STL tunes each task's network separately. The test split is never read.",
    )
    _add_params(p)
    _add_run_ids(p, task=True, seed=False)  # the seed is `tuning.seed`

    p = add(
        "evaluate",
        _cmd_evaluate,
        "score a trained model on the test split (metrics JSON, predictions)",
        "Evaluate the trained ARCH/SEED models of DATASET on its test split: OpenKBP dose and DVH "
        "scores, Dice/HD95, thresholded Jaccard, balanced accuracy and AUCs as the field defines them. "
        "With --on EXTERNAL: on every case of that external test set of DATASET instead, into "
        "results/DATASET/external/EXTERNAL/ARCH/seedSEED/.",
    )
    _add_params(p)
    _add_run_ids(p)
    p.add_argument(
        "--on",
        type=_name("dataset"),
        metavar="EXTERNAL",
        help="an external test set of DATASET (`external_of: DATASET` in params) to evaluate on",
    )

    p = add(
        "openkbp-score",
        _cmd_openkbp_score,
        "score OpenKBP challenge-format dose predictions against a reference split",
        "Compute the OpenKBP dose score and DVH score of pt_*.csv predictions against the reference "
        "patients (a provided-data split folder), as the challenge's reference code does.",
    )
    p.add_argument("--reference", required=True, help="folder of reference patients (pt_*/dose.csv, ...)")
    p.add_argument("--predictions", required=True, help="folder of predicted pt_*.csv dose files")
    p.add_argument("--output", type=_output_file, help="also write the JSON here")

    p = add(
        "summarize",
        _cmd_summarize,
        "collect every evaluation into results/summary.csv with Δ_MTL and provenance",
        "Gather the metrics of every dataset × architecture × seed in params.yaml, compare each to "
        "STL, compute Δ_MTL, and record provenance (data hashes, code version, params hash, MLflow run).",
    )
    _add_params(p)
    p.add_argument("--output", type=_output_file, default="results/summary.csv", help="summary CSV to write")

    p = add(
        "compare",
        _cmd_compare,
        "the architecture comparison: metrics, Δ_MTL with bootstrap intervals, cost, provenance",
        "Read every metrics.json and training history of the run in params.yaml and write "
        "OUTPUT/comparison.md (per-task mean ± std over seeds; Δ_MTL vs STL with a confidence interval "
        "from a paired bootstrap over test cases, seeds kept apart; the paper's figures; step time, "
        "data-wait share and peak memory; data hashes, code versions, MLflow run ids), "
        "OUTPUT/comparison.json and two figures. Resamples, confidence and RNG seed: `comparison:` in "
        "params.yaml.",
    )
    _add_params(p)
    p.add_argument(
        "--output", type=_output_folder, default="results/comparison", help="folder to write the report into"
    )

    p = add(
        "audit",
        _cmd_audit,
        "check that the data and models behind every number in a summary are unchanged",
        "Recompute every row of SUMMARY from the metrics files behind it (with the code that wrote it) and "
        "re-hash those files, the models, the preprocessed data and the raw sources. Prints CHANGED for "
        "each affected row, FILE for each changed file, and the command that rebuilds them; exits 1 if "
        "anything changed.",
    )
    p.add_argument("summary", help="results/summary.csv")
    p.add_argument(
        "--params",
        action="append",
        metavar="FILE",
        help="the parameter files the summary was made with (repeat to merge, in order): also check that "
        "it holds every dataset, architecture and seed they ask for, made with their settings (without "
        "them a summary from which a whole architecture or dataset was removed looks unchanged)",
    )

    p = add(
        "init-tracking",
        _cmd_init_tracking,
        "create the MLflow store and experiment once, before parallel jobs start",
        "Create the MLflow tracking database and experiment (parallel jobs racing on a new SQLite "
        "store crash); MLFLOW_TRACKING_URI overrides params.yaml.",
    )
    _add_params(p)

    p = add(
        "plot-summary",
        _cmd_plot_summary,
        "draw the report's Δ_MTL bar chart and per-task metric table from results/summary.csv",
        "Read SUMMARY (written by `ctan summarize`) and write a bar chart of Δ_MTL per dataset and "
        "architecture (mean ± std over seeds) and an HTML table of every task's metrics per architecture.",
    )
    p.add_argument("summary", help="results/summary.csv")
    p.add_argument(
        "--figure",
        type=_figure_file,
        default="results/delta_mtl.png",
        help="Δ_MTL bar chart to write (PNG; .svg or .pdf by suffix)",
    )
    p.add_argument(
        "--table",
        type=_output_file,
        default="results/metrics_table.html",
        help="metric table (HTML) to write",
    )
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, SLURM's scancel, Snakemake stopping its jobs) raised like Ctrl-C, so
    that the clean-up of a half-done stage runs (hidden partial folders and temporary files removed, the
    MLflow run ended) instead of the process vanishing and leaving them behind."""


def _on_sigterm(signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise Terminated


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Install the SIGTERM handler for one command (main thread only: Python's rule), then restore."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        with _sigterm_as_interrupt():
            # Inside the try: argument types (--seed, names) raise CtanError, one line like any other.
            args = parser.parse_args(argv)
            started = time.perf_counter()
            code = int(args.func(args) or 0)
            if args.command in JOB_COMMANDS:
                print(usage_line(args.command, started), file=sys.stderr)
            return code
    except CtanError as err:
        print(f"ctan: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print(
            "ctan: terminated (SIGTERM); run the same command again (training resumes from its last "
            "checkpoint)",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("ctan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
