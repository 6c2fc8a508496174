"""The device a job runs on: what `--device` names, else CUDA where there is one, else the CPU."""

from __future__ import annotations

import torch


def pick_device(device: str | None) -> torch.device:
    """``--device`` as torch's device (default: cuda where there is one, else cpu); one that torch does
    not know, or that this machine lacks, is a one-line error before any work."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ctan.errors import CtanError

    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise CtanError("--device", f"{device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise CtanError("--device", f"{device}: this machine has no CUDA device torch can use; use cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise CtanError("--device", f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise CtanError("--device", f"{device}: MPS is not available here; use cpu")
    return chosen


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit: larger values are refused


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed tensor memory for the next step instead of returning it to the OS.

    By default glibc serves a block of 128 KiB and more (most activations) with its own mmap and
    unmaps it on free, so every training step pays page faults and zeroing for all its activations
    again; freed heap tops are trimmed likewise. Raising both thresholds (to 32 MiB and 1 GiB) made a
    HAM10000 real-sample training job 6.5 % faster here (docs/architecture.md, Cost), with a
    byte-identical model.pt. A no-op (False) off glibc, and with ``CTAN_MALLOC=glibc-default`` (the
    baseline of such A/B measurements)."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("CTAN_MALLOC") == "glibc-default":
        return False

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, 2**30))
