"""Run directories: a self-contained record of one training run.

Layout (everything ``sample`` and ``eval`` need, nothing that executes on load)::

    RUN/
      run.json          format version, charlm version, the RunConfig
      tokenizer.model   the SentencePiece model (a protobuf)
      heldout.txt       the validation text, never trained on
      metrics.jsonl     one JSON object per evaluation
      best/             weights with the lowest validation loss so far
      latest/           the most recent weights
        model.safetensors   plain tensors (safetensors: no pickle, no code)
        state.json          step, epoch, tokens seen, validation loss ...

A checkpoint is written to a temporary directory and renamed into place, so an interrupted save
never leaves a half-written checkpoint under a good name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import torch as safetensors_torch

from charlm import __version__
from charlm.config import RunConfig
from charlm.errors import CharlmError, CheckpointError
from charlm.model import RNNLM
from charlm.tokenizer import Tokenizer

FORMAT_VERSION = 1
RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.model"
HELDOUT_FILE = "heldout.txt"
METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.json"
BEST, LATEST = "best", "latest"
DEFAULT_ROOT = Path("checkpoints")


@dataclass(frozen=True)
class Run:
    """A loaded run directory: its config and tokenizer (weights load separately)."""

    path: Path
    config: RunConfig
    tokenizer: Tokenizer

    def heldout_text(self) -> str:
        """The validation text the run was evaluated on during training."""
        return _read(self.path / HELDOUT_FILE).decode("utf-8")


def new_run_dir(name: str, root: Path = DEFAULT_ROOT) -> Path:
    """``root/name``, or ``root/name-2``, ``-3`` ... if taken: a new run never overwrites an old one."""
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


def check_new_run(path: Path) -> None:
    """Refuse early (before any slow work) a run directory that already holds a run.

    Raises:
        CheckpointError: ``path`` holds a run, or is a file.
    """
    if (path / RUN_FILE).exists():
        raise CheckpointError(f"{path} already holds a run; choose another --out")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")


def create_run(path: Path, config: RunConfig, tokenizer: Tokenizer, heldout: str) -> Run:
    """Write the parts of a run that do not change during training.

    Raises:
        CheckpointError: the directory exists with a run in it, or cannot be written.
    """
    check_new_run(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(path / TOKENIZER_FILE, tokenizer.to_bytes())
        _atomic_write(path / HELDOUT_FILE, heldout.encode("utf-8"))
        meta = {"format": FORMAT_VERSION, "charlm": __version__, "config": config.to_dict()}
        _atomic_write(path / RUN_FILE, json.dumps(meta, indent=2).encode())
    except OSError as exc:
        raise CheckpointError(f"cannot write run directory {path}: {exc.strerror or exc}") from exc
    return Run(path, config, tokenizer)


def save_checkpoint(run: Run, tag: str, model: RNNLM, state: dict[str, Any]) -> Path:
    """Save weights and ``state`` as ``run.path/tag``: written to a temporary directory, then
    renamed into place. Should a crash fall between moving the old one aside and moving the new
    one in, :func:`checkpoint_dir` finds the old one under ``.tag-old``."""
    final, old = run.path / tag, run.path / f".{tag}-old"
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=run.path))
        tmp.chmod(0o755)  # mkdtemp makes it private
        safetensors_torch.save_model(model, str(tmp / WEIGHTS_FILE))
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=2).encode())
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot save checkpoint in {run.path}: {exc.strerror or exc}") from exc
    return final


def checkpoint_dir(run_dir: Path, tag: str) -> Path | None:
    """The directory of checkpoint ``tag``, or of the one it was replacing when a save was cut
    short; None if there is neither."""
    for candidate in (run_dir / tag, run_dir / f".{tag}-old"):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def append_metrics(run: Run, record: dict[str, Any]) -> None:
    """Add one evaluation record to ``metrics.jsonl``."""
    try:
        with open(run.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise CheckpointError(f"cannot write {run.path / METRICS_FILE}: {exc.strerror or exc}") from exc


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (empty if none yet)."""
    file = path / METRICS_FILE
    if not file.exists():
        return []
    return [_json(line, file) for line in _read(file).splitlines() if line.strip()]


def load_run(path: Path) -> Run:
    """Read a run's config and tokenizer.

    Raises:
        CheckpointError: not a run directory, damaged, or written by a newer charlm.
    """
    if not path.exists():
        raise CheckpointError(f"run not found: {path}")
    if not (path / RUN_FILE).is_file():
        raise CheckpointError(f"{path} is not a charlm run (no {RUN_FILE})")
    meta = _json(_read(path / RUN_FILE), path / RUN_FILE)
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int) or "config" not in meta:
        raise CheckpointError(f"{path / RUN_FILE} is not a charlm run file")
    if meta["format"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by charlm {meta.get('charlm', '?')} (format {meta['format']}); "
            f"this charlm {__version__} reads format {FORMAT_VERSION} at most: upgrade charlm"
        )
    try:
        config = RunConfig.from_dict(meta["config"])
        tokenizer = Tokenizer.from_bytes(_read(path / TOKENIZER_FILE))
    except CharlmError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from exc
    return Run(path, config, tokenizer)


def load_model(run: Run, tag: str = BEST, device: torch.device | str = "cpu") -> RNNLM:
    """Build the run's model and load the weights of checkpoint ``tag``, on ``device``.

    Raises:
        CheckpointError: the checkpoint is missing or its weights do not fit the config.
    """
    directory = checkpoint_dir(run.path, tag)
    if directory is None:
        raise CheckpointError(f"{run.path} has no {tag} checkpoint yet")
    file = directory / WEIGHTS_FILE
    model = RNNLM(run.config.model)
    try:
        safetensors_torch.load_model(model, str(file), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot load weights {file}: {exc}") from exc
    return model.to(device).eval()


def load_state(run: Run, tag: str = BEST) -> dict[str, Any]:
    """The ``state.json`` of checkpoint ``tag``."""
    directory = checkpoint_dir(run.path, tag) or run.path / tag
    return _json(_read(directory / STATE_FILE), directory / STATE_FILE)


def latest_run(root: Path = DEFAULT_ROOT) -> Path:
    """The run directly under ``root`` whose newest checkpoint was written last (a run still
    before its first checkpoint is passed over).

    Raises:
        CheckpointError: there is no run with a checkpoint under ``root``.
    """
    runs = {}
    for run_file in root.glob(f"*/{RUN_FILE}") if root.is_dir() else []:
        stamp = _checkpoint_time(run_file.parent)
        if stamp is not None:
            runs[run_file.parent] = stamp
    if not runs:
        raise CheckpointError(f"no trained run found under {root}/; train one with `charlm train CORPUS`")
    return max(runs, key=runs.__getitem__)


def _checkpoint_time(run_dir: Path) -> float | None:
    """When the run's newest checkpoint was written; None if it has none."""
    stamps = []
    for tag in (LATEST, BEST):
        directory = checkpoint_dir(run_dir, tag)
        if directory is not None:
            try:
                stamps.append((directory / STATE_FILE).stat().st_mtime)
            except OSError:  # replaced by a save while we looked
                continue
    return max(stamps, default=None)


def _json(data: bytes, file: Path) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is damaged: {exc}") from exc


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from exc


def _write_synced(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(file: Path, data: bytes) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    _write_synced(tmp, data)
    os.replace(tmp, file)
