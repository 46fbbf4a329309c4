"""Choosing the torch device from ``--device auto|cpu|cuda``."""

from __future__ import annotations

import torch

from charlm.errors import DeviceError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU.

    Raises:
        DeviceError: an unknown name, or CUDA asked for on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} (use auto, cpu or cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is available here (try --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {name!r} (use auto, cpu or cuda)")
    return device
