"""Run directories: a self-contained, verifiable record of one training run.

Layout (everything ``sample``, ``eval`` and ``train --resume`` need, nothing that executes on load)::

    RUN/
      run.json          format version, charlm version, the RunConfig, checksums of the two below
                        and of the corpus text
      tokenizer.model   the SentencePiece model (a protobuf)
      heldout.txt       the validation text, never trained on
      metrics.jsonl     one JSON object per evaluation
      .lock             held by the one process training into the run (see :mod:`charlm.runs.lock`)
      best/             the state with the lowest validation loss so far
      latest/           the most recent state
        model.safetensors     the weights (plain tensors: safetensors, no pickle, no code)
        trainer.safetensors   optimizer moments, carried hidden state, random generator states
        state.json            step, epoch, position in the data, schedule, best loss ...
        manifest.json         SHA-256 and size of the three files above, written last

A checkpoint is written to a temporary directory, synced, and renamed into place, so a crash (even
SIGKILL, even mid-save) never leaves a half-written checkpoint under a good name; loading checks
every file against the manifest and names the one that is damaged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import torch as safetensors_torch

from charlm import __version__
from charlm.config import RunConfig
from charlm.data.corpus import corpus_name, describe
from charlm.data.tokenizer import Tokenizer
from charlm.errors import CharlmError, CheckpointError, ConfigError
from charlm.model.network import RNNLM

FORMAT_VERSION = 1
RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.model"
HELDOUT_FILE = "heldout.txt"
METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
BEST, LATEST = "best", "latest"
DEFAULT_ROOT = Path("checkpoints")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Run:
    """A loaded run directory: its config and tokenizer (weights load separately)."""

    path: Path
    config: RunConfig
    tokenizer: Tokenizer
    corpus_sha256: str | None = None  # of the corpus text (after decoding), None if not recorded

    def heldout_text(self) -> str:
        """The validation text the run was evaluated on during training."""
        return _read(self.path / HELDOUT_FILE).decode("utf-8")


@dataclass(frozen=True)
class Snapshot:
    """Everything one checkpoint holds: weights, the trainer's tensors and its plain state."""

    weights: dict[str, torch.Tensor]
    trainer: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


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
        raise CheckpointError(
            f"{path} already holds a run; add --resume to continue it, or choose another --out"
        )
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")


def train_dir(
    out: Path | None, inputs: Sequence[str | os.PathLike[str]], resume: bool, root: Path = DEFAULT_ROOT
) -> tuple[Path, str | None]:
    """Where ``charlm train`` trains, and why a ``--resume`` starts a new run there (None if not).

    A new run goes to ``out``, else to ``root/NAME`` after the corpus (numbered if taken). With
    ``resume``: the run in ``out``; without ``out``, the latest run of ``inputs`` (see
    :func:`run_for_corpus`), or with no ``inputs`` the latest run (:func:`latest_run`). Where the
    corpus is given and there is no run yet (a first launch, or one killed before its run was
    written), resume starts it: one command serves the first launch and every relaunch.

    Raises:
        ConfigError: neither a corpus nor ``resume``.
        CheckpointError: ``resume`` without a corpus and without a run; an ``out`` that is a file,
            or that holds a run when not resuming.
    """
    if not resume:
        if not inputs:
            raise ConfigError("give a corpus file to train on (or --resume to continue a run)")
        run_dir = out or new_run_dir(corpus_name(inputs), root)
        check_new_run(run_dir)
        return run_dir, None
    if out is None and inputs:
        found = run_for_corpus(inputs, root)
        if found is not None:
            return found, None
        run_dir = new_run_dir(corpus_name(inputs), root)
        return run_dir, f"no run of {describe(inputs)} under {root} yet: starting {run_dir}"
    run_dir = out or latest_run(root)
    if (run_dir / RUN_FILE).is_file():
        return run_dir, None
    if not inputs:
        if not run_dir.exists():
            raise CheckpointError(f"run not found: {run_dir}")
        raise CheckpointError(
            f"{run_dir} was stopped before training began; give the corpus to start it: "
            f"`charlm train CORPUS --out {run_dir} --resume`"
        )
    check_new_run(run_dir)
    return run_dir, f"no run in {run_dir} yet: starting it"


