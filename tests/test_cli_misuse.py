"""What a researcher's shell does to a running command: SIGTERM (`kill`, `timeout`, SLURM's scancel,
Snakemake stopping its jobs) runs the clean-up a failure runs, so no half-written output is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from ctan.cli import main

REPO = Path(__file__).resolve().parents[1]

# `ctan preprocess`, stopped by SIGTERM after its third case is written (as `kill PID` would).
STOPPED = """
import os, signal, sys
from ctan import store
from ctan.cli import main

written = []
real = store.write_case


def write_case(*args, **kwargs):
    out = real(*args, **kwargs)
    written.append(1)
    if len(written) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return out


store.write_case = write_case
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_preprocess_leaves_no_partial_folder(tmp_path, capsys):
    """Before: the process vanished (exit -15, no message) and left `.ham.partial-*/` with the cases
    written so far; the clean-up in `finally:` never ran."""
    override = tmp_path / "override.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "run": {"datasets": ["ham"]},
                "paths": {k: str(tmp_path / k) for k in ("raw", "preprocessed", "models", "results")},
                "datasets": {
                    "ham": {
                        "format": "ham10000",
                        "source": "demo",
                        "sha256": None,
                        "demo": {"train": 4, "validation": 2, "test": 2, "seed": 3},
                        "tasks": ["lesion", "diagnosis"],
                        "preprocess": {"shape": [16, 16]},
                    }
                },
            }
        )
    )
    args = ["--params", str(REPO / "params.yaml"), "--params", str(override), "ham"]
    assert main(["download", *args]) == 0
    done = subprocess.run(
        [sys.executable, "-c", STOPPED, "preprocess", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stderr[-2000:])
    assert done.stderr.splitlines()[-1].startswith("ctan: terminated (SIGTERM); run the same command again")
    assert sorted(os.listdir(tmp_path / "preprocessed")) == []  # no partial folder, no output


def test_the_sigterm_handler_is_the_callers_again_after_a_command(tmp_path):
    """`main` called in a process (tests, notebooks) leaves that process's SIGTERM handling as it was."""
    before = signal.getsignal(signal.SIGTERM)
    assert main(["init-tracking", "--params", str(tmp_path / "absent.yaml")]) == 2
    assert signal.getsignal(signal.SIGTERM) is before
