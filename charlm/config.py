"""Typed, frozen configuration of a run, with validation and a JSON round trip.

One config is saved with the weights, so ``sample`` and ``eval`` rebuild the model and tokenizer
from the run directory alone. Validation is declared here, next to the fields it guards (types and
bounds checked by pydantic, the few rules across fields in ``__post_init__``), so a bad option is
refused before any work is done, with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Callable, Collection
from dataclasses import field
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args, get_type_hints

from charlm.errors import ConfigError

if TYPE_CHECKING:  # at run time the bounds are built with the checks, on first use (_bound_names)
    from annotated_types import Ge, Gt, Le, Lt

    Positive = NotNegative = int
    PositiveFloat = Fraction = float
    PositiveOrNone = int | None
    PositiveFloatOrNone = float | None

T = TypeVar("T")


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


class Activation(str, Enum):
    """The nonlinearity of a scan block's MLP: the squared ReLU (So et al. 2021, "Primer"), which
    scored better than GELU at the same CPU time on tinyshakespeare and costs less, or GELU (tanh
    form), which runs written before it keep."""

    relu2 = "relu2"
    gelu = "gelu"


class Precision(str, Enum):
    """Arithmetic of the training step: ``auto`` uses bf16 autocast where the hardware runs it
    faster (a CUDA GPU with bf16, a CPU with AVX-512 bf16 or AMX), fp32 elsewhere and for plain
    SGD, which hardly learns in bf16 on some corpora."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def config(cls: type[T]) -> type[T]:
    """A frozen, keyword-only dataclass whose fields pydantic checks against their declared types
    and bounds (``Annotated[float, Gt(0)]``) on every construction, :func:`dataclasses.replace`
    included, before the class's own ``__post_init__`` (its rules across fields) runs. Values are
    kept as pydantic coerces them (``"lstm"`` becomes ``Cell.lstm``, a list of stops a tuple).
    NaN and infinity are refused everywhere: NaN passes every range check (``nan <= 0`` is false),
    so a NaN temperature sampled the unknown token and a NaN learning rate reached the optimizer's
    own traceback. A refusal is a :class:`ConfigError` that names the field (``{temperature} must
    not be negative``), which each face words its own way.

    pydantic is imported, and each class's validator built, on the first construction: the
    command line's ``--help`` needs neither."""
    rules = cls.__dict__.get("__post_init__")

    def __post_init__(self: Any) -> None:
        validated = _validator(type(self))(self)
        for name, value in validated.items():
            object.__setattr__(self, name, value)
        if rules is not None:
            rules(self)

    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]  # before the dataclass calls it
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@functools.cache
def _validator(cls: type) -> Callable[[Any], dict[str, Any]]:
    """The fields of a ``cls`` instance, checked and coerced by a pydantic model of them."""
    from pydantic import ConfigDict, InstanceOf, ValidationError, create_model

    hints = get_type_hints(cls, localns=_bound_names(), include_extras=True)
    # a config within a config (RunConfig's sections) checked itself when it was made
    types = {
        name: InstanceOf[hint] if dataclasses.is_dataclass(hint) else hint for name, hint in hints.items()
    }
    model = create_model(  # type: ignore[call-overload]
        f"{cls.__name__}Fields",
        __config__=ConfigDict(allow_inf_nan=False, extra="forbid"),
        **{f.name: (types[f.name], ...) for f in dataclasses.fields(cls)},
    )

    names = [f.name for f in dataclasses.fields(cls)]

    def validate(instance: Any) -> dict[str, Any]:
        try:
            checked = model.model_validate({name: getattr(instance, name) for name in names})
        except ValidationError as exc:
            raise _refusal(hints, exc) from None
        return dict(checked)

    return validate


def _refusal(hints: dict[str, Any], exc: Any) -> ConfigError:
    """The first of pydantic's complaints as a :class:`ConfigError` naming its field."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    kind, value = error["type"], error.get("input")
    if kind in ("missing_keyword_only_argument", "missing"):
        return ConfigError(f"{{{name}}} must be given", fields=(name,))
    if kind == "enum":
        choices = ", ".join(member.value for member in _enum(hints[name]))
        return ConfigError(f"{{{name}}} is one of {choices}, not {value!r}", fields=(name,))
    if kind == "finite_number":
        return ConfigError(f"{{{name}}} must be a finite number, got {value}", fields=(name,))
    if kind in _RANGE_ERRORS:
        return ConfigError(f"{{{name}}} {_bounds(hints[name])}, got {value}", fields=(name,))
    what = "a whole number" if kind.startswith("int") else error["msg"][0].lower() + error["msg"][1:]
    what = what.removeprefix("input should be ")
    return ConfigError(f"{{{name}}} must be {what}, got {value!r}", fields=(name,))


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _enum(hint: Any) -> Any:
    """The enum class in a field's type (``Cell``, or ``Cell | None``)."""
    return next((t for t in (hint, *get_args(hint)) if isinstance(t, type) and issubclass(t, Enum)), ())


