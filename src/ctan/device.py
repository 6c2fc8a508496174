"""The device a job runs on: what `--device` names, else CUDA where there is one, else the CPU."""

from __future__ import annotations

import torch


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
