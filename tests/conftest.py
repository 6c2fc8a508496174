"""Shared fixtures. Real-data tests skip where ../shared/data is absent, but fail under CI=true."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED_DATA} is missing, and CI=true requires the real data samples")
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


def strict_json_loads(text: str):
    """JSON as the standard has it: bare ``NaN`` and ``Infinity`` are not JSON (jq, R's jsonlite and
    browsers refuse them), so a file ctan writes must parse here."""

    def refuse(token: str):
        raise AssertionError(f"{token} is not JSON: jq, R and browsers refuse it")

    return json.loads(text, parse_constant=refuse)


@contextmanager
def run_folder(root: Path) -> Iterator[Path]:
    """Work inside ``root`` as a run's own folder (params.yaml copied in, relative paths as the workflow
    has them, so copies of it still work), with a file MLflow store and one torch thread; the working
    directory and environment are restored after."""
    import shutil

    import torch

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    # mlflow caches one store per tracking URI for the session: a relative file store ("mlruns") made in
    # an earlier run folder would not be set up again in this one.
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    cwd = Path.cwd()
    env = pytest.MonkeyPatch()
    # A file store: creating a SQLite one costs ~15 s of migrations, more than a tiny run.
    env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.chdir(root)
    try:
        torch.set_num_threads(1)
        yield root
    finally:
        os.chdir(cwd)
        env.undo()


def work_in_copy(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of a `run_folder` run as the working directory, set up as `run_folder` sets it up."""
    import shutil

    import torch

    copy = tmp_path / "run"
    shutil.copytree(built, copy, symlinks=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    return copy


def copy_checkout(dest: Path) -> Path:
    """The checkout as a fresh clone would have it: tracked files plus untracked, non-ignored ones."""
    import shutil
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = REPO / name
        if src.is_symlink() or src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="session")
def local_demo_run(tmp_path_factory) -> Path:
    """The README's main job, `snakemake --cores 2 results/summary.csv`, run once per session.

    Shared by the end-to-end tests and the SLURM comparison so that CI runs the demo only once.
    CTAN_DEMO_RUN=<folder of a finished run> reuses one instead (for working on these tests).
    """
    import subprocess
    import sys

    if os.environ.get("CTAN_DEMO_RUN"):
        return Path(os.environ["CTAN_DEMO_RUN"])

    root = copy_checkout(tmp_path_factory.mktemp("demo-run"))
    env = dict(os.environ, MPLBACKEND="Agg", DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "--cores", "2", "results/summary.csv"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,  # beside the SLURM test's own demo run on a 2-core runner (about 25-35 min)
    )
    if proc.returncode != 0:
        pytest.fail(f"the default workflow failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return root
