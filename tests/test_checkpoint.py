"""A trained model's recorded SHA-256 (issue 13 item 3): written with the model, checked before loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ctan.errors import CtanError
from ctan.provenance import file_sha256
from ctan.training import checkpoint


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "seed0" / "model.pt"
    checkpoint.save_model({"state_dict": {"w": torch.arange(64.0)}}, path)
    return path


def test_the_recorded_hash_is_the_models_and_in_sha256sum_format(tmp_path):
    path = _model(tmp_path)
    assert (path.parent / "model.pt.sha256").read_text() == f"{file_sha256(path)}  model.pt\n"
    assert checkpoint.verify(path) == file_sha256(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt", "model.pt.sha256"]  # no temp files


def test_one_flipped_bit_is_refused_naming_the_file(tmp_path):
    path = _model(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CtanError, match="differs from .* recorded in model.pt.sha256") as err:
        checkpoint.verify(path)
    assert err.value.path == str(path)


def test_a_model_without_its_record_is_refused(tmp_path):
    path = _model(tmp_path)
    (path.parent / "model.pt.sha256").unlink()
    with pytest.raises(CtanError, match="no recorded SHA-256"):
        checkpoint.verify(path)


@pytest.mark.parametrize("damage", ["random bytes", "cut in half"])
def test_a_damaged_model_with_a_matching_record_is_refused_naming_the_file(tmp_path, damage):
    """The record only says the file is what training wrote; a file damaged before its record was
    re-made (or a foreign file with its own record) must still fail as a CtanError, not a traceback."""
    path = _model(tmp_path)
    data = path.read_bytes()
    path.write_bytes(os.urandom(20_000) if damage == "random bytes" else data[: len(data) // 2])
    checkpoint.digest_path(path).write_text(f"{file_sha256(path)}  model.pt\n")
    checkpoint.verify(path)
    with pytest.raises(CtanError, match="not a readable checkpoint") as err:
        checkpoint.load(path)
    assert err.value.path == str(path)
