import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctan.provenance import code_version, dvc_md5, tree_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]


def installed_tool(name: str) -> str:
    """A command-line tool of this environment: next to the running Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is neither next to {sys.executable} nor on PATH; install the package's deps")
    return found


def test_dvc_md5_matches_dvc_itself(tmp_path):
    """The summary's data hash must be the one dvc.lock records."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x").write_text("a\n")
    (tmp_path / "d" / "sub" / "y").write_bytes(b"\x00\x01binary")
    (tmp_path / "d" / ".snakemake_timestamp").write_text("")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    outs: [d]\n")
    (tmp_path / ".dvcignore").write_text(".snakemake_timestamp\n")
    dvc = installed_tool("dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "commit", "-f", "-q", "s"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    lock = (tmp_path / "dvc.lock").read_text()
    assert dvc_md5(tmp_path / "d") in lock


def test_tree_hash_ignores_timestamps_but_not_content(tmp_path):
    (tmp_path / "a").write_text("1")
    h = tree_sha256(tmp_path)
    (tmp_path / ".snakemake_timestamp").write_text("")
    assert tree_sha256(tmp_path) == h
    (tmp_path / "a").write_text("2")
    assert tree_sha256(tmp_path) != h


def test_code_version_reports_commit():
    commit, dirty = code_version(REPO_ROOT)
    assert len(commit) == 40 and isinstance(dirty, bool)


def test_machine_names_cpu_torch_threads_and_device():
    import torch

    from ctan.provenance import machine, machine_text

    m = machine("cpu")
    assert (
        m["torch"] == torch.__version__ and m["threads"] == torch.get_num_threads() and m["device"] == "cpu"
    )
    assert m["cpu"] and m["cores"] >= 1
    text = machine_text({"cpu": "AMD EPYC", "cores": 2, "torch": "2.13.0+cpu", "threads": 1, "device": "cpu"})
    assert text == "AMD EPYC (2 cores), torch 2.13.0+cpu, 1 thread, cpu"


def test_code_version_is_the_codes_checkout_wherever_ctan_runs(tmp_path, monkeypatch):
    """A run in a workspace outside the checkout recorded "unknown (dirty)" in every metrics.json."""
    monkeypatch.chdir(tmp_path)
    assert code_version() == code_version(REPO_ROOT)
