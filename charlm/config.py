"""Typed, frozen configuration of a run, with validation and a JSON round trip.

One config is saved with the weights, so ``sample`` and ``eval`` rebuild the model and tokenizer
from the run directory alone. Validation lives here, next to the fields it guards, so a bad option
is refused before any work is done (it imports only the stdlib and :mod:`charlm.errors`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from charlm.errors import ConfigError


class Cell(str, Enum):
    """Recurrent cell of the model."""

    lstm = "lstm"
    gru = "gru"
    rnn = "rnn"  # tanh
    irnn = "irnn"  # ReLU, recurrent matrix initialised to the identity (Le, Jaitly and Hinton 2015)
    mingru = "mingru"  # gates from the input alone, a parallel scan (Feng et al. 2024), in residual blocks
    minlstm = "minlstm"

    @property
    def scan(self) -> bool:
        """Whether the cell is a gated linear recurrence computed with a parallel scan (its layers
        are residual blocks of width ``hidden``; see :mod:`charlm.model.scan`)."""
        return self in (Cell.mingru, Cell.minlstm)


class TokenizerKind(str, Enum):
    """SentencePiece model type."""

    char = "char"
    bpe = "bpe"
    unigram = "unigram"


class CheckpointTag(str, Enum):
    """Which checkpoint of a run to load."""

    best = "best"
    latest = "latest"


class OptimizerKind(str, Enum):
    """Optimizer: clipped SGD (the classic recipe) or Adam."""

    sgd = "sgd"
    adam = "adam"


class Softmax(str, Enum):
    """Output layer: a full softmax over the vocabulary, or an adaptive softmax (Grave et al. 2017)
    that gives rare tokens smaller, cheaper clusters, for vocabularies of thousands of pieces."""

    full = "full"
    adaptive = "adaptive"


class Precision(str, Enum):
    """Arithmetic of the training step: ``auto`` uses bf16 autocast where the hardware runs it
    faster (a CUDA GPU with bf16, a CPU with AVX-512 bf16 or AMX), fp32 elsewhere and for plain
    SGD, which hardly learns in bf16 on some corpora."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def _finite(config: Any, flags: dict[str, str] | None = None) -> None:
    """Refuse NaN and infinity in any number of ``config``: NaN passes every range check (``nan <=
    0`` is false), so ``--temp nan`` sampled the unknown token and ``--lr nan`` reached the
    optimizer's own traceback. ``flags``: a field's option where it is not ``--field-name``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
            raise ConfigError(f"{flag} must be a finite number, got {value}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class TokenizerConfig:
    """How to build the tokenizer. ``vocab_size`` is ignored for ``char``: its vocabulary is every
    character of the corpus plus the 256 byte-fallback pieces."""

    kind: TokenizerKind = TokenizerKind.char
    vocab_size: int = 2000

    def __post_init__(self) -> None:
        _finite(self)
        _positive("--vocab-size", self.vocab_size)


# The shape each cell gets where a field is not given (None): the classic cells' sizes are those
# measured for them (docs/defaults.md); a scan model is small and deep, since on a budget of minutes
# tokens seen per parameter matter more than width.
CELL_DEFAULTS: dict[Cell, dict[str, Any]] = {
    **{c: {"layers": 2, "hidden": 512, "embed": 512, "dropout": 0.1}
       for c in (Cell.lstm, Cell.gru, Cell.rnn, Cell.irnn)},
    **{c: {"layers": 3, "hidden": 192, "embed": 192, "dropout": 0.0} for c in (Cell.mingru, Cell.minlstm)},
}  # fmt: skip

# A scan model reads a corpus of this many tokens or fewer several times over in a budget of
# minutes, and memorises it unless held back: there it trains with dropout 0.1 and weight decay
# 0.3 (each where the user did not set it; weight decay with Adam only); on a larger corpus with
# weight decay 0.1 alone (at the
# equivalent of 10 CPU minutes, tinyshakespeare (1M tokens): 2.352 / 2.381 bpc against 2.573 /
# 2.578 unregularised; python-stdlib (4M): 0.513 / 0.623 against 0.502 / 0.626; docs/scan-cells.md).
SMALL_CORPUS_TOKENS = 2_000_000
SMALL_CORPUS_REGULARISATION = {"dropout": 0.1, "weight_decay": 0.3}
LARGE_CORPUS_REGULARISATION = {"dropout": 0.0, "weight_decay": 0.1}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the recurrent language model: embedding -> stacked cell -> dropout -> decoder.

    ``layers``, ``hidden``, ``embed`` and ``dropout`` left as None take the cell's defaults
    (:data:`CELL_DEFAULTS`); a saved config always holds numbers."""

    vocab_size: int = 0  # 0 until the tokenizer is built, then its vocabulary size
    cell: Cell = Cell.mingru
    layers: int = None  # type: ignore[assignment]  # None: the cell's default
    hidden: int = None  # type: ignore[assignment]
    embed: int = None  # type: ignore[assignment]  # a scan cell's embedding is its width, hidden
    dropout: float = None  # type: ignore[assignment]  # locked (variational): embeddings, between layers, output
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden matrices while training
    tie_weights: bool = False
    softmax: Softmax = Softmax.full
    forget_bias: float = 1.0  # LSTM only: the forget gate's initial bias
    residual: bool = False  # add each stacked layer's input to its output (layers above the first)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", Cell(self.cell))
        defaults = CELL_DEFAULTS[self.cell]
        for name in ("layers", "hidden", "dropout"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
        if self.embed is None:
            object.__setattr__(self, "embed", self.hidden if self.cell.scan else defaults["embed"])
        _finite(self)
        if self.cell.scan and (self.weight_drop or self.residual):
            raise ConfigError(
                f"--cell {self.cell.value} has no recurrent matrix to drop (--weight-drop) and its "
                "layers are residual blocks already (--residual)"
            )
        if self.cell.scan and self.embed != self.hidden:
            raise ConfigError(
                f"--cell {self.cell.value} embeds tokens in its width: --embed must equal --hidden "
                f"(got {self.embed} and {self.hidden})"
            )
        if self.vocab_size < 0:
            raise ConfigError(f"vocab_size must not be negative, got {self.vocab_size}")
        for name in ("layers", "hidden", "embed"):
            _positive(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("dropout", "weight_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.tie_weights and self.softmax is Softmax.adaptive:
            raise ConfigError(
                "--tie-weights needs the full softmax (--softmax adaptive has no one decoder matrix)"
            )
        if self.tie_weights and self.embed != self.hidden:
            raise ConfigError(
                f"--tie-weights needs --embed equal to --hidden (got {self.embed} and {self.hidden})"
            )


@dataclass(frozen=True)
class TrainConfig:
    """How to train: batching, optimizer, schedule, stopping and evaluation."""

    batch_size: int = 32
    bptt: int = 64
    optimizer: OptimizerKind = OptimizerKind.adam
    lr: float | None = None  # None: the optimizer's default, see ``effective_lr``
    clip: float | None = None  # None: the optimizer's default, see ``effective_clip``
    anneal: float = 0.5
    decay: float = 0.3  # the learning rate falls linearly to 0 over this last fraction of the run
    epochs: int | None = None  # None: no limit where --max-steps or --max-time ends the run, else 10
    max_steps: int | None = None
    max_time: float | None = None  # seconds
    val_fraction: float = 0.05
    eval_every: int = 500
    save_steps: int | None = None  # save ``latest`` every this many steps ...
    save_seconds: float | None = 300.0  # ... or this many seconds (and at every validation)
    weight_decay: float = 0.0  # decoupled (AdamW), or L2 with SGD
    sample_every: int | None = None  # show a sample every N steps; None: at each validation; 0: never
    seed: int = 1234
    device: str = "auto"
    precision: Precision = Precision.auto

    def __post_init__(self) -> None:
        _finite(self, {"save_seconds": "--save-every"})
        for name in ("batch_size", "bptt", "eval_every"):
            _positive(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.epochs is not None:
            _positive("--epochs", self.epochs)
        for name in ("save_steps", "save_seconds"):
            value = getattr(self, name)
            if value is not None:
                _positive("--save-every", value)
        for name in ("lr", "clip", "max_steps", "max_time"):
            value = getattr(self, name)
            if value is not None:
                _positive(f"--{name.replace('_', '-')}", value)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.decay <= 1:
            raise ConfigError(f"--decay must be in [0, 1], got {self.decay}")
        if self.sample_every is not None and self.sample_every < 0:
            raise ConfigError(f"--sample-every must not be negative, got {self.sample_every}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must not be negative, got {self.weight_decay}")
        if not 0 < self.anneal <= 1:
            raise ConfigError(f"--anneal must be in (0, 1], got {self.anneal}")

    @property
    def epoch_limit(self) -> int | None:
        """Passes over the corpus after which the run stops: ``epochs``, or where it is not given,
        none when a step count or a time ends the run (``--max-time 30m`` trains 30 minutes, however
        small the corpus), else 10."""
        if self.epochs is not None:
            return self.epochs
        return None if self.max_steps is not None or self.max_time is not None else DEFAULT_EPOCHS

    @property
    def effective_lr(self) -> float:
        """The learning rate used: the given one, or a default that works for the optimizer."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def effective_clip(self) -> float:
        """The gradient-norm clip used: the given one, or the optimizer's default."""
        return self.clip if self.clip is not None else DEFAULT_CLIP[self.optimizer]


# Adam is the default: 10 minutes on tinyshakespeare score 2.317 / 2.355 bpc on the text after the
# training text against 2.395 / 2.425 with SGD (fp32), and 0.792 / 0.818 against 0.818 / 0.926 on
# python-stdlib (README). Early on the gap is wider: after 400 steps Adam scores 2.521 / 2.542 where
# the best clipped SGD found (lr 20, clip 0.25, as in PyTorch's word_language_model) scores 3.120 /
# 3.134 (lr 4 / clip 1: 4.308 / 4.343; lr 1 / clip 1: 4.348 / 4.352). SGD takes large steps on a
# tightly clipped gradient, so each optimizer has its own defaults. Adam at 3e-3 beat 2e-3 on both
# corpora of the README's protocol (2.317 / 2.355 against 2.446 / 2.399 bpc on tinyshakespeare).
DEFAULT_EPOCHS = 10
DEFAULT_LR = {OptimizerKind.sgd: 20.0, OptimizerKind.adam: 3e-3}
DEFAULT_CLIP = {OptimizerKind.sgd: 0.25, OptimizerKind.adam: 1.0}

# Dynamic evaluation (``charlm eval --dynamic``): tokens per update, learning rate and the pull back
# to the trained weights. The lr was chosen on a run's own held-out tail (benchmarks/dynamic.py):
# 0.05, 0.1, 0.2, 0.5, 1 gave -1.76%, -1.83%, -1.39%, +1.88%, +9.17% bpc against the static score.
DYNAMIC_WINDOW = 32
DYNAMIC_LR = 0.1
DYNAMIC_DECAY = 0.0


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a run's tokenizer and model, saved as ``config.json``."""

    tokenizer: TokenizerConfig
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    corpus: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (enums become their string values)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer format is noticed."""
        try:
            tok = data["tokenizer"]
            model = data["model"]
            return cls(
                tokenizer=TokenizerConfig(TokenizerKind(tok["kind"]), tok["vocab_size"]),
                model=ModelConfig(
                    **{
                        **_BEFORE_REGULARISATION,
                        **model,
                        "cell": Cell(model["cell"]),
                        "softmax": Softmax(model.get("softmax", "full")),
                    }
                ),
                train=TrainConfig(
                    **{
                        **_BEFORE_REGULARISATION_TRAIN,
                        **data["train"],
                        "optimizer": OptimizerKind(data["train"]["optimizer"]),
                        "precision": Precision(data["train"].get("precision", "auto")),
                    }
                ),
                corpus=tuple(data.get("corpus", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config is not a charlm run config: {exc}") from exc


# Runs saved before these fields existed trained without them; their configs still mean that.
_BEFORE_REGULARISATION = {"weight_drop": 0.0}  # model
_BEFORE_REGULARISATION_TRAIN = {"weight_decay": 0.0}  # train


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def fit_to_corpus(config: RunConfig, tokens: int, given: Collection[str]) -> tuple[RunConfig, str | None]:
    """A new run's regularisation for the size of its corpus (``tokens`` training tokens), where
    its cell is a scan cell and the options in ``given`` (field names) do not set it; and what was
    chosen and why, for the user (None: nothing was chosen)."""
    if not config.model.cell.scan:
        return config, None
    small = tokens <= SMALL_CORPUS_TOKENS
    chosen = {
        name: value
        for name, value in (SMALL_CORPUS_REGULARISATION if small else LARGE_CORPUS_REGULARISATION).items()
        # SGD's weight decay is L2 at its lr of 20: 0.3 would multiply the weights by -5 a step
        if name not in given and not (name == "weight_decay" and config.train.optimizer is OptimizerKind.sgd)
    }
    if not chosen:
        return config, None
    model = dataclasses.replace(config.model, dropout=chosen.get("dropout", config.model.dropout))
    decay = chosen.get("weight_decay", config.train.weight_decay)
    train = dataclasses.replace(config.train, weight_decay=decay)
    what = " and ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in chosen.items())
    why = (
        f"a corpus of {tokens:,} tokens is read many times over: {what} against memorising it"
        if small
        else f"a corpus of {tokens:,} tokens: {what}"
    )
    return dataclasses.replace(config, model=model, train=train), why


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration(text: str, option: str = "--max-time") -> float:
    """Seconds in ``text``: a number of seconds or a duration such as ``90s``, ``10m``, ``1h30m``.

    Raises:
        ConfigError: if ``text`` is not such a duration or is not positive.
    """
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ConfigError(f"{option}: cannot read {text!r} as a duration (try 600, 90s, 10m, 1h)")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    _positive(option, seconds)
    return seconds


def parse_save_every(text: str) -> tuple[int | None, float | None]:
    """``--save-every``: a plain whole number counts steps (``500``), a duration counts time
    (``90s``, ``10m``). Returns (steps, seconds), one of them None.

    Raises:
        ConfigError: neither.
    """
    compact = text.strip()
    if compact.isdigit():
        _positive("--save-every", int(compact))
        return int(compact), None
    if not compact or compact[-1].lower() not in _UNIT_SECONDS or not compact[-1].isalpha():
        raise ConfigError(f"--save-every: give steps (500) or a duration (90s, 10m), not {text!r}")
    return None, parse_duration(compact, "--save-every")


@dataclass(frozen=True)
class SampleConfig:
    """How to sample: ``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1 switch those
    filters off; ``length`` counts generated tokens (characters for a char tokenizer)."""

    length: int = 500
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    prime: str = ""
    num_samples: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a sample ends when its text ends with one of these
    include_stop: bool = False  # ... and shows it
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest (0: off)
    repetition_penalty: float = 1.0  # divide seen tokens' positive logits by it (1: off)
    presence_penalty: float = 0.0  # subtract from seen tokens' logits (0: off)
    frequency_penalty: float = 0.0  # subtract per occurrence (0: off)
    penalty_window: int = 64  # tokens the penalties look back on, the prime's included
    ban: tuple[str, ...] = ()  # text that is never produced

    def __post_init__(self) -> None:
        _finite(self, {"temperature": "--temp"})
        if self.length < 0:
            raise ConfigError(f"--length must not be negative, got {self.length}")
        if self.temperature < 0:
            raise ConfigError(f"--temp must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must not be negative, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        _positive("--num-samples", self.num_samples)
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"--min-p must be in [0, 1), got {self.min_p}")
        _positive("--repetition-penalty", self.repetition_penalty)
        _positive("--penalty-window", self.penalty_window)
        object.__setattr__(self, "stop", tuple(self.stop))  # lists, as a caller may pass, hash as tuples
        object.__setattr__(self, "ban", tuple(self.ban))
