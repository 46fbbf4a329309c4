"""What ``charlm train`` is about to do, decided once: a new run or the continuation of one, in which
directory, with which config, and (for a fine-tuned run) from which run's weights.

The decision reads the run directories (is there a run in ``--out``? which run of this corpus was
written last?) and compares the options given with a saved run's, but changes nothing; the
launcher (:mod:`charlm.training.launch`) acts on it, and in a distributed run rank 0 decides and
hands the plan to the other ranks.

Three ways to start, one plan:

- **new**: the defaults with the options given, on a fresh tokenizer and fresh weights;
- **new from a parent** (``init_from``, fine-tuning): the parent run's tokenizer and model shape
  (its model options given again must keep its values) and the optimisation options given, starting
  from the weights of the parent's checkpoint; ``run.json`` records the parent;
- **resume**: the run's own config, with the options a resumed run may change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from charlm.config import (
    FINE_TUNE_LR,
    CheckpointTag,
    ModelConfig,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
    parse_duration,
    parse_save_every,
)
from charlm.data.corpus import corpus_name, describe
from charlm.errors import CheckpointError, ConfigError
from charlm.runs import checkpoint, rundir
from charlm.runs.rundir import DEFAULT_ROOT, RUN_FILE, Parent

# Where each option of `charlm train` lives in a run's config: (section, field). The tokenizer's
# options have names of their own; the model's and the training's are their fields' names.
OPTION_FIELDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("tokenizer", "kind"),
    "vocab_size": ("tokenizer", "vocab_size"),
    **{f.name: ("model", f.name) for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"},
    **{f.name: ("train", f.name) for f in dataclasses.fields(TrainConfig)},
}
# Options that may change when a run is resumed (they do not change what was learned so far).
RESUMABLE_CHANGES = (
    "epochs", "max_steps", "max_time", "eval_every", "save_steps", "save_seconds", "device", "precision",
    "sample_every", "compile",
)  # fmt: skip
_DEFAULTS: dict[str, Any] = {"tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig}


class Start(str, Enum):
    """Whether a plan starts a run or continues one."""

    new = "new"
    resume = "resume"


@dataclass(frozen=True)
class Plan:
    """One decision of ``charlm train``: what the launcher does, and why.

    A plain value (picklable): rank 0 of a distributed run makes it and broadcasts it.
    """

    start: Start
    run_dir: Path
    # new: the run's config before its tokenizer is built (vocab_size 0, the corpus not yet set),
    # or a fine-tuned run's, whose tokenizer and model are its parent's; resume: the saved config
    # with the changes a resumed run may take
    config: RunConfig
    # the config fields the user set: a new run's regularisation follows its passes over the corpus where
    # not set (see charlm.config.fit_to_corpus); None: use the config as it is
    given: frozenset[str] | None = None
    why: str | None = None  # why a --resume starts a new run (said to the user), None if it does not
    parent: Parent | None = None  # the run whose weights this run starts (or started) from

    @property
    def resume(self) -> bool:
        return self.start is Start.resume


def plan_run(
    paths: Sequence[Path],
    out: Path | None,
    changes: Mapping[str, Any],
    *,
    resume: bool = False,
    init_from: Path | None = None,
    checkpoint_tag: CheckpointTag | str = CheckpointTag.best,
    root: Path = DEFAULT_ROOT,
) -> Plan:
    """Decide what ``charlm train`` does with these inputs and options (``changes``, see
    :func:`config_changes`).

    A new run goes to ``out``, else to ``root/NAME`` after the corpus (numbered if taken). With
    ``resume``: the run in ``out``; without ``out``, the latest run of ``paths`` (see
    :func:`charlm.runs.rundir.run_for_corpus`), or with no ``paths`` the latest run. Where the corpus
    is given and there is no run yet (a first launch, or one killed before its run was written),
    resume starts it: one command serves the first launch and every relaunch, a fine-tuned run's
    included (``init_from`` must then name the run it started from).

    Raises:
        ConfigError: neither a corpus nor ``resume``; an option a resumed run may not change, or a
            fine-tuned run's model option, given another value than the run's; a resumed run
            started from another parent than ``init_from``.
        CheckpointError: ``resume`` without a corpus and without a run; an ``out`` that is a file,
            or that holds a run when not resuming; an ``init_from`` that is not a trained run.
    """
    run_dir, why = _where(paths, out, resume, root)
    given = frozenset(OPTION_FIELDS[name][1] for name in changes)
    if resume and (run_dir / RUN_FILE).is_file():
        saved, parent = rundir.read_record(run_dir)
        if init_from is not None:
            _check_parent(run_dir, parent, init_from)
        return Plan(Start.resume, run_dir, resumed_config(saved, changes), given, parent=parent)
    if init_from is None:
        return Plan(Start.new, run_dir, new_config(changes), given, why)
    parent_run = rundir.load_run(init_from)  # verified: its tokenizer is this run's
    tag = CheckpointTag(checkpoint_tag).value
    if tag == checkpoint.BEST and checkpoint.checkpoint_dir(init_from, tag) is None:
        tag = checkpoint.LATEST  # a run stopped before its first validation
    parent = Parent(str(init_from), tag, checkpoint.weights_sha256(init_from, tag))
    # None: a fine-tuned run's regularisation is the user's (the passes rule would decay the
    # parent's weights towards zero)
    return Plan(Start.new, run_dir, fine_tune_config(parent_run.config, changes), None, why, parent)


def _where(paths: Sequence[Path], out: Path | None, resume: bool, root: Path) -> tuple[Path, str | None]:
    """The run directory, and why a ``resume`` starts a new run there (None if it does not)."""
    if not resume:
        if not paths:
            raise ConfigError(
                "give a corpus file to train on (or {resume} to continue a run)", fields=("resume",)
            )
        run_dir = out or rundir.new_run_dir(corpus_name(paths), root)
        rundir.check_new_run(run_dir)
        return run_dir, None
    if out is None and paths:
        found = rundir.run_for_corpus(paths, root)
        if found is not None:
            return found, None
        run_dir = rundir.new_run_dir(corpus_name(paths), root)
        return run_dir, f"no run of {describe(paths)} under {root} yet: starting {run_dir}"
    run_dir = out or rundir.latest_run(root)
    if (run_dir / RUN_FILE).is_file():
        return run_dir, None
    if not paths:
        if not run_dir.exists():
            raise CheckpointError(f"run not found: {run_dir}")
        raise CheckpointError(
            f"{run_dir} was stopped before training began; give the corpus again to start it",
        )
    rundir.check_new_run(run_dir)
    return run_dir, f"no run in {run_dir} yet: starting it"


def _check_parent(run_dir: Path, parent: Parent | None, init_from: Path) -> None:
    """A fine-tuned run resumed by the command that started it names the same parent."""
    if parent is None or os.path.abspath(parent.run) != os.path.abspath(init_from):
        was = f"started from {parent.run}" if parent is not None else "not started from another run"
        raise ConfigError(
            f"{run_dir} was {was}; {init_from} given as {{init_from}} (a resumed run keeps its start)",
            fields=("init_from",),
        )


def config_changes(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (by option name) as config values by field name: ``save_every`` parsed into
    ``save_steps`` and ``save_seconds``, a ``max_time`` duration into seconds, and the names of
    choices ("gru", "bf16") into their enums.

    Raises:
        ConfigError: a value that cannot be read.
    """
    changes: dict[str, Any] = {}
    for name, value in options.items():
        if name == "save_every":
            changes["save_steps"], changes["save_seconds"] = parse_save_every(str(value))
            continue
        if name == "max_time" and isinstance(value, str):
            value = parse_duration(value)
        section, field_name = OPTION_FIELDS[name]
        kind = type(_DEFAULTS[section].__dataclass_fields__[field_name].default)
        if issubclass(kind, Enum) and not isinstance(value, kind):
            try:
                value = kind(value)
            except ValueError:
                choices = ", ".join(str(c.value) for c in kind)  # type: ignore[attr-defined]
                raise ConfigError(
                    f"{{{name}}} is one of {choices}; {value!r} given", fields=(name,)
                ) from None
        changes[name] = value
    return changes


