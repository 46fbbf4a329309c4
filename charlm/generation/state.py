"""State files: what a model knows after reading a text, saved to start samples from later.

A recurrent model's state after a long prompt is a few kilobytes that do not grow with the text,
so reading a book once and sampling from its end many times costs one read. The file is a
safetensors file (plain tensors, nothing that executes on load) whose JSON metadata ties it to the
checkpoint it was made with (the SHA-256 of its weights): a state from another run or checkpoint
would continue another model's thoughts, and is refused.

Tensors: ``hidden.0`` (and ``hidden.1``, the LSTM's cell state), each (layers, 1, H); ``logits``
(V,) of the next token; ``history`` (N,) the last tokens read (for the penalties). Metadata:
``format``, ``charlm``, ``weights_sha256``, ``run``, ``checkpoint``, ``tail`` (the last characters
read, for banned strings), ``tokens`` (how many tokens the state has read, all told).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import torch as safetensors_torch

from charlm import __version__
from charlm.errors import CheckpointError
from charlm.files import atomic_write, os_errors
from charlm.generation.sampling import Context

FORMAT = 1


def save_state(path: Path, context: Context, identity: dict[str, str]) -> None:
    """Write ``context`` to ``path`` (whole or not at all), tied to ``identity`` (the
    ``weights_sha256``, ``run`` and ``checkpoint`` of the model that read it).

    Raises:
        CheckpointError: it cannot be written.
    """
    hidden = context.hidden if isinstance(context.hidden, tuple) else (context.hidden,)
    tensors = {f"hidden.{i}": h.detach().float().cpu().contiguous() for i, h in enumerate(hidden)}
    tensors["logits"] = context.logits.detach().float().cpu().contiguous()
    tensors["history"] = torch.tensor(context.history, dtype=torch.int64)
    meta = {"format": str(FORMAT), "charlm": __version__, "tail": context.tail, **identity}
    with os_errors(CheckpointError, f"cannot write state file {path}"):
        atomic_write(path, safetensors_torch.save(tensors, metadata=meta))


def load_state(path: Path, identity: dict[str, str], device: torch.device) -> Context:
    """Read a state file saved by :func:`save_state` for the model of ``identity``, onto ``device``.

    Raises:
        CheckpointError: missing, not a state file (refused, nothing run), from a newer charlm, or
            made with another run or checkpoint (naming both).
    """
    with os_errors(CheckpointError, f"cannot read state file {path}"):
        data = path.read_bytes()
    try:
        tensors = safetensors_torch.load(data)
        meta = _metadata(data)
    except (SafetensorError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a charlm state file (refused, nothing was run): {exc}") from exc
    if not meta.get("format", "").isdigit() or "logits" not in tensors or "hidden.0" not in tensors:
        raise CheckpointError(f"{path} is not a charlm state file")
    if int(meta["format"]) > FORMAT:
        raise CheckpointError(f"{path} was written by a newer charlm {meta.get('charlm', '')}: upgrade")
    if meta.get("weights_sha256") != identity["weights_sha256"]:
        raise CheckpointError(
            f"{path} was saved from {meta.get('run', '?')} ({meta.get('checkpoint', '?')} checkpoint), "
            f"not from {identity['run']} ({identity['checkpoint']}): a state only continues the model "
            "that made it"
        )
    n = 2 if "hidden.1" in tensors else 1
    hidden = tuple(tensors[f"hidden.{i}"].to(device) for i in range(n))
    return Context(
        hidden if n == 2 else hidden[0],
        tensors["logits"].to(device),
        tensors["history"].tolist() if "history" in tensors else [],
        meta.get("tail", ""),
    )


def _metadata(data: bytes) -> dict[str, str]:
    """The JSON metadata of safetensors bytes (the header: an 8-byte length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return {str(k): str(v) for k, v in meta.items()}