def _bounds(hint: Any) -> str:
    """A field's declared range in words: ``must be positive``, ``must be in (0, 1]``."""
    import annotated_types

    low = high = None
    for bound in getattr(hint, "__metadata__", ()):
        if isinstance(bound, (annotated_types.Gt, annotated_types.Ge)):
            low = ("(", bound.gt) if isinstance(bound, annotated_types.Gt) else ("[", bound.ge)
        elif isinstance(bound, (annotated_types.Lt, annotated_types.Le)):
            high = (")", bound.lt) if isinstance(bound, annotated_types.Lt) else ("]", bound.le)
    if low and high:
        return f"must be in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low == ("(", 0):
        return "must be positive"
    if low == ("[", 0):
        return "must not be negative"
    if low:
        return f"must be {'greater than' if low[0] == '(' else 'at least'} {low[1]:g}"
    if high:
        return f"must be {'less than' if high[0] == ')' else 'at most'} {high[1]:g}"
    return "is out of range"


@functools.cache
def _bound_names() -> dict[str, Any]:
    """The bounds the fields' annotations name (annotated_types' ``Gt(0)``..., and the aliases
    below), made when a config is first checked: the annotations are strings until then, so
    importing this module (``charlm --help``) does not import annotated_types."""
    from annotated_types import Ge, Gt, Le, Lt

    return {
        "Ge": Ge, "Gt": Gt, "Le": Le, "Lt": Lt,
        "Positive": Annotated[int, Gt(0)],
        "PositiveFloat": Annotated[float, Gt(0)],
        "NotNegative": Annotated[int, Ge(0)],
        "Fraction": Annotated[float, Ge(0), Lt(1)],  # [0, 1)
        # None: a default chosen elsewhere (the cell's shape, the optimizer's lr) or no limit
        "PositiveOrNone": Annotated[int | None, Gt(0)],
        "PositiveFloatOrNone": Annotated[float | None, Gt(0)],
    }  # fmt: skip


@config
class TokenizerConfig:
    """How to build the tokenizer. ``vocab_size`` is ignored for ``char``: its vocabulary is every
    character of the corpus plus the 256 byte-fallback pieces."""

    kind: TokenizerKind = TokenizerKind.char
    vocab_size: Positive = 2000


# The shape each cell gets where a field is not given (None): the classic cells' sizes are those
# measured for them (docs/defaults.md); a scan model is small and deep, since on a budget of minutes
# tokens seen per parameter matter more than width.
CELL_DEFAULTS: dict[Cell, dict[str, Any]] = {
    **{c: {"layers": 2, "hidden": 512, "embed": 512, "dropout": 0.1}
       for c in (Cell.lstm, Cell.gru, Cell.rnn, Cell.irnn)},
    **{c: {"layers": 3, "hidden": 192, "embed": 192, "dropout": 0.0} for c in (Cell.mingru, Cell.minlstm)},
}  # fmt: skip

# A scan model's weight decay follows the passes its run makes over its corpus (where the user
# did not set it, and with Adam only): a corpus read a few times cannot be learned by heart, and
# regularising it costs more than it saves; one read dozens of times is learned by heart unless
# held back. (passes, weight decay) points, log-linear between them, flat beyond: 0.1 up to 2
# passes, 0.15 at 6, 0.3 at 10, 0.6 from 18. Measured on tinyshakespeare and python-stdlib
# (docs/scan-cells.md): on python-stdlib read about twice, 0.1 was level with none and far ahead
# of 0.3 with dropout; on tinyshakespeare read once in 2 minutes, 0.1 beat 0.3; at about six
# passes, 0.15 and 0.3 were level; at nine passes 0.3 beat 0.1 and 1.0, at seventeen 0.3 beat
# 0.15 by far, and at nineteen (the squared ReLU in the MLP) 0.6 beat 0.3 by far. None of them
# adds dropout: on tinyshakespeare, dropout 0.1 beside weight decay 0.3 lost 0.025 / 0.007 bpc in
# 10 minutes (medians of three and six runs).
WEIGHT_DECAY_BY_PASSES = ((2.0, 0.1), (6.0, 0.15), (10.0, 0.3), (18.0, 0.6))


def weight_decay_rule() -> str:
    """:data:`WEIGHT_DECAY_BY_PASSES` in words, for the help and for what ``charlm train`` says."""
    last = len(WEIGHT_DECAY_BY_PASSES) - 1
    return ", ".join(f"{w:g} {'up to' if k == 0 else 'from' if k == last else 'at'} {p:g}"
                     for k, (p, w) in enumerate(WEIGHT_DECAY_BY_PASSES))  # fmt: skip


def weight_decay_for(passes: float) -> float:
    """The weight decay of a run that makes ``passes`` passes over its corpus, by
    :data:`WEIGHT_DECAY_BY_PASSES`."""
    points = WEIGHT_DECAY_BY_PASSES
    if passes <= points[0][0]:
        return points[0][1]
    for (p0, w0), (p1, w1) in itertools.pairwise(points):
        if passes <= p1:
            return w0 + (w1 - w0) * math.log(passes / p0) / math.log(p1 / p0)
    return points[-1][1]


@config
class ModelConfig:
    """Shape of the recurrent language model: embedding -> stacked cell -> dropout -> decoder.

    ``layers``, ``hidden``, ``embed`` and ``dropout`` left as None take the cell's defaults
    (:data:`CELL_DEFAULTS`); a saved config always holds numbers."""

    vocab_size: NotNegative = 0  # 0 until the tokenizer is built, then its vocabulary size
    cell: Cell = Cell.mingru
    layers: PositiveOrNone = None  # None: the cell's default
    hidden: PositiveOrNone = None
    embed: PositiveOrNone = None  # a scan cell's embedding is its width, hidden
    # locked (variational): embeddings, between layers, output
    dropout: Annotated[float | None, Ge(0), Lt(1)] = None
    weight_drop: Fraction = 0.0  # DropConnect on the hidden-to-hidden matrices while training
    tie_weights: bool = False
    softmax: Softmax = Softmax.full
    forget_bias: float = 1.0  # LSTM only: the forget gate's initial bias
    residual: bool = False  # add each stacked layer's input to its output (layers above the first)
    mlp: Activation = Activation.relu2  # scan cells only: their MLP's nonlinearity

    def __post_init__(self) -> None:
        """The cell's defaults where a shape field is None, then the rules across fields."""
        defaults = CELL_DEFAULTS[self.cell]
        for name in ("layers", "hidden", "dropout"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
        if self.embed is None:
            object.__setattr__(self, "embed", self.hidden if self.cell.scan else defaults["embed"])
        if self.cell.scan and (self.weight_drop or self.residual):
            raise ConfigError(
                f"{{cell}} {self.cell.value} has no recurrent matrix to drop ({{weight_drop}}) and its "
                "layers are residual blocks already ({residual})",
                fields=("cell", "weight_drop", "residual"),
            )
        if self.cell.scan and self.embed != self.hidden:
            raise ConfigError(
                f"{{cell}} {self.cell.value} embeds tokens in its width: {{embed}} must equal {{hidden}} "
                f"(got {self.embed} and {self.hidden})",
                fields=("cell", "embed", "hidden"),
            )
        if self.tie_weights and self.softmax is Softmax.adaptive:
            raise ConfigError(
                "{tie_weights} needs the full softmax ({softmax} adaptive has no one decoder matrix)",
                fields=("tie_weights", "softmax"),
            )
        if self.tie_weights and self.embed != self.hidden:
            raise ConfigError(
                f"{{tie_weights}} needs {{embed}} equal to {{hidden}} (got {self.embed} and {self.hidden})",
                fields=("tie_weights", "embed", "hidden"),
            )


# Tokens each of the 32 pieces of a scored text after the first reads before its own, unscored
# (see charlm.data.batches.eval_streams): without them, the first tokens of 31 of the 32 pieces
# were predicted from nothing, which no reader of the text in order is, and the figure depended on
# the layout. A run records the value its validation used (TrainConfig.eval_context).
EVAL_CONTEXT = 128


@config
class TrainConfig:
    """How to train: batching, optimizer, schedule, stopping and evaluation.

    ``weight_decay`` None (a scan cell's default with Adam, where the command does not set it)
    sets the weight decay before each step by the passes the run will make over its corpus
    (:func:`weight_decay_for`): known from the start where a number of steps or epochs ends the
    run, foreseen from the passes made in the time gone where ``max_time`` may end it first."""

    batch_size: Positive = 32
    bptt: Positive = 64
    optimizer: OptimizerKind = OptimizerKind.adam
    lr: PositiveFloatOrNone = None  # None: the optimizer's default, see ``effective_lr``
    clip: PositiveFloatOrNone = None  # None: the optimizer's default, see ``effective_clip``
    # the lr is multiplied by this at each validation that does not improve; None: the cell's
    # default, see ``anneal_for``
    anneal: Annotated[float, Gt(0), Le(1)] | None = None
    decay: Annotated[float, Ge(0), Le(1)] = 0.3  # the lr falls linearly to 0 over this last fraction
    epochs: PositiveOrNone = None  # None: no limit where a step count or time ends the run, else 10
    max_steps: PositiveOrNone = None
    max_time: PositiveFloatOrNone = None  # seconds
    val_fraction: Annotated[float, Gt(0), Lt(1)] = 0.05
    # held out in this many pieces spread over the corpus (1: its tail), see held_out_ranges
    val_pieces: Positive = 20
    eval_every: Positive = 500
    # what validation's pieces read before their own (EVAL_CONTEXT); a run trained before it
    # existed validated with none, and a resumed one goes on so, or its first validation would
    # beat its best by the change of layout alone
    eval_context: Annotated[int, Ge(0)] = EVAL_CONTEXT
    save_steps: PositiveOrNone = None  # save ``latest`` every this many steps ...
    save_seconds: PositiveFloatOrNone = 300.0  # ... or seconds (and at every validation)
    # decoupled (AdamW), or L2 with SGD; None: by the passes the run makes over its corpus, set as
    # it goes (see weight_decay_for; a scan cell's default with Adam)
    weight_decay: Annotated[float | None, Ge(0)] = 0.0
    # a sample every N steps; None: at each validation; 0: never
    sample_every: Annotated[int | None, Ge(0)] = None
    seed: int = 1234
    device: str = "auto"
    precision: Precision = Precision.auto
    # torch.compile the training step: fused kernels, more tokens a second for the price of a
    # compilation at the start (cached on disk for the next run); see Trainer
    compile: bool = False

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

    def anneal_for(self, cell: Cell) -> float:
        """The plateau annealing used: the given one, or the cell's default. The classic cells halve
        the rate at each validation that does not improve (on a small corpus the early halvings are
        what holds their memorisation back); the scan cells keep it (1: no annealing) and end on the
        final decay alone: their validation swings with the place in the epoch it follows, so the
        halvings came once an epoch from the sixth on and had cut a 30-minute run's rate to 1/64
        by its 20th minute (docs/scan-cells.md)."""
        if self.anneal is not None:
            return self.anneal
        return 1.0 if cell.scan else DEFAULT_ANNEAL

    @property
    def effective_clip(self) -> float:
        """The gradient-norm clip used: the given one, or the optimizer's default."""
        return self.clip if self.clip is not None else DEFAULT_CLIP[self.optimizer]

    def __post_init__(self) -> None:
        if self.weight_decay is None and self.optimizer is OptimizerKind.sgd:
            raise ConfigError(
                "{weight_decay} by the passes (None) is for adam: with sgd it is L2 at its lr, where "
                "0.3 would blow the weights up; give it a number",
                fields=("weight_decay", "optimizer"),
            )


# Adam is the default: it beat clipped SGD on both corpora of the quality protocol, most of all
# early in training. SGD takes large steps on a tightly clipped gradient (lr 20, clip 0.25, as in
# PyTorch's word_language_model), so each optimizer has its own defaults. The measurements:
# docs/defaults.md.
DEFAULT_EPOCHS = 10
DEFAULT_ANNEAL = 0.5
DEFAULT_LR = {OptimizerKind.sgd: 20.0, OptimizerKind.adam: 3e-3}
DEFAULT_CLIP = {OptimizerKind.sgd: 0.25, OptimizerKind.adam: 1.0}
# A fine-tuned run (--init-from) without --lr takes this fraction of the optimizer's default: at
# the full rate, two minutes on 100 KB undid more of what its parent knew than they taught it (the
# measurement: docs/guide/train.md, "Fine-tune from a run").
FINE_TUNE_LR = 0.1

# Dynamic evaluation (``charlm eval --dynamic``): tokens per update, learning rate and the pull back
# to the trained weights. The lr was chosen on a run's own held-out tail (benchmarks/dynamic.py;
# the sweep is in docs/guide/eval.md).
DYNAMIC_WINDOW = 32
DYNAMIC_LR = 0.1
DYNAMIC_DECAY = 0.0


@config
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
            return cls(
                tokenizer=TokenizerConfig(**data["tokenizer"]),
                model=ModelConfig(**{**_BEFORE_MODEL, **data["model"]}),
                train=TrainConfig(**{**_BEFORE_TRAIN, **data["train"]}),
                corpus=tuple(data.get("corpus", ())),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"config is not a charlm run config: {exc}") from exc


# Runs saved before these fields existed trained without them; their configs still mean that.
_BEFORE_MODEL = {"weight_drop": 0.0, "mlp": "gelu"}  # model: scan blocks had GELU
# train: they held out the tail, and validated in pieces that read nothing before their own
_BEFORE_TRAIN = {"weight_decay": 0.0, "val_pieces": 1, "eval_context": 0}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def fit_to_corpus(config: RunConfig, tokens: int, given: Collection[str]) -> tuple[RunConfig, str | None]:
    """A new run's regularisation where its cell is a scan cell and the options in ``given`` (field
    names) do not set it: weight decay by the passes the run makes over its corpus of ``tokens``
    training tokens (None in the config: the trainer sets it as the run goes, see
    :func:`weight_decay_for`); and what was chosen and why, for the user (None: nothing was
    chosen). SGD's weight decay is L2 at its lr of 20, where 0.3 would multiply the weights by -5
    a step: it gets none."""
    train = config.train
    if not config.model.cell.scan or "weight_decay" in given or train.optimizer is OptimizerKind.sgd:
        return config, None
    rule = weight_decay_rule()
    # the passes as the trainer counts them: steps over windows per epoch (B streams of N // B)
    windows = max(1, -(-(tokens // train.batch_size - 1) // train.bptt))
    limits = [train.max_steps / windows] if train.max_steps else []
    limits += [train.epoch_limit] if train.epoch_limit is not None else []
    if train.max_time is None:
        known = f"this run: {min(limits):.3g} passes, weight decay {weight_decay_for(min(limits)):.3g}"
    else:  # foreseen before each step from the passes made in the time gone
        most = f", at most {min(limits):.3g} passes" if limits else ""
        known = f"this run: foreseen from its speed as it goes{most}; metrics.jsonl records it"
    why = (
        f"weight decay follows the passes this run makes over its {tokens:,} tokens, higher the more "
        f"often it reads them ({rule} passes, log-linear between; {known})"
    )
    return dataclasses.replace(config, train=dataclasses.replace(train, weight_decay=None)), why


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration(text: str, option: str = "max_time") -> float:
    """Seconds in ``text``: a number of seconds or a duration such as ``90s``, ``10m``, ``1h30m``.

    Raises:
        ConfigError: if ``text`` is not such a duration or is not positive.
    """
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ConfigError(
            f"{{{option}}}: cannot read {text!r} as a duration (try 600, 90s, 10m, 1h)", fields=(option,)
        )
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{{{option}}} must be positive, got {seconds:g}", fields=(option,))
    return seconds


def parse_save_every(text: str) -> tuple[int | None, float | None]:
    """``--save-every``: a plain whole number counts steps (``500``), a duration counts time
    (``90s``, ``10m``). Returns (steps, seconds), one of them None.

    Raises:
        ConfigError: neither.
    """
    compact = text.strip()
    if compact.isdigit():
        if int(compact) <= 0:
            raise ConfigError(f"{{save_steps}} must be positive, got {compact}", fields=("save_steps",))
        return int(compact), None
    if not compact or compact[-1].lower() not in _UNIT_SECONDS or not compact[-1].isalpha():
        raise ConfigError(
            f"{{save_steps}}: give steps (500) or a duration (90s, 10m), not {text!r}", fields=("save_steps",)
        )
    return None, parse_duration(compact, "save_seconds")


@config
class SampleConfig:
    """How to sample: ``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1 switch those
    filters off; ``length`` counts generated tokens (characters for a char tokenizer)."""

    length: NotNegative = 500
    temperature: Annotated[float, Ge(0)] = 0.8
    top_k: NotNegative = 0
    top_p: Annotated[float, Gt(0), Le(1)] = 1.0
    prime: str = ""
    num_samples: Positive = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()  # a sample ends when its text ends with one of these
    include_stop: bool = False  # ... and shows it
    min_p: Fraction = 0.0  # drop tokens less likely than min_p times the likeliest (0: off)
    repetition_penalty: PositiveFloat = 1.0  # divide seen tokens' positive logits by it (1: off)
    presence_penalty: float = 0.0  # subtract from seen tokens' logits (0: off)
    frequency_penalty: float = 0.0  # subtract per occurrence (0: off)
    penalty_window: Positive = 64  # tokens the penalties look back on, the prime's included
    ban: tuple[str, ...] = ()  # text that is never produced
