"""The demo workflow on a real one-node SLURM cluster, checked against the local executor.

What must hold for a researcher who moves to their cluster (docs/cluster.md):
- every job runs as a SLURM job: each rule's log names its SLURM job id, which the controller knows
  as a completed job of that rule, and the executor's per-job SLURM log carries the same id;
- `results/summary.csv` equals the local executor's: same rows, metric values and data hashes;
- `sbatch workflow/cluster/dvc-repro.sbatch STAGE` reproduces a stage on a node with the DVC cache on
  shared storage, after which `dvc status` is clean and the data hash is the one the workflow recorded.

Under CI=true the cluster is brought up here with .ci/slurm-cluster.sh (root) and the test fails if it
cannot be; jobs that an earlier, killed run left in its queue are cancelled first. Elsewhere it runs only
where a cluster already answers (`sudo .ci/slurm-cluster.sh` first).
Both workflow runs work on copies of the checkout (git-tracked and unignored files) in a tmp folder.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / ".ci" / "slurm-cluster.sh"
TARGET = "results/summary.csv"
PROFILES = ["workflow/profiles/slurm", "workflow/profiles/slurm-test"]
# Both runs together; on a busy machine raise it with CTAN_SLURM_TEST_TIMEOUT (seconds).
RUN_TIMEOUT_S = float(os.environ.get("CTAN_SLURM_TEST_TIMEOUT", 3600))
RUN_ID = re.compile(r"^SLURM run ID: (\S+)", re.MULTILINE)  # the executor's job name for this run
JOB_ID = re.compile(r"^SLURM_JOB_ID=(\d+)\b", re.MULTILINE)
# Summary columns that must agree between executors; run ids, code version and model file hashes
# legitimately differ between two runs.
KEY_COLUMNS = ["row_type", "dataset", "architecture", "seed", "task", "metric"]
VALUE_COLUMNS = ["value", "std", "n_seeds", "higher_is_better", "stl_value", "relative_change_pct"]
HASH_COLUMNS = ["data_hash", "data_content_hash", "source_sha256", "params_hash"]


def _sh(args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def _cluster_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return _sh(["sinfo", "--noheader"], timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def slurm_cluster() -> float:
    """Seconds the bring-up took (0 where the cluster was already up outside CI)."""
    if os.environ.get("CI") != "true":
        if not _cluster_answers():
            pytest.skip("no SLURM cluster answers `sinfo`; bring one up with `sudo .ci/slurm-cluster.sh`")
        return 0.0
    command = [str(CLUSTER_SCRIPT), "start"]
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            pytest.fail(f"CI=true: {CLUSTER_SCRIPT} must run as root, and sudo is missing")
        command = ["sudo", "-n", *command]
    start = time.monotonic()
    done = _sh(command, timeout=600)
    if done.returncode != 0 or not _cluster_answers():
        pytest.fail(f"CI=true: the one-node SLURM cluster did not come up:\n{done.stdout}\n{done.stderr}")
    _cancel_leftover_jobs(command[: command.index(str(CLUSTER_SCRIPT))])
    return time.monotonic() - start


def _cancel_leftover_jobs(sudo: list[str], timeout: float = 60) -> None:
    """Under CI the cluster is this test's own: jobs still queued or running come from an earlier run that
    was killed (a pending batch job, a killed Snakemake's jobs) and would hold the node's CPUs."""
    queued = _queued_job_ids()
    if not queued:
        return
    print(f"cancelling SLURM jobs left by an earlier run: {' '.join(queued)}")
    _sh([*sudo, "scancel", *queued])
    deadline = time.monotonic() + timeout
    while _queued_job_ids():
        if time.monotonic() > deadline:
            pytest.fail(f"CI=true: jobs left by an earlier run did not leave the queue:\n{_queue_report()}")
        time.sleep(1)


def _queued_job_ids() -> list[str]:
    return _sh(["squeue", "--noheader", "--format=%i"]).stdout.split()


def _queue_report() -> str:
    """What the controller says about the jobs still queued or running and about the node, for a failure
    message."""
    queue = _sh(["squeue", "--noheader", "--format=%i %j %T %r %M %C"]).stdout
    node = _sh(["sinfo", "--Node", "--noheader", "--format=%N %t CPUs(A/I/O/T)=%C"]).stdout
    return f"squeue:\n{queue.strip() or '(empty)'}\nsinfo:\n{node.strip()}"


def _wait_for_job(job_id: str, timeout: float) -> str:
    """The job's final state; past the timeout the job is cancelled (so that it cannot hold the node for a
    later run) and the test fails with what the controller says about it."""
    deadline = time.monotonic() + timeout
    while True:
        state = _sh(["squeue", "--jobs", job_id, "--states=all", "--noheader", "--format=%T"]).stdout.strip()
        if state and state not in {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}:
            return state
        if time.monotonic() > deadline:
            report = _queue_report()
            _sh(["scancel", job_id])  # the test's own job: no sudo needed
            still = state or "(unknown)"
            pytest.fail(f"SLURM job {job_id} still {still} after {timeout:.0f} s; cancelled\n{report}")
        time.sleep(2)


def _environment(checkout: Path) -> dict[str, str]:
    """This Python's bin folder first on PATH (snakemake, ctan, dvc), the checkout's own code, no inherited
    run state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SNAKEMAKE_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout / "src"), env.get("PYTHONPATH")]))
    env.update(DVC_NO_ANALYTICS="1", MPLBACKEND="Agg")
    return env


