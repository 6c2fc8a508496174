from pathlib import Path

import pytest
import yaml

from ctan.cli import main
from ctan.config import dataset_settings, load_params
from ctan.errors import CtanError

REPO = Path(__file__).resolve().parents[1]


def test_default_params_validate_and_merge_overrides():
    params = load_params([REPO / "params.yaml"])
    ham = dataset_settings(params, "ham10000_demo")
    assert ham.training["batch_size"] == 8  # per-dataset override
    assert ham.training["lr"] == params["training"]["lr"]  # global default kept


def test_override_file_merges_deeply(tmp_path):
    override = tmp_path / "o.yaml"
    override.write_text(yaml.safe_dump({"training": {"epochs": 3}}))
    base = load_params([REPO / "params.yaml"])
    params = load_params([REPO / "params.yaml", override])
    assert params["training"]["epochs"] == 3
    assert params["training"]["batch_size"] == base["training"]["batch_size"]  # kept, not replaced


def test_a_pinned_digest_in_capitals_is_the_same_setting(tmp_path):
    """As `ctan download --sha256` takes it: pasting a digest in capitals changes neither the check nor
    the parameters hash of the data."""
    digests = {}
    for case in ("lower", "upper"):
        digest = "ab12" * 16
        override = tmp_path / f"{case}.yaml"
        override.write_text(
            yaml.safe_dump({"datasets": {"ham10000_demo": {"sha256": getattr(digest, case)()}}})
        )
        digests[case] = dataset_settings(load_params([REPO / "params.yaml", override]), "ham10000_demo")
    assert digests["upper"].sha256 == digests["lower"].sha256 == "ab12" * 16
    assert digests["upper"].data_section == digests["lower"].data_section


def test_invalid_parameter_names_the_key(tmp_path):
    override = tmp_path / "bad.yaml"
    override.write_text(yaml.safe_dump({"training": {"weighting": "magic"}}))
    with pytest.raises(CtanError, match="training/weighting"):
        load_params([REPO / "params.yaml", override])


