"""A run directory: the self-contained, verifiable record of one training run.

Layout (everything ``sample``, ``eval`` and ``train --resume`` need, nothing that executes on load)::

    RUN/
      run.json          format version, charlm version, the RunConfig, checksums of the two below
                        and of the corpus text; a fine-tuned run's parent (see :class:`Parent`)
      tokenizer.model   the SentencePiece model (a protobuf)
      heldout.txt       the validation text, never trained on
      metrics.jsonl     one JSON object per evaluation
      samples.jsonl     the samples shown while training (``--sample-every``), with their step
      .lock             held by the one process training into the run (see :mod:`charlm.runs.lock`)
      best/, latest/    checkpoints (see :mod:`charlm.runs.checkpoint`)

This module finds, creates, reads and updates runs; :mod:`charlm.runs.checkpoint` writes and
verifies the checkpoints inside them. Whether ``charlm train`` starts a run or continues one is
decided in :mod:`charlm.training.plan`, from what this module finds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charlm import __version__
from charlm.config import RunConfig
from charlm.data.tokenizer import Tokenizer
from charlm.errors import CharlmError, CheckpointError
from charlm.files import atomic_write, os_errors
from charlm.runs.checkpoint import (
    FORMAT_VERSION,
    check_format,
    checkpoint_time,
    read_bytes,
    read_json,
    sha256,
    verified,
)

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.model"
HELDOUT_FILE = "heldout.txt"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
DEFAULT_ROOT = Path("checkpoints")


@dataclass(frozen=True)
class Parent:
    """The run a fine-tuned run started from: its directory, the checkpoint whose weights it took
    ("best" or "latest"), and their SHA-256 (as that checkpoint's manifest records it), so that
    where the run came from can be told even after the parent has trained on."""

    run: str
    checkpoint: str
    weights_sha256: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, file: Path) -> Parent:
        """Inverse of :meth:`to_dict`.

        Raises:
            CheckpointError: ``data`` is not a parent record.
        """
        try:
            return cls(str(data["run"]), str(data["checkpoint"]), str(data["weights_sha256"]))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{file} is damaged: its parent run is unreadable ({exc})") from exc


@dataclass(frozen=True)
class Run:
    """A loaded run directory: its config and tokenizer (weights load separately)."""

    path: Path
    config: RunConfig
    tokenizer: Tokenizer
    corpus_sha256: str | None = None  # of the corpus text (after decoding), None if not recorded
    parent: Parent | None = None  # a fine-tuned run's starting point; None for a run from scratch

    def heldout_text(self) -> str:
        """The validation text the run was evaluated on during training."""
        return read_bytes(self.path / HELDOUT_FILE).decode("utf-8")


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
            f"{path} already holds a run; add {{resume}} to continue it, or choose another {{out}}",
            fields=("resume", "out"),
        )
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")


def make_run_dir(path: Path) -> None:
    """Create the directory of a new run (and its parents).

    Raises:
        CheckpointError: it cannot be created.
    """
    with os_errors(CheckpointError, f"cannot create run directory {path}"):
        path.mkdir(parents=True, exist_ok=True)


def remove_if_empty(path: Path) -> None:
    """Remove a run directory that a failed start left empty (a no-op otherwise)."""
    with contextlib.suppress(OSError):
        path.rmdir()


def create_run(
    path: Path,
    config: RunConfig,
    tokenizer: Tokenizer,
    heldout: str,
    corpus_sha256: str | None = None,
    parent: Parent | None = None,
) -> Run:
    """Write the parts of a run that do not change during training; ``run.json`` goes last and
    records the checksums of the others, so a run directory without it is not a run. ``parent``:
    the run a fine-tuned run starts from.

    Raises:
        CheckpointError: the directory already holds a run, or cannot be written.
    """
    check_new_run(path)
    make_run_dir(path)
    with os_errors(CheckpointError, f"cannot write run directory {path}"):
        files = {TOKENIZER_FILE: tokenizer.to_bytes(), HELDOUT_FILE: heldout.encode("utf-8")}
        for name, data in files.items():
            atomic_write(path / name, data)
        meta = {
            "format": FORMAT_VERSION,
            "charlm": __version__,
            "config": config.to_dict(),
            "corpus_sha256": corpus_sha256,
            "files": {name: sha256(data) for name, data in files.items()},
        }
        if parent is not None:
            meta["parent"] = parent.to_dict()
        atomic_write(path / RUN_FILE, json.dumps(meta, indent=2).encode())
    return Run(path, config, tokenizer, corpus_sha256, parent)


def update_config(run: Run, config: RunConfig) -> Run:
    """Record a changed config (a resumed run given a longer budget) in ``run.json``.

    Raises:
        CheckpointError: it cannot be written.
    """
    file = run.path / RUN_FILE
    meta = read_json(read_bytes(file), file)
    meta["config"] = config.to_dict()
    with os_errors(CheckpointError, f"cannot write {file}"):
        atomic_write(file, json.dumps(meta, indent=2).encode())
    return dataclasses.replace(run, config=config)


def append_metrics(run: Run, record: dict[str, Any], name: str = METRICS_FILE) -> None:
    """Add one record to ``metrics.jsonl`` (or the run's log ``name``, e.g. ``samples.jsonl``)."""
    with (
        os_errors(CheckpointError, f"cannot write {run.path / name}"),
        open(run.path / name, "a", encoding="utf-8") as f,
    ):
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def truncate_metrics(run: Run, step: int | None, name: str = METRICS_FILE) -> None:
    """Keep only the records of the log ``name`` up to ``step`` (none if None), dropping a line cut
    short by a crash: a resumed run logs the later validations (and samples) again, and the log
    must read as if it had never stopped."""
    file = run.path / name
    if not file.exists():
        return
    kept = []
    for line in read_bytes(file).decode("utf-8", errors="replace").splitlines():
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
    with os_errors(CheckpointError, f"cannot write {file}"):
        atomic_write(file, "".join(kept).encode("utf-8"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (empty if none yet)."""
    file = path / METRICS_FILE
    if not file.exists():
        return []
    return [read_json(line, file) for line in read_bytes(file).splitlines() if line.strip()]


def load_run(path: Path) -> Run:
    """Read a run's config and tokenizer, verifying them against the checksums in ``run.json``.

    Raises:
        CheckpointError: not a run directory, damaged, or written by a newer charlm.
    """
    meta = _run_meta(path)
    config, parent = _record(meta, path)
    checksums = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    try:
        tokenizer = Tokenizer.from_bytes(verified(path / TOKENIZER_FILE, checksums.get(TOKENIZER_FILE)))
    except CharlmError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from exc
    verified(path / HELDOUT_FILE, checksums.get(HELDOUT_FILE))
    corpus = meta.get("corpus_sha256")
    return Run(path, config, tokenizer, corpus if isinstance(corpus, str) else None, parent)


def read_record(path: Path) -> tuple[RunConfig, Parent | None]:
    """A run's config and parent from ``run.json`` alone: what deciding how to continue it needs,
    without reading (and verifying) its tokenizer and held-out text, as :func:`load_run` does.

    Raises:
        CheckpointError: not a run directory, damaged, or written by a newer charlm.
    """
    return _record(_run_meta(path), path)


def _run_meta(path: Path) -> dict[str, Any]:
    """``run.json``'s object, its format checked."""
    if not path.exists():
        raise CheckpointError(f"run not found: {path}")
    if not path.is_dir() or not (path / RUN_FILE).is_file():
        raise CheckpointError(f"{path} is not a charlm run (no {RUN_FILE})")
    meta = read_json(read_bytes(path / RUN_FILE), path / RUN_FILE)
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int) or "config" not in meta:
        raise CheckpointError(f"{path / RUN_FILE} is not a charlm run file")
    check_format(meta["format"], meta.get("charlm"), path)
    return meta


def _record(meta: dict[str, Any], path: Path) -> tuple[RunConfig, Parent | None]:
    try:
        config = RunConfig.from_dict(meta["config"])
    except CharlmError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from exc
    parent = meta.get("parent")
    return config, None if parent is None else Parent.from_dict(parent, path / RUN_FILE)


def latest_run(root: Path = DEFAULT_ROOT) -> Path:
    """The run directly under ``root`` whose newest checkpoint was written last (a run still
    before its first checkpoint is passed over).

    Raises:
        CheckpointError: there is no run with a checkpoint under ``root``.
    """
    runs = {}
    for run_file in root.glob(f"*/{RUN_FILE}") if root.is_dir() else []:
        stamp = checkpoint_time(run_file.parent)
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
            meta = read_json(read_bytes(run_file), run_file)
            corpus = meta["config"]["corpus"]
            if [os.path.abspath(p) for p in corpus] == wanted:
                runs[run_file.parent] = checkpoint_time(run_file.parent) or run_file.stat().st_mtime
        except (CheckpointError, OSError, KeyError, TypeError):
            continue  # not a run of these inputs that can be resumed; load_run would say why
    return max(runs, key=runs.__getitem__) if runs else None
