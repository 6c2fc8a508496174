"""Output options (summarize, compare, plot-summary, openkbp-score): a path no file can be written to is
one line naming it, before any work, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctan.cli import main


def _fails(capsys, argv: list[str], path: Path, problem: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"ctan: error: {path}: {problem}\n"


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "folder"
    (folder / "inside").mkdir(parents=True)
    file = tmp_path / "file.txt"
    file.write_text("not a folder\n")
    return {"folder": folder, "file": file, "under_file": file / "out.csv"}


def _unchanged(tmp_path: Path) -> None:
    """Only what the fixture made: no .tmp file, no folder made in a failed run."""
    found = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert found == ["file.txt", "folder", "folder/inside"]


# Before: summarize got as far as its params (here: missing) or, with a run, to its write, which raised
# IsADirectoryError / FileExistsError and left .out.tmp behind. openkbp-score scored everything first.
@pytest.mark.parametrize("command", ["summarize", "openkbp-score"])
def test_an_output_file_that_is_a_folder_or_under_a_file(tmp_path, capsys, places, command):
    params = ["--params", str(tmp_path / "absent.yaml")]
    if command == "openkbp-score":
        params = ["--reference", str(tmp_path / "no-ref"), "--predictions", str(tmp_path / "no-pred")]
    _fails(
        capsys,
        [command, *params, "--output", str(places["folder"])],
        places["folder"],
        "is a folder; give the path of a file to write",
    )
    _fails(
        capsys,
        [command, *params, "--output", str(places["under_file"])],
        places["under_file"],
        f"cannot be written: {places['file']} is a file, not a folder",
    )
    _unchanged(tmp_path)


def test_compare_output_that_is_a_file(tmp_path, capsys, places):
    """A FileExistsError traceback from mkdir before, after the whole bootstrap."""
    params = ["--params", str(tmp_path / "absent.yaml")]
    _fails(
        capsys,
        ["compare", *params, "--output", str(places["file"])],
        places["file"],
        "is a file; give the folder to write into",
    )
    _fails(
        capsys,
        ["compare", *params, "--output", str(places["under_file"])],
        places["under_file"],
        f"cannot be written: {places['file']} is a file, not a folder",
    )
    _unchanged(tmp_path)


@pytest.mark.parametrize("key", ["raw", "preprocessed", "models", "results"])
def test_a_configured_folder_that_is_a_file(tmp_path, capsys, places, key):
    """`paths.models: <a file>` was a NotADirectoryError traceback from `ctan train` (FileExistsError
    from download and preprocess), after loading the data; now every command refuses the parameters."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    for value, problem in [
        (places["file"], "is a file, not a folder"),
        (places["under_file"], f"lies under {places['file']}, which is a file, not a folder"),
    ]:
        override = tmp_path / "paths.yaml"
        folders = {k: str(tmp_path / "folder" / k) for k in ("raw", "preprocessed", "models", "results")}
        override.write_text(yaml.safe_dump({"paths": {**folders, key: str(value)}}))
        params = ["--params", str(repo / "params.yaml"), "--params", str(override)]
        argv = ["train", *params, "--dataset", "ham10000_demo", "--arch", "hps", "--seed", "0"]
        _fails(
            capsys,
            argv,
            override,
            f"invalid parameter at paths/{key}: {value} {problem}; move the "
            f"file away or set paths.{key} to a folder (it is made where missing)",
        )
        override.unlink()
    _unchanged(tmp_path)
