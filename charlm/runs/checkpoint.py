"""Checkpoints: the state of a run at one step, written whole or not at all, verified on load.

    RUN/best/ or RUN/latest/
      model.safetensors     the weights (plain tensors: safetensors, no pickle, no code)
      trainer.safetensors   optimizer moments, carried hidden state, random generator states
      state.json            step, epoch, position in the data, schedule, best loss ...
      manifest.json         SHA-256 and size of the three files above, written last

A checkpoint is written to a temporary directory, synced, and renamed into place, so a crash (even
SIGKILL, even mid-save) never leaves a half-written checkpoint under a good name; loading checks
every file against the manifest and names the one that is damaged. The run directory around them
is :mod:`charlm.runs.rundir`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors import torch as safetensors_torch

from charlm import __version__
from charlm.config import RunConfig
from charlm.errors import CheckpointError
from charlm.files import reason, sync_dir, write_synced
from charlm.model.network import RNNLM


class Run(Protocol):
    """What a checkpoint needs of a run: its directory and config (a
    :class:`charlm.runs.rundir.Run` is one; this module does not import that one, which imports it)."""

    @property
    def path(self) -> Path: ...

    @property
    def config(self) -> RunConfig: ...


FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
BEST, LATEST = "best", "latest"
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Snapshot:
    """Everything one checkpoint holds: weights, the trainer's tensors and its plain state."""

    weights: dict[str, torch.Tensor]
    trainer: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(run: Run, tag: str, snapshot: Snapshot) -> Path:
    """Save ``snapshot`` as ``run.path/tag``.

    The files are written and synced in a temporary directory, with a manifest of their
    checksums last; the old checkpoint is moved to ``.tag-old`` and the new one renamed into
    place. Should a crash fall between the two renames, :func:`checkpoint_dir` finds the old one.

    Raises:
        CheckpointError: the checkpoint cannot be written (the previous one is left intact).
    """
    final, old = run.path / tag, run.path / f".{tag}-old"
    tmp = None
    try:
        files = {
            WEIGHTS_FILE: safetensors_torch.save(_contiguous(snapshot.weights)),
            TRAINER_FILE: safetensors_torch.save(_contiguous(snapshot.trainer)),
            STATE_FILE: json.dumps(snapshot.state, indent=2, allow_nan=False).encode(),
        }
        manifest = {
            "format": FORMAT_VERSION,
            "files": {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()},
        }
        files[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode()
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{tag}-", dir=run.path))
        tmp.chmod(0o755)  # mkdtemp makes it private
        for name, data in files.items():
            write_synced(tmp / name, data)
        sync_dir(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        sync_dir(run.path)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, ValueError, TypeError) as exc:  # ValueError: a non-finite number for JSON
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot save checkpoint {tag} in {run.path}: {reason(exc)} (the previous checkpoint is intact)"
        ) from exc
    return final


def remove_unfinished_saves(run_dir: Path) -> None:
    """Delete what saves cut short by a crash left: temporary directories, and old checkpoints
    moved aside whose replacement made it into place."""
    for tmp in run_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tag in (LATEST, BEST):
        if (run_dir / tag / MANIFEST_FILE).is_file():
            shutil.rmtree(run_dir / f".{tag}-old", ignore_errors=True)


def checkpoint_dir(run_dir: Path, tag: str) -> Path | None:
    """The directory of checkpoint ``tag``, or of the one it was replacing when a save was cut
    short; None if there is neither. (Complete, not yet verified: see :func:`load_snapshot`.)"""
    return _saved_dir(run_dir, tag, complete=True)


def _saved_dir(run_dir: Path, tag: str, complete: bool) -> Path | None:
    """``run_dir/tag``, else ``run_dir/.tag-old`` (a crash between the two renames of a save
    leaves only that one): the first that exists, or with ``complete`` that has its manifest."""
    for candidate in (run_dir / tag, run_dir / f".{tag}-old"):
        if (candidate / MANIFEST_FILE).is_file() if complete else candidate.exists():
            return candidate
    return None