def _copy_checkout(dest: Path) -> Path:
    """The files a fresh clone would have plus unignored work in progress, as a git repository of its own
    (DVC and the summary's provenance need one)."""
    listed = _sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=ctan-test", "-c", "user.email=ctan-test@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "checkout copy for test_slurm"]):
        _sh([*git, *args], cwd=dest, check=True)
    return dest


def _start_snakemake(checkout: Path, extra: list[str]) -> subprocess.Popen:
    with open(checkout / "snakemake-test.log", "w") as log:
        return subprocess.Popen(
            ["snakemake", *extra, TARGET],
            cwd=checkout,
            env=_environment(checkout),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _finish(process: subprocess.Popen, checkout: Path, what: str, deadline: float) -> None:
    """Wait; past the deadline, interrupt Snakemake (which cancels its SLURM jobs), then make sure."""
    try:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = (checkout / "snakemake-test.log").read_text()
    if process.returncode != 0 and (run_id := RUN_ID.search(output)):
        _sh(["scancel", "--name", run_id.group(1)])
    assert process.returncode == 0, (
        f"{what} failed (exit {process.returncode}; SLURM daemons' logs: /var/lib/ctan-slurm/log):\n"
        f"{output[-6000:]}"
    )


@pytest.fixture(scope="module")
def workflow_runs(slurm_cluster, tmp_path_factory, request) -> dict:
    """The demo workflow under SLURM, and with the local executor, each in its own copy.

    The local run is the session fixture `local_demo_run` where tests/conftest.py defines one (the
    end-to-end test's run: a checkout copy where `snakemake --cores 2 results/summary.csv` completed),
    so CI runs the demo locally only once; otherwise it runs here, alongside the SLURM run.
    """
    slurm_dir = _copy_checkout(tmp_path_factory.mktemp("slurm-run"))
    start = time.monotonic()
    deadline = start + RUN_TIMEOUT_S
    slurm = _start_snakemake(slurm_dir, [arg for p in PROFILES for arg in ("--profile", p)])
    try:
        local_dir, local = Path(request.getfixturevalue("local_demo_run")), None
    except pytest.FixtureLookupError:
        local_dir = _copy_checkout(tmp_path_factory.mktemp("local-run"))
        local = _start_snakemake(local_dir, ["--cores", "2"])
    _finish(slurm, slurm_dir, "the workflow under SLURM", deadline)
    slurm_s = time.monotonic() - start
    if local is not None:
        _finish(local, local_dir, "the workflow with the local executor", deadline)
    return {
        "slurm": slurm_dir,
        "local": local_dir,
        "seconds": {"bring-up": slurm_cluster, "slurm run": slurm_s, "both runs": time.monotonic() - start},
    }


def _rule_logs(checkout: Path, slurm_logdir: Path) -> dict[Path, str]:
    """Each job's log under logs/: not the executor's own SLURM logs, not the onstart log (written on the
    submitting host), not the dvc-repro batch job's log."""
    logs = {}
    for path in sorted((checkout / "logs").rglob("*.log")):
        if path.is_relative_to(slurm_logdir) or path.name == "init-tracking.log":
            continue
        if path.name.startswith("ctan-dvc-repro-"):
            continue
        logs[path.relative_to(checkout)] = path.read_text(errors="replace")
    return logs


def _slurm_logdir(checkout: Path) -> Path:
    logdir = ".snakemake/slurm_logs"
    for profile in PROFILES:
        settings = yaml.safe_load((checkout / profile / "config.yaml").read_text()) or {}
        logdir = settings.get("slurm-logdir", logdir)
    return checkout / logdir


@pytest.mark.slow
def test_jobs_ran_under_slurm(workflow_runs):
    checkout = workflow_runs["slurm"]
    slurm_logdir = _slurm_logdir(checkout)
    logs = _rule_logs(checkout, slurm_logdir)
    assert logs, "the SLURM run left no rule logs under logs/"
    ids: dict[str, Path] = {}
    for path, text in logs.items():
        found = JOB_ID.findall(text)
        assert found, f"{path}: no `SLURM_JOB_ID=<id>` line; did this job run under SLURM?"
        assert found[-1] not in ids, f"{path} and {ids[found[-1]]} name the same SLURM job {found[-1]}"
        ids[found[-1]] = path

    # The executor's per-job logs are named <jobid>.log, under rule_<rule>/<wildcards>/.
    executor_logs = {p.stem: p for p in slurm_logdir.rglob("*.log")}
    assert set(ids) <= set(executor_logs), (
        f"job ids without an executor log in {slurm_logdir}: {sorted(set(ids) - set(executor_logs))}"
    )

    # The controller still lists finished jobs (MinJobAge): each id is a COMPLETED job of its rule.
    queue = _sh(["squeue", "--states=all", "--noheader", "--format=%i|%T|%k"])
    assert queue.returncode == 0, queue.stderr
    rows = (line.split("|", 2) for line in queue.stdout.splitlines())
    known = {job_id: (state, comment) for job_id, state, comment in rows}
    for job_id, path in ids.items():
        assert job_id in known, f"{path}: SLURM job {job_id} unknown to squeue"
        state, comment = known[job_id]
        rule = executor_logs[job_id].relative_to(slurm_logdir).parts[0]
        assert state == "COMPLETED", f"{path}: SLURM job {job_id} is {state}"
        assert comment.startswith(rule), f"{path}: SLURM job {job_id} was submitted as {comment}, not {rule}"

    # The marker appears only under SLURM: the local executor's logs do not carry it.
    local = workflow_runs["local"]
    marked = [p for p, text in _rule_logs(local, local / "logs" / "slurm").items() if JOB_ID.search(text)]
    assert not marked, f"local-executor logs claim SLURM job ids: {marked}"
    print(f"{len(ids)} SLURM jobs; timings (s): {workflow_runs['seconds']}")


def _summary(path: Path) -> dict[tuple[str, ...], dict[str, str]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = {tuple(row[c] for c in KEY_COLUMNS): row for row in rows}
    assert len(table) == len(rows), f"{path}: duplicate rows"
    return table


def _same_number(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return x == y or (math.isnan(x) and math.isnan(y))


@pytest.mark.slow
def test_summary_equals_local_run(workflow_runs):
    on_slurm = _summary(workflow_runs["slurm"] / TARGET)
    local = _summary(workflow_runs["local"] / TARGET)
    assert on_slurm.keys() == local.keys(), "the two runs' summaries have different rows"
    assert any(row["row_type"] == "delta_mtl" for row in local.values())
    differences = [
        f"{key} {column}: SLURM {row[column]!r} != local {local[key][column]!r}"
        for key, row in on_slurm.items()
        for column in VALUE_COLUMNS + HASH_COLUMNS
        if not _same_number(row[column], local[key][column])
    ]
    assert not differences, "\n".join(differences[:20])
    assert all(row["data_hash"] for row in local.values()), "rows without a data hash"


@pytest.mark.slow
def test_dvc_repro_batch_job_leaves_status_clean(workflow_runs, tmp_path_factory):
    checkout = workflow_runs["slurm"]
    env = _environment(checkout)
    dataset = yaml.safe_load((checkout / "params.yaml").read_text())["run"]["datasets"][0]
    stage = f"preprocess@{dataset}"
    env["CTAN_DVC_CACHE"] = str(tmp_path_factory.mktemp("shared") / "dvc-cache")
    (checkout / "logs").mkdir(exist_ok=True)
    batch = ["sbatch", "--parsable", "--mem=2000", "workflow/cluster/dvc-repro.sbatch", stage]
    submitted = _sh(batch, cwd=checkout, env=env)
    assert submitted.returncode == 0, f"sbatch exit {submitted.returncode}: {submitted.stderr}"
    job_id = submitted.stdout.strip().split(";")[0]
    state = _wait_for_job(job_id, timeout=600)
    job_log = checkout / "logs" / f"ctan-dvc-repro-{job_id}.log"
    log_text = job_log.read_text() if job_log.is_file() else f"(no {job_log})"
    assert state == "COMPLETED", f"SLURM job {job_id} ended {state}:\n{log_text[-4000:]}"
    assert f"SLURM_JOB_ID={job_id}" in log_text

    status = _sh(["dvc", "status", "--json", stage], cwd=checkout, env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout or "{}") == {}, f"dvc status after the batch job: {status.stdout}"
    assert any(Path(env["CTAN_DVC_CACHE"]).rglob("*")), "nothing reached the shared DVC cache"

    # The node rebuilt the very data the SLURM workflow recorded in results/summary.csv.
    lock = yaml.safe_load((checkout / "dvc.lock").read_text())
    md5 = lock["stages"][stage]["outs"][0]["md5"]
    recorded = {row["data_hash"] for row in _summary(checkout / TARGET).values() if row["dataset"] == dataset}
    assert recorded == {md5}, f"dvc.lock md5 {md5} != summary data_hash {recorded}"


def _planned_resources(checkout: Path, profiles: list[str]) -> dict[str, list[str]]:
    """Rule -> the `resources:` line of each job a dry run with `profiles` plans."""
    args = [arg for p in profiles for arg in ("--profile", p)]
    done = _sh(["snakemake", "-n", *args, TARGET], cwd=checkout, env=_environment(checkout), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    planned: dict[str, list[str]] = {}
    rule = None
    for line in done.stdout.splitlines():
        if header := re.match(r"^(?:local)?rule (\w+):", line):
            rule = header.group(1)
        elif rule and line.strip().startswith("resources:"):
            planned.setdefault(rule, []).append(line.split(":", 1)[1])
    return planned


def test_training_jobs_ask_slurm_for_a_gpu_and_the_test_profile_for_none(tmp_path):
    """The real profile leaves the training rules' `gpu: 1` alone (the executor turns it into --gpus=1);
    the test profile, for a node without GPU, sets it to 0 and moves every job to partition debug."""
    checkout = _copy_checkout(tmp_path)
    real = _planned_resources(checkout, PROFILES[:1])
    test = _planned_resources(checkout, PROFILES)
    for rule in ("train_mtl", "train_stl"):
        assert real[rule] and all(re.search(r"\bgpu=1\b", r) for r in real[rule]), real[rule]
        assert all(re.search(r"\bgpu=0\b", r) for r in test[rule]), test[rule]
    others = [r for rule, lines in real.items() if not rule.startswith("train") for r in lines]
    assert others and not any(re.search(r"\bgpu=", r) for r in others), "only training should want a GPU"
    assert all("slurm_partition=debug" in r for lines in test.values() for r in lines)