def test_cli_reports_missing_params_file_in_one_line(tmp_path, capsys):
    code = main(["download", "openkbp_demo", "--params", str(tmp_path / "nope.yaml")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml" in err[0]


@pytest.mark.parametrize(
    "override, said",
    [
        ({"training": {"epochs": 2.0}}, "training/epochs: 2.0 is not of type 'integer'"),
        ({"training": {"lr": float("nan")}}, "training/lr: nan is not a finite number"),
        ({"tuning": {"lr": [0.001, float("inf")]}}, "tuning/lr/1: inf is not a finite number"),
        ({"run": {"seeds": [0, 2**32]}}, f"run/seeds/1: {2**32} exceeds"),
        ({"run": {"seeds": [0, 0]}}, "run/seeds: [0, 0] has non-unique elements"),
        ({"run": {"architectures": ["stl", "hps", "hps"]}}, "run/architectures"),
        (
            {"datasets": {"openkbp_demo": {"preprocess": {"ct_window": [500, -300]}}}},
            "datasets/openkbp_demo/preprocess/ct_window: [500, -300] is not [low, high]",
        ),
        ({"model": {"attention_heads": 3}}, "model: attention_heads=3 must divide the 64 bottleneck"),
        (
            {"datasets": {"ham10000_demo": {"model": {"attention_heads": 5}}}},
            "datasets/ham10000_demo/model: attention_heads=5 must divide",
        ),
        (
            {"paths": {"models": "out", "results": "out"}},
            "paths/models: out is the same folder as paths/results",
        ),
        (
            {"paths": {"preprocessed": "data/raw/pre"}},
            "paths/preprocessed: data/raw/pre lies inside paths/raw",
        ),
        (
            {"training": {"patch_size": [64, 16, 16]}},
            "training/patch_size (for openkbp_demo): [64, 16, 16] is larger than the preprocessed shape "
            "[24, 32, 32] on axis 0",
        ),
    ],
)
def test_settings_that_would_give_wrong_results_or_delete_data_are_refused(tmp_path, override, said):
    """Each passed the schema before: counted twice, trained to NaN, tracebacks, or (overlapping folders)
    preprocess --force replacing the downloads and evaluate deleting the models; a patch larger than the
    volume trained on padding (~40x slower)."""
    path = tmp_path / "o.yaml"
    path.write_text(yaml.safe_dump(override))
    with pytest.raises(CtanError, match="invalid parameter at") as err:
        load_params([REPO / "params.yaml", path])
    assert said in str(err.value)


@pytest.mark.parametrize("device, said", [("foo", "not a torch device"), ("cuda:7", "CUDA")])
def test_a_device_torch_or_this_machine_lacks_is_one_line(device, said):
    import torch

    from ctan.device import pick_device

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that many CUDA devices")
    with pytest.raises(CtanError, match=said):
        pick_device(device)


def test_an_invalid_parameter_names_the_file_that_set_it(tmp_path):
    """Not every merged file: the one whose value the merge kept (a problem across keys names all)."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"training": {"lr": -1.0}}))
    second.write_text(yaml.safe_dump({"training": {"epochs": 3}, "run": {"seeds": [1, 1]}}))
    with pytest.raises(CtanError) as err:
        load_params([REPO / "params.yaml", first])
    assert str(err.value).startswith(f"{first}: invalid parameter at training/lr:")
    with pytest.raises(CtanError) as err:
        load_params([REPO / "params.yaml", second])
    assert str(err.value).startswith(f"{second}: invalid parameter at run/seeds:")
    # Set in the first file, left alone by the override: the first file is named.
    base = tmp_path / "params.yaml"
    base.write_text((REPO / "params.yaml").read_text().replace("lr: 0.005", "lr: -0.005", 1))
    other = tmp_path / "c.yaml"
    other.write_text(yaml.safe_dump({"training": {"epochs": 3}}))
    with pytest.raises(CtanError) as err:
        load_params([base, other])
    assert str(err.value).startswith(f"{base}: invalid parameter at training/lr:")
    # A problem across keys (a patch larger than a shape set elsewhere) names every file.
    first.write_text(yaml.safe_dump({"training": {"patch_size": [32, 32, 32]}}))
    with pytest.raises(CtanError) as err:
        load_params([REPO / "params.yaml", first])
    both = f"{REPO / 'params.yaml'}, {first}"
    assert str(err.value).startswith(f"{both}: invalid parameter at training/patch_size (for")


# ----------------------------------------------------------------------------------------------------
# What a researcher types wrong in a parameter file: one line naming the file, the place and the fix.


def _one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctan: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "text, said",
    [
        ("training:\n  epochs: [1\n", "not valid YAML: line 3, column 1: expected ',' or ']'"),
        ("training:\n\tepochs: 3\n", "line 2, column 1: found character '\\t'"),
        ("training:\n\tepochs: 3\n", "indent with spaces"),
        ("", "holds no parameters (empty, or only comments)"),
        ("# epochs: 3\n", "holds no parameters (empty, or only comments)"),
        (
            "- training\n- epochs\n",
            "expected a mapping of parameters (key: value) at the top level, found a list",
        ),
        # PyYAML keeps the second `training:` silently: the first block's epochs would be lost.
        (
            "training:\n  epochs: 3\nmodel: {width: 8}\ntraining:\n  batch_size: 4\n",
            "key 'training' appears twice in one mapping (lines 1 and 4)",
        ),
        ("training: {epochs: 3, epochs: 4}\n", "key 'epochs' appears twice"),
    ],
    ids=["syntax", "tab", "tab-fix", "empty", "comments", "list", "key-twice", "key-twice-inline"],
)
def test_a_parameter_file_that_is_not_a_mapping_of_parameters(tmp_path, capsys, monkeypatch, text, said):
    """The empty and commented-out files and the repeated key were accepted silently (nothing, or only the
    last block, applied); the YAML errors named `"<unicode string>"` instead of the file's line."""
    monkeypatch.chdir(tmp_path)  # an override accepted by mistake must not create a store in the repo
    path = tmp_path / "override.yaml"
    path.write_text(text)
    line = _one_line(capsys, ["init-tracking", "--params", str(REPO / "params.yaml"), "--params", str(path)])
    assert line.startswith(f"ctan: error: {path}: ") and said in line, line
    assert "<unicode string>" not in line
    assert not (tmp_path / "mlflow.db").exists()


def test_a_parameter_file_that_is_not_text_or_is_a_folder(tmp_path, capsys, monkeypatch):
    """Not UTF-8: a UnicodeDecodeError traceback; a folder: 'parameter file not found'."""
    monkeypatch.chdir(tmp_path)
    binary = tmp_path / "params.yaml.gz"
    binary.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe training")
    line = _one_line(capsys, ["init-tracking", "--params", str(binary)])
    said = "not a text file (byte 0x8b at offset 1 is not UTF-8); give a YAML parameter file"
    assert line == f"ctan: error: {binary}: {said}"
    folder = tmp_path / "config"
    folder.mkdir()
    line = _one_line(capsys, ["init-tracking", "--params", str(folder)])
    assert (
        line
        == f"ctan: error: {folder}: is a folder, not a parameter file; give a YAML file such as params.yaml"
    )


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("common: &c {epochs: 3}\ntraining:\n  <<: *c\n  batch_size: 4\n")
    from ctan.config import read_params_file

    assert read_params_file(path)["training"] == {"epochs": 3, "batch_size": 4}


@pytest.mark.parametrize(
    "text, said",
    [
        (
            "training:\n  learning_rate: 0.001\n",
            "invalid parameter at training/learning_rate: unknown key 'learning_rate' (did you mean 'lr'?",
        ),
        ("training:\n  batchsize: 4\n", "unknown key 'batchsize' (did you mean 'batch_size'?"),
        ('training:\n  epochs: "20"\n', "training/epochs: '20' is text, not a number"),
        ('training:\n  epochs: "20"\n', "write 20 without quotes"),
        # YAML 1.1 (PyYAML, Snakemake) reads 1e-3 as a string: "'1e-3' is not of type 'number'" before.
        ("training:\n  lr: 1e-3\n", "training/lr: '1e-3' is text, not a number"),
        ("training:\n  lr: 1e-3\n", "write 0.001 or 1.0e-3"),
        ("tuning:\n  lr: [3e-4, 1.0e-3]\n", "tuning/lr/0: '3e-4' is text, not a number"),
        ("training:\n  epochs: 1e2\n", "training/epochs: '1e2' is text, not a number: YAML 1.1"),
        ("training:\n  epochs: 1e2\n", "; write 100"),
        ("run:\n  seeds: 0\n", "run/seeds: 0 is not a list; write [0] for a list of one"),
        ("run:\n  architectures: [stl, ctna]\n", "'ctna' (known: stl, hps, mtan, ctan, "),
        ("run:\n  architectures: [stl, ctna]\n", "; did you mean 'ctan'?"),
        # Found by `ctan summarize` before, after every model of the run had trained.
        ("run:\n  architectures: [hps, ctan]\n", "run/architectures: ['hps', 'ctan'] has no 'stl'"),
        (
            "run:\n  datasets: [ham10000_demo, ham_demo]\n",
            "invalid parameter at run/datasets/1: 'ham_demo' is not defined under datasets: (defined: ",
        ),
    ],
)
def test_a_misspelt_or_mistyped_parameter_says_what_to_write(tmp_path, text, said):
    """Each named the key before, but not the fix; a dataset missing from datasets: named every file."""
    path = tmp_path / "override.yaml"
    path.write_text(text)
    with pytest.raises(CtanError) as err:
        load_params([REPO / "params.yaml", path])
    assert str(err.value).startswith(f"{path}: invalid parameter at "), str(err.value)
    assert said in str(err.value)


def test_the_repository_parameter_files_have_no_repeated_keys():
    from ctan.config import read_params_file

    for path in [REPO / "params.yaml", *sorted((REPO / "config").glob("*.yaml"))]:
        assert read_params_file(path)


def test_an_unknown_dataset_on_the_command_line_suggests_the_defined_one():
    params = load_params([REPO / "params.yaml"])
    with pytest.raises(CtanError) as err:
        dataset_settings(params, "ham1000_demo")
    assert "unknown dataset 'ham1000_demo'; params define: " in str(err.value)
    assert str(err.value).endswith("; did you mean 'ham10000_demo'?"), str(err.value)
