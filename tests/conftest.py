"""Shared fixtures. Real-data tests skip where ../shared/data is absent, but fail under CI=true."""

from __future__ import annotations

import os
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
