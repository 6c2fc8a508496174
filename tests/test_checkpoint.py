"""A trained model's recorded SHA-256 (issue 13 item 3): written with the model, checked before loading."""

from __future__ import annotations

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