def load_snapshot(directory: Path) -> Snapshot:
    """Read and verify one checkpoint directory. Nothing in it can run code: tensors come from
    safetensors, the rest is JSON.

    Raises:
        CheckpointError: a file is missing, fails its checksum, or is not what it claims to be;
            the message names the file.
    """
    manifest = read_json(read_bytes(directory / MANIFEST_FILE), directory / MANIFEST_FILE)
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(listed, dict)
        or not set(listed) <= {WEIGHTS_FILE, TRAINER_FILE, STATE_FILE}
        or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in listed.values())
    ):
        raise CheckpointError(f"{directory / MANIFEST_FILE} is damaged: not a list of checkpoint files")
    check_format(manifest.get("format", FORMAT_VERSION), None, directory)
    missing = {WEIGHTS_FILE, STATE_FILE} - listed.keys()
    if missing:
        raise CheckpointError(f"{directory / MANIFEST_FILE} is damaged: does not list {sorted(missing)[0]}")
    data = {name: verified(directory / name, entry.get("sha256")) for name, entry in listed.items()}
    state = read_json(data[STATE_FILE], directory / STATE_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{directory / STATE_FILE} is damaged: not a JSON object")
    return Snapshot(
        _tensors(data[WEIGHTS_FILE], directory / WEIGHTS_FILE),
        _tensors(data[TRAINER_FILE], directory / TRAINER_FILE) if TRAINER_FILE in data else {},
        state,
    )


def load_model(run: Run, tag: str = BEST, device: torch.device | str = "cpu") -> RNNLM:
    """Build the run's model and load the verified weights of checkpoint ``tag`` onto ``device``
    (wherever they were saved: the files hold no device).

    Raises:
        CheckpointError: the checkpoint is missing, damaged, or its weights do not fit the config.
    """
    directory = checkpoint_dir(run.path, tag)
    if directory is None:
        raise CheckpointError(f"{run.path} has no {tag} checkpoint yet")
    model = RNNLM(run.config.model)
    load_weights(model, load_snapshot(directory).weights, directory / WEIGHTS_FILE)
    return model.to(device).eval()


def weights_sha256(run_dir: Path, tag: str) -> str:
    """The SHA-256 of checkpoint ``tag``'s weights, as its manifest records it: the identity of
    the model it holds (what a state file is tied to).

    Raises:
        CheckpointError: no such checkpoint, or its manifest is damaged.
    """
    directory = checkpoint_dir(run_dir, tag)
    if directory is None:
        raise CheckpointError(f"{run_dir} has no {tag} checkpoint yet")
    manifest = read_json(read_bytes(directory / MANIFEST_FILE), directory / MANIFEST_FILE)
    try:
        return str(manifest["files"][WEIGHTS_FILE]["sha256"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory / MANIFEST_FILE} is damaged: {exc}") from exc


def load_weights(model: RNNLM, weights: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy ``weights`` into ``model``, every tensor present and of the right shape.

    Raises:
        CheckpointError: they do not fit the model.
    """
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:2]
        raise CheckpointError(f"{source} does not fit the run's model: {' '.join(first)}") from exc


def newest_intact(run: Run) -> tuple[Snapshot | None, list[str]]:
    """The checkpoint of ``run`` with the highest step among those that verify, and one line per
    checkpoint that did not (what resume reports when it falls back)."""
    found: list[tuple[tuple[int, bool], Snapshot]] = []
    problems = []
    for tag in (LATEST, BEST):
        directory = _saved_dir(run.path, tag, complete=False)  # an incomplete one is reported
        if directory is not None:
            try:
                snapshot = load_snapshot(directory)
                step = snapshot.state.get("step")
                if not isinstance(step, int):
                    raise CheckpointError(f"{directory / STATE_FILE} is damaged: no step")
                if "rng.cpu" not in snapshot.trainer:
                    raise CheckpointError(f"{directory} holds weights but no training state")
                # on a tie, the state that has seen its step's validation
                found.append(((step, snapshot.state.get("validated_at") == step), snapshot))
            except CheckpointError as exc:
                problems.append(str(exc))
    if not found:
        return None, problems
    return max(found, key=lambda pair: pair[0])[1], problems


def checkpoint_time(run_dir: Path) -> float | None:
    """When the run's newest checkpoint was written; None if it has none."""
    stamps = []
    for tag in (LATEST, BEST):
        directory = checkpoint_dir(run_dir, tag)
        if directory is not None:
            try:
                stamps.append((directory / MANIFEST_FILE).stat().st_mtime)
            except OSError:  # replaced by a save while we looked
                continue
    return max(stamps, default=None)


def check_format(version: Any, writer: Any, path: Path) -> None:
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer charlm {writer or ''} (format {version}); "
            f"this charlm {__version__} reads format {FORMAT_VERSION} at most: upgrade charlm"
        )


def verified(file: Path, expected: Any) -> bytes:
    """The bytes of ``file``, checked against its recorded SHA-256 (when one is recorded)."""
    data = read_bytes(file)
    if expected is not None and sha256(data) != expected:
        raise CheckpointError(
            f"{file} is damaged: its checksum does not match the one recorded when it was saved"
            + (" (the file is empty)" if not data else "")
        )
    return data


def _tensors(data: bytes, file: Path) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything else (a pickle, say) is refused, never executed."""
    try:
        return safetensors_torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is not a safetensors file (refused, nothing was run): {exc}") from exc


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, as safetensors wants them; no two share memory."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def read_json(data: bytes, file: Path) -> Any:
    """``data`` (the bytes of ``file``) as JSON; damage is a :class:`CheckpointError` naming it."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is damaged: {exc}") from exc


def read_bytes(file: Path) -> bytes:
    """The bytes of ``file``; a missing or unreadable one is a :class:`CheckpointError` naming it."""
    try:
        return file.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {reason(exc)}") from exc
