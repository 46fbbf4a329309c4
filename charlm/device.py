"""Choosing the torch device (``--device auto|cpu|cuda``) and the training arithmetic
(``--precision auto|fp32|bf16``)."""

from __future__ import annotations

import torch

from charlm.config import OptimizerKind, Precision
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
        raise DeviceError(
            "{device} cuda: no CUDA GPU is available here (try {device} cpu)", fields=("device",)
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(
            f"{{device}} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)",
            fields=("device",),
        )
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {name!r} (use auto, cpu or cuda)")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 bf16 or AMX), where bf16 autocast
    speeds training up; without them bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:  # not Linux: assume not
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(
    precision: Precision, device: torch.device, optimizer: OptimizerKind
) -> torch.dtype | None:
    """The autocast dtype of the training step, or None for plain fp32.

    ``auto`` picks bf16 where the hardware runs it natively (a CUDA GPU with bf16 support, a CPU
    with AVX-512 bf16 or AMX), fp32 elsewhere, and fp32 for plain SGD everywhere: SGD at lr 20
    hardly learned in bf16 on python-stdlib, while Adam in bf16 scores as it does in fp32, step
    for step (the figures: docs/defaults.md, "The classic cells", and docs/benchmarks/speed.md,
    "Training in bf16").

    Raises:
        DeviceError: bf16 asked for on a CUDA GPU without bf16 support.
    """
    if precision is Precision.fp32 or (precision is Precision.auto and optimizer is OptimizerKind.sgd):
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
        if precision is Precision.bf16 and not supported:
            raise DeviceError(
                "{precision} bf16: this GPU has no bf16 support (use fp32)", fields=("precision",)
            )
        return torch.bfloat16 if supported else None
    if precision is Precision.bf16 or cpu_has_bf16():
        return torch.bfloat16
    return None