def make_run_dir(path: Path) -> None:
    """Create the directory of a new run (and its parents).

    Raises:
        CheckpointError: it cannot be created.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create run directory {path}: {exc.strerror or exc}") from exc


def remove_if_empty(path: Path) -> None:
    """Remove a run directory that a failed start left empty (a no-op otherwise)."""
    with contextlib.suppress(OSError):
        path.rmdir()


def create_run(
    path: Path, config: RunConfig, tokenizer: Tokenizer, heldout: str, corpus_sha256: str | None = None
) -> Run:
    """Write the parts of a run that do not change during training; ``run.json`` goes last and
    records the checksums of the others, so a run directory without it is not a run.

    Raises:
        CheckpointError: the directory already holds a run, or cannot be written.
    """
    check_new_run(path)
    make_run_dir(path)
    try:
        files = {TOKENIZER_FILE: tokenizer.to_bytes(), HELDOUT_FILE: heldout.encode("utf-8")}
        for name, data in files.items():
            _atomic_write(path / name, data)
        meta = {
            "format": FORMAT_VERSION,
            "charlm": __version__,
            "config": config.to_dict(),
            "corpus_sha256": corpus_sha256,
            "files": {name: sha256(data) for name, data in files.items()},
        }
        _atomic_write(path / RUN_FILE, json.dumps(meta, indent=2).encode())
    except OSError as exc:
        raise CheckpointError(f"cannot write run directory {path}: {exc.strerror or exc}") from exc
    return Run(path, config, tokenizer, corpus_sha256)


def update_config(run: Run, config: RunConfig) -> Run:
    """Record a changed config (a resumed run given a longer budget) in ``run.json``.

    Raises:
        CheckpointError: it cannot be written.
    """
    file = run.path / RUN_FILE
    meta = _json(_read(file), file)
    meta["config"] = config.to_dict()
    try:
        _atomic_write(file, json.dumps(meta, indent=2).encode())
    except OSError as exc:
        raise CheckpointError(f"cannot write {file}: {exc.strerror or exc}") from exc
    return dataclasses.replace(run, config=config)


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
            _write_synced(tmp / name, data)
        _sync_dir(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _sync_dir(run.path)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, ValueError, TypeError) as exc:  # ValueError: a non-finite number for JSON
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CheckpointError(
            f"cannot save checkpoint {tag} in {run.path}: {reason} (the previous checkpoint is intact)"
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
    for candidate in (run_dir / tag, run_dir / f".{tag}-old"):
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    return None


def append_metrics(run: Run, record: dict[str, Any]) -> None:
    """Add one evaluation record to ``metrics.jsonl``."""
    try:
        with open(run.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise CheckpointError(f"cannot write {run.path / METRICS_FILE}: {exc.strerror or exc}") from exc


def truncate_metrics(run: Run, step: int | None) -> None:
    """Keep only the records up to ``step`` (none if None), dropping a line cut short by a crash:
    a resumed run logs the later validations again, and the log must read as if it had never
    stopped."""
    file = run.path / METRICS_FILE
    if not file.exists():
        return
    kept = []
    for line in _read(file).decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            step is not None
            and isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] <= step
        ):
            kept.append(line + "\n")
    try:
        _atomic_write(file, "".join(kept).encode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot write {file}: {exc.strerror or exc}") from exc


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (empty if none yet)."""
    file = path / METRICS_FILE
    if not file.exists():
        return []
    return [_json(line, file) for line in _read(file).splitlines() if line.strip()]


