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
