"""Names stay names: nothing a dataset, task or seed says can make ctan write outside its folders.

Issue 13 items 1 and 9: `datasets: {../preprocessed: ...}` was accepted everywhere (and `ctan download
../preprocessed --force` replaced every preprocessed store); `--seed -1` left an empty `seed-1/`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctan.cli import main
from ctan.config import dataset_settings, load_params
from ctan.errors import CtanError
from ctan.layout import model_dir
from ctan.workspace import NAME_PATTERN, inside

REPO = Path(__file__).resolve().parents[1]
BAD_NAMES = ["../preprocessed", "../../../x", "a/b", ".", "..", "/tmp/x", "x-y", "ham demo", ""]


def _override(tmp_path: Path, datasets: dict, run: list[str]) -> Path:
    path = tmp_path / "override.yaml"
    override = {
        "run": {"datasets": run},
        "paths": {k: str(tmp_path / "ws" / k) for k in ("raw", "preprocessed", "models", "results")},
        "datasets": datasets,
    }
    path.write_text(yaml.safe_dump(override))
    return path


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctan: error: "), lines
    return lines[0]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("name", ["../preprocessed", "../../../x", "a/b", "x-y"])
def test_schema_refuses_a_dataset_key_that_is_not_a_plain_name(tmp_path, name):
    ham = yaml.safe_load((REPO / "params.yaml").read_text())["datasets"]["ham10000_demo"]
    override = _override(tmp_path, {name: ham}, ["ham10000_demo"])
    with pytest.raises(CtanError, match="invalid parameter at datasets.*does not match"):
        load_params([REPO / "params.yaml", override])


def test_schema_refuses_such_a_name_in_run_datasets(tmp_path):
    override = _override(tmp_path, {}, ["../x"])
    with pytest.raises(CtanError, match="run/datasets/0"):
        load_params([REPO / "params.yaml", override])


@pytest.mark.parametrize("name", BAD_NAMES)
def test_cli_refuses_such_a_name_before_writing_anything(tmp_path, capsys, name):
    """The issue's command, with its folders in tmp_path: one line, exit 2, nothing written anywhere."""
    override = _override(tmp_path, {}, ["ham10000_demo"])
    params = ["--params", str(REPO / "params.yaml"), "--params", str(override)]
    before = _files(tmp_path)
    assert main(["download", name, "--force", *params]) == 2
    assert "not a plain identifier" in _one_error_line(capsys)
    assert main(["train", *params, "--dataset", name, "--arch", "hps", "--seed", "0"]) == 2
    assert "not a plain identifier" in _one_error_line(capsys)
    assert main(["tune", *params, "--dataset", name, "--arch", "hps"]) == 2
    assert "not a plain identifier" in _one_error_line(capsys)
    assert _files(tmp_path) == before


def test_cli_refuses_a_task_that_is_not_a_plain_name(tmp_path, capsys):
    override = _override(tmp_path, {}, ["ham10000_demo"])
    params = ["--params", str(REPO / "params.yaml"), "--params", str(override)]
    args = ["train", *params, "--dataset", "ham10000_demo", "--arch", "stl", "--seed", "0", "--task", "../x"]
    assert main(args) == 2
    assert "task name '../x'" in _one_error_line(capsys)
    assert main(["tune", *params, "--dataset", "ham10000_demo", "--arch", "stl", "--task", "../x"]) == 2
    assert "task name '../x'" in _one_error_line(capsys)
    assert not (tmp_path / "ws").exists()


def test_library_refuses_such_a_name_too():
    params = load_params([REPO / "params.yaml"])
    params["datasets"]["../preprocessed"] = params["datasets"]["ham10000_demo"]  # bypassing the schema
    with pytest.raises(CtanError, match="not a plain identifier"):
        dataset_settings(params, "../preprocessed")


def test_every_output_path_stays_inside_its_folder(tmp_path):
    root = tmp_path / "models"
    assert inside(root, "ham", "ctan", "seed0") == root / "ham" / "ctan" / "seed0"
    for parts in [("..", "x"), ("a", "..", "..", "x"), ("/etc",), (".",), ("a", "..")]:
        with pytest.raises(CtanError, match="outside its configured folder"):
            inside(root, *parts)
    (root).mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CtanError, match="outside"):
        inside(root, "link", "x")
    settings = dataset_settings(load_params([REPO / "params.yaml"]), "ham10000_demo")
    with pytest.raises(CtanError, match="outside"):
        model_dir(settings, "stl", 0, "../../../../x")


def test_schema_and_package_agree_on_what_a_name_is():
    schema = yaml.safe_load((REPO / "src/ctan/data/params.schema.yaml").read_text())
    assert schema["definitions"]["name"]["pattern"] == f"^{NAME_PATTERN}$"
    assert (REPO / "workflow/schemas/params.schema.yaml").resolve() == (
        REPO / "src/ctan/data/params.schema.yaml"
    ).resolve()


@pytest.mark.parametrize("seed", ["-1", "-7", "x", "1.5"])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_seed_below_zero_is_refused_before_anything_is_created(tmp_path, capsys, command, seed):
    override = _override(tmp_path, {}, ["ham10000_demo"])
    params = ["--params", str(REPO / "params.yaml"), "--params", str(override)]
    assert main([command, *params, "--dataset", "ham10000_demo", "--arch", "hps", "--seed", seed]) == 2
    assert "--seed" in _one_error_line(capsys)
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("section", ["demo", "split"])
def test_schema_refuses_negative_data_seeds(tmp_path, section):
    override = tmp_path / "o.yaml"
    override.write_text(yaml.safe_dump({"datasets": {"ham10000_demo": {section: {"seed": -1}}}}))
    with pytest.raises(CtanError, match=f"ham10000_demo/{section}/seed"):
        load_params([REPO / "params.yaml", override])


def test_snakemake_refuses_such_a_dataset_before_planning(tmp_path):
    """The same schema guards Snakemake's config, so no wildcard can ever hold such a name."""
    from test_workflow import snakemake, workflow_copy

    copy = workflow_copy(tmp_path / "repo")
    ham = yaml.safe_load((REPO / "params.yaml").read_text())["datasets"]["ham10000_demo"]
    (copy / "bad.yaml").write_text(yaml.safe_dump({"datasets": {"../preprocessed": ham}}))
    out = snakemake(copy, "--dry-run", "--configfile", "bad.yaml", check=False)
    assert out.returncode != 0
    assert "does not match" in out.stdout + out.stderr
    assert not (copy / "data").exists()


def test_a_file_where_a_dataset_or_model_folder_belongs(tmp_path):
    """`models/ham10000_demo` (or `.../hps`) a file: a NotADirectoryError traceback at the first write."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "ham").write_text("not a folder\n")
    with pytest.raises(CtanError, match="is a file where ctan keeps the folder") as err:
        inside(root, "ham", "hps", "seed0")
    assert err.value.path == str(root / "ham")
    with pytest.raises(CtanError, match="is a file where ctan keeps the folder"):
        inside(root, "ham")
    assert inside(root, "other", "hps") == root / "other" / "hps"  # a folder yet to be made is fine