def new_config(changes: Mapping[str, Any], only: str | None = None) -> RunConfig:
    """The config of a new run: the defaults, with ``changes`` (see :func:`config_changes`); with
    ``only`` ("train", say), the changes to that section alone.

    Raises:
        ConfigError: an invalid value.
    """
    sections: dict[str, dict[str, Any]] = {"tokenizer": {}, "model": {}, "train": {}}
    for name, value in changes.items():
        section, field_name = OPTION_FIELDS[name]
        if only in (None, section):
            sections[section][field_name] = value
    try:
        return RunConfig(
            tokenizer=TokenizerConfig(**sections["tokenizer"]),
            model=ModelConfig(**sections["model"]),
            train=TrainConfig(**sections["train"]),
        )
    except TypeError as exc:  # a value of the wrong kind, compared in a check
        raise ConfigError(f"an option has a value of the wrong kind: {exc}") from exc


def resumed_config(saved: RunConfig, changes: Mapping[str, Any]) -> RunConfig:
    """``saved`` with the options a resumed run was given (``changes``, by option name).

    An option given its saved value changes nothing, whatever it is (``lr`` and ``clip`` compare
    with the learning rate and clip the run trains with, its optimizer's default where it gave
    none). Only the options in :data:`RESUMABLE_CHANGES` may take another value: the others decide
    what the run learned so far (its weights' shapes, its data, its schedule).

    Raises:
        ConfigError: an option takes another value than the run's and may not change, naming each
            such option with both values; or the new values are invalid.
    """
    kept = {name: value for name, value in changes.items() if name not in RESUMABLE_CHANGES}
    refused = _differing(saved, kept, "in this run")
    if refused:
        allowed = [n for n in RESUMABLE_CHANGES if n != "save_seconds"]
        names = [_option(n) for n in allowed]
        raise ConfigError(
            f"{', and '.join(refused)} (only {', '.join(names[:-1])} and {names[-1]} may change when "
            "resuming; for the others, start a new run with another {out})",
            fields=(*(_option(n)[1:-1] for n in changes), *(_option(n)[1:-1] for n in allowed), "out"),
        )
    train = {name: value for name, value in changes.items() if name in RESUMABLE_CHANGES}
    return dataclasses.replace(saved, train=dataclasses.replace(saved.train, **train)) if train else saved