def load_run(path: Path) -> Run:
    """Read a run's config and tokenizer, verifying them against the checksums in ``run.json``.

    Raises:
        CheckpointError: not a run directory, damaged, or written by a newer charlm.
    """
    if not path.exists():
        raise CheckpointError(f"run not found: {path}")
    if not path.is_dir() or not (path / RUN_FILE).is_file():
        raise CheckpointError(f"{path} is not a charlm run (no {RUN_FILE})")
    meta = _json(_read(path / RUN_FILE), path / RUN_FILE)
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int) or "config" not in meta:
        raise CheckpointError(f"{path / RUN_FILE} is not a charlm run file")
    _check_format(meta["format"], meta.get("charlm"), path)
    checksums = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    try:
        config = RunConfig.from_dict(meta["config"])
        tokenizer = Tokenizer.from_bytes(_verified(path / TOKENIZER_FILE, checksums.get(TOKENIZER_FILE)))
    except CharlmError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from exc
    _verified(path / HELDOUT_FILE, checksums.get(HELDOUT_FILE))
    corpus = meta.get("corpus_sha256")
    return Run(path, config, tokenizer, corpus if isinstance(corpus, str) else None)


def load_snapshot(directory: Path) -> Snapshot:
    """Read and verify one checkpoint directory. Nothing in it can run code: tensors come from
    safetensors, the rest is JSON.

    Raises:
        CheckpointError: a file is missing, fails its checksum, or is not what it claims to be;
            the message names the file.
    """
    manifest = _json(_read(directory / MANIFEST_FILE), directory / MANIFEST_FILE)
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(listed, dict)
        or not set(listed) <= {WEIGHTS_FILE, TRAINER_FILE, STATE_FILE}
        or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in listed.values())
    ):
        raise CheckpointError(f"{directory / MANIFEST_FILE} is damaged: not a list of checkpoint files")
    _check_format(manifest.get("format", FORMAT_VERSION), None, directory)
    missing = {WEIGHTS_FILE, STATE_FILE} - listed.keys()
    if missing:
        raise CheckpointError(f"{directory / MANIFEST_FILE} is damaged: does not list {sorted(missing)[0]}")
    data = {name: _verified(directory / name, entry.get("sha256")) for name, entry in listed.items()}
    state = _json(data[STATE_FILE], directory / STATE_FILE)
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
        directory = run.path / tag
        if not directory.exists():  # a crash between the two renames of a save
            directory = run.path / f".{tag}-old"
        if directory.exists():
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


def run_for_corpus(inputs: Sequence[str | os.PathLike[str]], root: Path = DEFAULT_ROOT) -> Path | None:
    """The run directly under ``root`` trained on ``inputs`` (the corpus as given, compared as
    written or as the same paths from here) that was written last, even one still before its
    first checkpoint; None if there is none. This is what ``charlm train CORPUS --resume``
    continues when no ``--out`` names a run, so a relaunched command finds its own run.
    """
    wanted = [os.path.abspath(p) for p in inputs]
    runs = {}
    for run_file in root.glob(f"*/{RUN_FILE}") if root.is_dir() else []:
        try:
            meta = _json(_read(run_file), run_file)
            corpus = meta["config"]["corpus"]
            if [os.path.abspath(p) for p in corpus] == wanted:
                runs[run_file.parent] = _checkpoint_time(run_file.parent) or run_file.stat().st_mtime
        except (CheckpointError, OSError, KeyError, TypeError):
            continue  # not a run of these inputs that can be resumed; load_run would say why
    return max(runs, key=runs.__getitem__) if runs else None


def _checkpoint_time(run_dir: Path) -> float | None:
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


def _check_format(version: Any, writer: Any, path: Path) -> None:
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer charlm {writer or ''} (format {version}); "
            f"this charlm {__version__} reads format {FORMAT_VERSION} at most: upgrade charlm"
        )


def _verified(file: Path, expected: Any) -> bytes:
    """The bytes of ``file``, checked against its recorded SHA-256 (when one is recorded)."""
    data = _read(file)
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


def _sync_dir(directory: Path) -> None:
    """Make renames and new files in ``directory`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(file: Path, data: bytes) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    _write_synced(tmp, data)
    os.replace(tmp, file)