def fine_tune_config(parent: RunConfig, changes: Mapping[str, Any]) -> RunConfig:
    """A fine-tuned run's config: its parent's tokenizer and model, the training options given.

    Raises:
        ConfigError: a tokenizer or model option given another value than the parent's (naming
            both), or invalid training options.
    """
    shaping = {n: v for n, v in changes.items() if OPTION_FIELDS[n][0] != "train"}
    refused = _differing(parent, shaping, "in the run it starts from")
    if refused:
        raise ConfigError(
            f"{', and '.join(refused)} (a fine-tuned run keeps the tokenizer and the model of the run "
            "it starts from; the training options are yours)",
            fields=tuple(_option(n)[1:-1] for n in shaping),
        )
    train = new_config(changes, only="train").train
    if train.lr is None:  # recorded, so that its resume and its readers see the rate it used
        train = dataclasses.replace(train, lr=FINE_TUNE_LR * train.effective_lr)
    return RunConfig(tokenizer=parent.tokenizer, model=parent.model, train=train)


def _differing(saved: RunConfig, changes: Mapping[str, Any], where: str) -> list[str]:
    """For each option whose value is not ``saved``'s, "{option} is SAVED WHERE; GIVEN given" (a
    template of :class:`charlm.errors.CharlmError`: the option a placeholder)."""
    refused = []
    for name, value in changes.items():
        section, field_name = OPTION_FIELDS[name]
        own = getattr(getattr(saved, section), field_name)
        if name in ("lr", "clip") and value is not None:
            own = saved.train.effective_lr if name == "lr" else saved.train.effective_clip
        if value != own:
            shown = "by the passes" if name == "weight_decay" and own is None else _shown(own)
            refused.append(f"{_option(name)} is {shown} {where}; {_shown(value)} given")
    return refused


def _option(name: str) -> str:
    """The placeholder of the option that sets the config field ``name``."""
    return "{save_every}" if name in ("save_steps", "save_seconds") else f"{{{name}}}"


def _shown(value: Any) -> str:
    """A config value as a user types it."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        text = repr(value)  # exact: two values never read alike
        return text[:-2] if text.endswith(".0") else text
    return "unset" if value is None else str(value)
