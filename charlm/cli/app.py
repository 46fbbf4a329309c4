"""The ``charlm`` command line: parse options, build a config, call one library function, render
its result. Library errors (:class:`CharlmError`) become one line on stderr and an exit code.

Heavy imports (torch, sentencepiece) happen inside the commands, so ``charlm --help`` is instant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from charlm.config import (
    CELL_DEFAULTS,
    DEFAULT_CLIP,
    DEFAULT_LR,
    DYNAMIC_DECAY,
    DYNAMIC_LR,
    Cell,
    CheckpointTag,
    ModelConfig,
    OptimizerKind,
    Precision,
    SampleConfig,
    Softmax,
    TokenizerConfig,
    TokenizerKind,
    TrainConfig,
)
from charlm.errors import CharlmError, CheckpointError, ConfigError

if TYPE_CHECKING:  # imported by the commands that use it, so `charlm --help` stays instant
    from charlm.api import Model

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

app = typer.Typer(
    name="charlm",
    help="Train, sample and evaluate recurrent (LSTM/GRU/RNN) language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)
T = TypeVar("T")
# Option defaults come from the config dataclasses, so the CLI, the library and the benchmarks agree.
TOK, MODEL, TRAIN, SAMPLE = TokenizerConfig(), ModelConfig(), TrainConfig(), SampleConfig()


def _per_optimizer(defaults: dict[OptimizerKind, float]) -> str:
    return ", ".join(f"{kind.value} {value:g}" for kind, value in defaults.items())


def _by_cell(name: str) -> str:
    """A model field's default for each group of cells: "mingru, minlstm 4; lstm, gru, ... 2"."""
    groups: dict[Any, list[str]] = {}
    for cell, defaults in CELL_DEFAULTS.items():
        groups.setdefault(defaults[name], []).append(cell.value)
    return "; ".join(f"{', '.join(cells)} {value:g}" for value, cells in groups.items())


Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
RunArg = Annotated[
    Path | None,
    typer.Argument(
        help="Run directory; default: the most recent run under checkpoints/.", show_default=False
    ),
]
Tag = Annotated[CheckpointTag, typer.Option(help="Which checkpoint of the run.")]
Encoding = Annotated[str, typer.Option(help="Text encoding of the input text.")]
Data = Annotated[
    list[Path] | None,
    typer.Option(
        help="Use this text instead of the run's held-out split: a file, a directory or a quoted glob "
        "pattern, compressed or not (repeat for several, read as one text).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]
# The sampling options `sample` and `chat` share.
Temp = Annotated[float, typer.Option(help="Temperature; 0 picks the most likely token.")]
TopK = Annotated[int, typer.Option(help="Sample from the k most likely tokens (0: all).")]
TopP = Annotated[float, typer.Option(help="Sample from the smallest set with this probability (1: all).")]
MinP = Annotated[float, typer.Option(help="Drop tokens less likely than this times the likeliest (0: off).")]
Length = Annotated[int, typer.Option(help="Tokens to generate per sample (0: none).")]
Seed = Annotated[
    int | None, typer.Option(help="Random seed; the same seed gives the same text.", show_default=False)
]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        help="End a sample when its text ends with this (repeatable); not printed.", show_default=False
    ),
]
IncludeStop = Annotated[bool, typer.Option(help="Print the stop string that ended a sample.")]
Ban = Annotated[
    list[str] | None, typer.Option(help="Text that is never produced (repeatable).", show_default=False)
]
RepetitionPenalty = Annotated[
    float, typer.Option(help="Divide recent tokens' positive scores by this (1: off).")
]
PresencePenalty = Annotated[
    float, typer.Option(help="Subtract this from the scores of recent tokens (0: off).")
]
FrequencyPenalty = Annotated[
    float, typer.Option(help="Subtract this per occurrence among recent tokens (0: off).")
]
PenaltyWindow = Annotated[int, typer.Option(help="Recent tokens the penalties count, the prime's included.")]
StateFile = Annotated[
    Path | None,
    typer.Option(help="Start from this state file (see sample --save-state).", show_default=False),
]


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option(help="Show full tracebacks for errors.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


def _guard(ctx: typer.Context, action: Callable[[], T]) -> T:
    """Run ``action``; turn charlm errors and Ctrl-C into one line and an exit code."""
    try:
        return action()
    except CharlmError as exc:
        if _debug(ctx):
            raise
        # An error every rank of a distributed run shares is said once, by rank 0.
        shared = getattr(exc, "settled", False) and os.environ.get("RANK", "0") != "0"
        if not (getattr(exc, "reported", False) or shared):
            _report(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _debug(ctx: typer.Context) -> bool:
    """Whether ``--debug`` asked for full tracebacks."""
    return bool(ctx.obj and ctx.obj.get("debug"))


def _report(exc: CharlmError) -> None:
    """An error, as one line on stderr."""
    stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


@app.command()
def train(
    ctx: typer.Context,
    corpus: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Text files, directories (their text files, recursively) or quoted glob patterns; "
            ".gz, .bz2 and .xz files are read as they are (with --resume: default, the run's own).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run directory (default: checkpoints/CORPUS-NAME, numbered if taken).", show_default=False
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --out (default: the latest run of CORPUS, else the latest run) "
            "exactly where its last checkpoint stopped, or start it if there is none yet and CORPUS "
            "is given. Options given again must keep the run's values, except the stop conditions, "
            "--eval-every, --save-every, --device and --precision."
        ),
    ] = False,
    tokenizer: Annotated[TokenizerKind, typer.Option(help="SentencePiece model type.")] = TOK.kind,
    vocab_size: Annotated[
        int, typer.Option(help="Vocabulary size for bpe/unigram (char: all characters).")
    ] = TOK.vocab_size,
    cell: Annotated[
        Cell,
        typer.Option(
            help="Recurrent cell: mingru and minlstm are gated linear recurrences trained with a "
            "parallel scan, in residual blocks; lstm, gru, rnn and irnn the classic cells."
        ),
    ] = MODEL.cell,
    layers: Annotated[
        int | None, typer.Option(help=f"Stacked layers (default: {_by_cell('layers')}).", show_default=False)
    ] = None,
    hidden: Annotated[
        int | None,
        typer.Option(help=f"Hidden units per layer (default: {_by_cell('hidden')}).", show_default=False),
    ] = None,
    embed: Annotated[
        int | None,
        typer.Option(help="Embedding size (default: --hidden for scan cells, else 512).", show_default=False),
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(
            help=f"Locked dropout on embeddings, between layers (classic cells) and before the decoder "
            f"(default: {_by_cell('dropout')}; scan cells: 0.1 on a corpus of up to 2M tokens).",
            show_default=False,
        ),
    ] = None,
    weight_drop: Annotated[
        float, typer.Option(help="DropConnect on the recurrent (hidden-to-hidden) weights while training.")
    ] = MODEL.weight_drop,
    tie_weights: Annotated[
        bool, typer.Option(help="Share embedding and decoder weights (needs --embed = --hidden).")
    ] = MODEL.tie_weights,
    softmax: Annotated[
        Softmax,
        typer.Option(
            help="Output layer: full, or adaptive (cheaper for bpe/unigram vocabularies of thousands "
            "of pieces; not with --tie-weights)."
        ),
    ] = MODEL.softmax,
    forget_bias: Annotated[
        float, typer.Option(help="LSTM: initial bias of the forget gate (1 keeps memory from the start).")
    ] = MODEL.forget_bias,
    residual: Annotated[
        bool, typer.Option(help="Residual connections between stacked layers (each adds its input).")
    ] = MODEL.residual,
    batch_size: Annotated[int, typer.Option(help="Parallel token streams per step.")] = TRAIN.batch_size,
    bptt: Annotated[int, typer.Option(help="Tokens per truncated-BPTT window.")] = TRAIN.bptt,
    optimizer: Annotated[
        OptimizerKind, typer.Option(help="adam or sgd (both clipped and annealed on plateau).")
    ] = TRAIN.optimizer,
    lr: Annotated[
        float | None,
        typer.Option(help=f"Learning rate (default: {_per_optimizer(DEFAULT_LR)}).", show_default=False),
    ] = None,
    clip: Annotated[
        float | None,
        typer.Option(
            help=f"Clip the global gradient norm (default: {_per_optimizer(DEFAULT_CLIP)}).",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Stop after this many passes over the corpus (default: 10, or no limit with "
            "--max-steps or --max-time).",
            show_default=False,
        ),
    ] = None,
    decay: Annotated[
        float, typer.Option(help="Decay the learning rate linearly to 0 over this last fraction of the run.")
    ] = TRAIN.decay,
    weight_decay: Annotated[
        float,
        typer.Option(
            help="Weight decay (decoupled, AdamW; L2 with sgd). Default 0; scan cells with adam: 0.3 on "
            "a corpus of up to 2M tokens, else 0.1.",
            show_default=False,
        ),
    ] = TRAIN.weight_decay,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps.", show_default=False)
    ] = None,
    max_time: Annotated[
        str | None, typer.Option(help="Stop after this long: seconds or 90s, 10m, 1h.", show_default=False)
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Held-out tail of the corpus for validation.")
    ] = TRAIN.val_fraction,
    eval_every: Annotated[
        int, typer.Option(help="Validate (and checkpoint) every this many steps.")
    ] = TRAIN.eval_every,
    save_every: Annotated[
        str,
        typer.Option(help="Also save the latest state every N steps (500) or every so long (90s, 10m)."),
    ] = f"{TRAIN.save_seconds:g}s",
    seed: Annotated[
        int, typer.Option(help="Random seed; the same seed repeats a run on the same machine.")
    ] = TRAIN.seed,
    sample_every: Annotated[
        int | None,
        typer.Option(
            help="Show a short sample every N steps (default: at each validation; 0: never); each is "
            "also logged with its step in RUN/samples.jsonl.",
            show_default=False,
        ),
    ] = TRAIN.sample_every,
    device: Device = TRAIN.device,
    precision: Annotated[
        Precision,
        typer.Option(
            help="Arithmetic of the training step: auto uses bf16 autocast where the hardware runs it "
            "natively (CUDA with bf16, CPUs with AVX-512 bf16 or AMX), fp32 elsewhere and with "
            "--optimizer sgd. Validation scores in the same precision."
        ),
    ] = TRAIN.precision,
    encoding: Encoding = "utf-8",
) -> None:
    """Train a language model on CORPUS; writes a run directory under checkpoints/.

    Under torchrun it trains in several processes; --batch-size is then the global batch.
    """

    def action() -> int:
        from charlm.cli.render import TrainProgress, train_summary
        from charlm.training.distributed import from_env
        from charlm.training.launch import train_run

        with TrainProgress(stderr) as progress:
            result = train_run(
                corpus or (), out=out, resume=resume, encoding=encoding, callbacks=progress,
                on_error=_report, **_given(ctx, exclude={"corpus", "out", "resume", "encoding"}),
            )  # fmt: skip
        code = {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED}.get(result.stop_reason, 0)
        if from_env().main:
            stderr.print(escape(train_summary(result)), highlight=False, soft_wrap=True)
        return code

    try:
        code = _guard(ctx, action)
    except typer.Exit as exc:
        code = exc.exit_code
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        from charlm.training import distributed

        distributed.exit_now(code)  # see its docstring: a clean exit can abort under gloo
    if code:
        raise typer.Exit(code)


def _given(ctx: typer.Context, exclude: set[str]) -> dict[str, Any]:
    """The options typed on this command line, by name: the library's defaults are the CLI's, and
    a resumed run compares only what was given with its own values."""
    return {
        name: value
        for name, value in ctx.params.items()
        if name not in exclude and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    }


def _load(run: Path | None, tag: CheckpointTag, device: str) -> Model:
    """A run (default: the most recent) and its model on the device."""
    from charlm.api import load

    return load(run, tag, device)


@app.command()
def sample(
    ctx: typer.Context,
    run: RunArg = None,
    temp: Temp = SAMPLE.temperature,
    top_k: TopK = SAMPLE.top_k,
    top_p: TopP = SAMPLE.top_p,
    min_p: MinP = SAMPLE.min_p,
    prime: Annotated[str, typer.Option(help="Text to start from; printed first.")] = SAMPLE.prime,
    prime_file: Annotated[
        Path | None,
        typer.Option(
            help="Read this file first (any length; not printed), then --prime.", show_default=False
        ),
    ] = None,
    length: Length = SAMPLE.length,
    num_samples: Annotated[int, typer.Option(help="How many samples.")] = SAMPLE.num_samples,
    seed: Seed = None,
    stop: Stop = None,
    include_stop: IncludeStop = False,
    ban: Ban = None,
    repetition_penalty: RepetitionPenalty = SAMPLE.repetition_penalty,
    presence_penalty: PresencePenalty = SAMPLE.presence_penalty,
    frequency_penalty: FrequencyPenalty = SAMPLE.frequency_penalty,
    penalty_window: PenaltyWindow = SAMPLE.penalty_window,
    state: StateFile = None,
    save_state: Annotated[
        Path | None,
        typer.Option(
            help="Save the state after reading the prime here (with --length 0: only that).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write the samples to this JSON Lines file, one object per sample, with a "
            "progress bar (instead of stdout).",
            show_default=False,
        ),
    ] = None,
    checkpoint: Tag = CheckpointTag.best,
    device: Device = "auto",
    encoding: Encoding = "utf-8",
) -> None:
    """Generate text from a trained run; the text streams to stdout."""

    def action() -> None:
        from charlm.data.prepare import read_corpus

        config = SampleConfig(
            length, temp, top_k, top_p, prime, num_samples, seed, tuple(stop or ()), include_stop, min_p,
            repetition_penalty, presence_penalty, frequency_penalty, penalty_window, tuple(ban or ()),
        )  # fmt: skip
        model = _load(run, checkpoint, device)
        start = model.load_state(state) if state is not None else None
        if prime_file is not None:
            start = model.read(read_corpus([prime_file], encoding), start)
        start = model.read(prime, start) if prime or start is None else start
        if save_state is not None:
            model.save_state(start, save_state)
        if length == 0:
            return
        if output is not None:
            _sample_to_file(model, config, start, output)
            return
        _sample_to_stdout(model, config, start)

    try:
        _guard(ctx, action)
    except BrokenPipeError:  # `charlm sample | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _sample_to_stdout(model: Model, config: SampleConfig, start: Any) -> None:
    """All samples are drawn at once (a batch costs little more than one); the first streams to
    stdout as it is generated, the others follow it."""
    from charlm.generation.sampling import generate, make_generator

    n = config.num_samples
    texts: list[list[str]] = [[config.prime] for _ in range(n)]
    if n > 1:
        stderr.rule(f"sample 1 of {n}")
    _write(config.prime)
    rows = dataclasses.replace(config, prime="")
    for i, piece in generate(model.network, model.run.tokenizer, rows, make_generator(config.seed), start):
        if i == 0:
            _write(piece)
        texts[i].append(piece)
    for i, parts in enumerate(texts):
        if i > 0:
            stderr.rule(f"sample {i + 1} of {n}")
            _write("".join(parts))
        _write("" if parts[-1].endswith("\n") else "\n")


def _sample_to_file(model: Model, config: SampleConfig, start: Any, output: Path) -> None:
    """``--output FILE.jsonl``: one JSON object per sample, written as each batch ends."""
    import secrets

    from charlm.cli.render import TrainProgress
    from charlm.files import os_errors
    from charlm.generation.sampling import make_generator, sample_all

    seed = config.seed if config.seed is not None else secrets.randbits(32)  # recorded: reproducible
    parameters = {
        **{k: v for k, v in dataclasses.asdict(config).items() if k not in ("seed", "num_samples")},
        "run": str(model.path), "checkpoint": model.checkpoint,
    }  # fmt: skip
    with (
        os_errors(CharlmError, f"cannot write {output}"),
        open(output, "w", encoding="utf-8") as file,
        TrainProgress(stderr) as bar,
    ):
        bar.on_progress("sampling", 0, config.num_samples)
        generator = make_generator(seed)
        for s in sample_all(model.network, model.run.tokenizer, config, generator, start):
            record = {"sample": s.index, "text": s.text, "tokens": s.tokens, "stopped": s.stopped,
                      "seed": seed, "parameters": parameters}  # fmt: skip
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.on_progress("sampling", s.index + 1, config.num_samples)
    stderr.print(f"wrote {config.num_samples} samples to {escape(str(output))}", highlight=False)


def _write(text: str) -> None:
    """Stream text to stdout as soon as it is known."""
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
def chat(
    ctx: typer.Context,
    run: RunArg = None,
    temp: Temp = SAMPLE.temperature,
    top_k: TopK = SAMPLE.top_k,
    top_p: TopP = SAMPLE.top_p,
    min_p: MinP = SAMPLE.min_p,
    length: Annotated[int, typer.Option(help="Tokens per reply at most.")] = SAMPLE.length,
    seed: Seed = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(
            help="End a reply when it ends with this (repeatable; default: a blank line).", show_default=False
        ),
    ] = None,
    ban: Ban = None,
    repetition_penalty: RepetitionPenalty = SAMPLE.repetition_penalty,
    presence_penalty: PresencePenalty = SAMPLE.presence_penalty,
    frequency_penalty: FrequencyPenalty = SAMPLE.frequency_penalty,
    penalty_window: PenaltyWindow = SAMPLE.penalty_window,
    state: StateFile = None,
    checkpoint: Tag = CheckpointTag.best,
    device: Device = "auto",
) -> None:
    """Talk with a run: each line you type is read by the model, which continues it.

    A reply ends at a stop string (a blank line unless --stop), at --length, or at Ctrl-C (which
    stops that reply only). The model remembers the whole conversation. Ctrl-D leaves.
    """

    def action() -> None:
        from charlm.generation.chat import DEFAULT_STOP, Conversation

        config = SampleConfig(
            length, temp, top_k, top_p, "", 1, seed, tuple(stop or DEFAULT_STOP), False, min_p,
            repetition_penalty, presence_penalty, frequency_penalty, penalty_window, tuple(ban or ()),
        )  # fmt: skip
        model = _load(run, checkpoint, device)
        start = model.load_state(state) if state is not None else None
        talk = Conversation(model.network, model.run.tokenizer, config, start)
        for line in _lines(
            f"chatting with {model.path} ({model.checkpoint}); Ctrl-C stops a reply, Ctrl-D leaves"
        ):
            replying = talk.reply(line)
            try:
                for piece in replying:
                    _write(piece)
            except KeyboardInterrupt:  # this reply only
                replying.close()
            _write("\n")

    _guard(ctx, action)


def _lines(greeting: str) -> Iterator[str]:
    """The lines a user types: at a prompt with line editing and history when stdin is a terminal
    (prompt_toolkit; Ctrl-C clears the line, Ctrl-D ends), else the lines of stdin."""
    if not sys.stdin.isatty():
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    from prompt_toolkit import PromptSession

    # Ctrl-C stops a reply even where the chat was started with SIGINT ignored (a process started
    # with ``&`` by a non-interactive shell inherits that, and Python then raises no
    # KeyboardInterrupt): at a terminal, the person typing means it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stderr.print(f"[dim]{escape(greeting)}[/]", highlight=False)
    session: PromptSession[str] = PromptSession()
    while True:
        try:
            yield session.prompt("> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return


@app.command("eval")
def eval_(
    ctx: typer.Context,
    run: RunArg = None,
    data: Data = None,
    perplexity: Annotated[
        bool,
        typer.Option("--perplexity", help="Report perplexity and bits per character (the default report)."),
    ] = True,
    as_json: AsJson = False,
    checkpoint: Tag = CheckpointTag.best,
    encoding: Encoding = "utf-8",
    device: Device = "auto",
    precision: Annotated[
        Precision | None,
        typer.Option(
            help="auto, fp32 or bf16 (default: the run's own, as its training validated; bf16 "
            "scores differ from fp32 in about the fifth digit).",
            show_default=False,
        ),
    ] = None,
    dynamic: Annotated[
        bool,
        typer.Option(
            "--dynamic",
            help="Also score with dynamic evaluation: the model learns from each window right after "
            "scoring it (the run's weights on disk are not changed).",
        ),
    ] = False,
    dynamic_lr: Annotated[float, typer.Option(help="--dynamic: learning rate of each update.")] = DYNAMIC_LR,
    dynamic_decay: Annotated[
        float, typer.Option(help="--dynamic: pull towards the trained weights at each update.")
    ] = DYNAMIC_DECAY,
) -> None:
    """Score held-out text: tokens, loss (nats), perplexity per token, bits per character."""

    def action() -> None:
        from charlm.cli.render import TrainProgress, eval_table
        from charlm.data.prepare import read_corpus

        model = _load(run, checkpoint, device)
        text = read_corpus(data, encoding) if data else model.run.heldout_text()
        result: dict[str, Any] = model.evaluate(text, precision).to_dict()
        result["precision"] = model.precision(precision)
        result["run"] = str(model.path)
        result["data"] = ", ".join(map(str, data)) if data else "held-out split"
        if dynamic:
            with TrainProgress(stderr) as bar:
                adapted = model.evaluate(
                    text, precision, dynamic=True, dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay,
                    progress=lambda done, total: bar.on_progress("dynamic evaluation", done, total),
                )  # fmt: skip
            result["dynamic"] = {**adapted.to_dict(), "lr": dynamic_lr, "decay": dynamic_decay}
        if as_json:
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            Console().print(eval_table(f"{model.path} on {result['data']}", result))

    _guard(ctx, action)


@app.command()
def diagnose(
    ctx: typer.Context,
    run: RunArg = None,
    depth: Annotated[int, typer.Option(help="K: measure the gradient k = 0..K steps back.")] = 200,
    batches: Annotated[int, typer.Option(help="Batches of positions to average over.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Positions per batch.")] = 16,
    data: Data = None,
    cell: Annotated[
        Cell | None,
        typer.Option(
            help="Measure a freshly initialised model of this cell instead of a run.", show_default=False
        ),
    ] = None,
    layers: Annotated[
        int | None, typer.Option(help="Fresh model: layers (default: the cell's).", show_default=False)
    ] = None,
    hidden: Annotated[
        int | None, typer.Option(help="Fresh model: hidden units (default: the cell's).", show_default=False)
    ] = None,
    forget_bias: Annotated[
        float, typer.Option(help="Fresh LSTM (and --task): forget-gate bias.")
    ] = MODEL.forget_bias,
    residual: Annotated[bool, typer.Option(help="Fresh model: residual connections between layers.")] = False,
    task: Annotated[
        bool,
        typer.Option("--task", help="Run the delayed-recall task: train each cell briefly at each distance."),
    ] = False,
    cells: Annotated[str, typer.Option(help="--task: cells to compare.")] = "rnn,irnn,gru,lstm,mingru",
    distances: Annotated[str, typer.Option(help="--task: distances to try.")] = "5,10,20,40,80,160",
    task_steps: Annotated[int, typer.Option(help="--task: training steps per cell and distance.")] = 1000,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG plot here.", show_default=False)] = None,
    as_json: AsJson = False,
    checkpoint: Tag = CheckpointTag.best,
    device: Device = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (fresh models, the task).")] = 0,
) -> None:
    """Vanishing and exploding gradients: how far back the loss's gradient reaches, per step.

    Measures |d loss(t) / d state(t-k)| for k = 0..K on real batches, the effective memory (where
    it falls below 1/1000 of k = 0) and the spectral radius of each recurrent matrix; with --task,
    which distances each cell learns to bridge.
    """

    def action() -> None:
        import torch

        if task:
            _diagnose_task(cells, distances, task_steps, forget_bias, seed, plot, as_json)
            return
        from charlm.data.prepare import builtin_corpus, read_corpus
        from charlm.data.tokenizer import train_tokenizer
        from charlm.device import resolve_device
        from charlm.diagnostics import gradients as lib

        if cell is not None:  # a fresh model: its own char tokenizer over the text
            torch.manual_seed(seed)
            text = read_corpus(data, "utf-8") if data else builtin_corpus()[:200_000]
            tokenizer = train_tokenizer(text, TokenizerConfig())
            model = lib.fresh_model(
                cell, layers, hidden, tokenizer.vocab_size, forget_bias=forget_bias, residual=residual
            )
            model = model.to(resolve_device(device))
            name = f"fresh {cell.value} {model.config.layers}x{model.config.hidden}"
        else:
            loaded = _load(run, checkpoint, device)
            model, tokenizer = loaded.network, loaded.run.tokenizer
            text = read_corpus(data, "utf-8") if data else loaded.run.heldout_text()
            name = str(loaded.path)
        ids = torch.from_numpy(tokenizer.encode_array(text))
        try:
            report = lib.diagnose_model(model, ids, depth, batches, batch_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if plot is not None:
            from charlm.diagnostics.plots import plot_gradients

            plot_gradients({name: report.norms}, plot)
        if as_json:
            sys.stdout.write(json.dumps({"model": name, **dataclasses.asdict(report)}) + "\n")
            return
        from charlm.cli.render import gradient_table, radii_table

        console = Console()
        console.print(gradient_table(report.norms, report.effective_memory))
        if report.spectral_radii:  # a scan cell has no recurrent matrix
            console.print(radii_table(report.spectral_radii))

    _guard(ctx, action)


def _diagnose_task(
    cells: str, distances: str, steps: int, forget_bias: float, seed: int, plot: Path | None, as_json: bool
) -> None:
    """``charlm diagnose --task``: the delayed-recall table (progress on stderr)."""
    from charlm.diagnostics import recall as tasks

    try:
        chosen = [Cell(c.strip()) for c in cells.split(",") if c.strip()]
        lags = [int(d) for d in distances.split(",") if d.strip()]
    except ValueError as exc:
        raise ConfigError(f"--cells / --distances: {exc}") from exc
    if not chosen or not lags or min(lags) < 1 or steps < 1:
        raise ConfigError("--task needs cells, distances of at least 1 and --task-steps of at least 1")

    def report(cell: Cell, distance: int, accuracy: float) -> None:
        stderr.print(f"[dim]{cell.value} at distance {distance}: accuracy {accuracy:.2f}[/]", highlight=False)

    results = tasks.recall_table(chosen, lags, steps, seed=seed, forget_bias=forget_bias, on_result=report)
    accuracy = {r.cell: r.accuracy for r in results}
    if plot is not None:
        from charlm.diagnostics.plots import plot_recall

        plot_recall(accuracy, plot, 1 / tasks.SYMBOLS)
    if as_json:
        sys.stdout.write(json.dumps({"task": "delayed recall", "steps": steps, "results": [
            dataclasses.asdict(r) for r in results]}) + "\n")  # fmt: skip
        return
    from charlm.cli.render import recall_table

    Console().print(recall_table(accuracy, {r.cell: r.largest for r in results}))


@app.command()
def novelty(
    ctx: typer.Context,
    run: RunArg = None,
    text: Annotated[
        str, typer.Argument(help="The text to check: a file, or - for stdin (e.g. piped from charlm sample).")
    ] = "-",
    corpus: Annotated[
        list[Path] | None,
        typer.Option(help="Compare with this text instead of the run's training corpus.", show_default=False),
    ] = None,
    as_json: AsJson = False,
    encoding: Encoding = "utf-8",
) -> None:
    """How much of a text is copied from the run's training corpus: the longest span found there
    verbatim, and the fraction of the text's 10-, 20- and 50-character windows that occur there."""

    def action() -> None:
        from charlm.data.corpus import expand_inputs, text_chunks
        from charlm.data.prepare import read_corpus
        from charlm.diagnostics.novelty import novelty as measure
        from charlm.errors import CorpusError
        from charlm.runs import rundir

        loaded = rundir.load_run(run or rundir.latest_run())
        sources = corpus or [Path(p) for p in loaded.config.corpus]
        if not sources:
            raise CorpusError(f"{loaded.path} does not record its corpus; give it with --corpus")
        sample = sys.stdin.read() if text == "-" else read_corpus([text], encoding)
        paths = expand_inputs(sources)
        result = measure(sample, lambda: text_chunks(paths, encoding))  # streamed: bounded memory
        report = {
            "characters": result.characters, "longest_copied": result.longest_copied,
            "copied_fraction": {str(k): v for k, v in result.copied_fraction.items()},
            "longest_spans": result.longest_spans, "corpus": [str(s) for s in sources],
        }  # fmt: skip
        if as_json:
            sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
            return
        from charlm.cli.render import novelty_table

        Console().print(novelty_table(report))

    _guard(ctx, action)


@app.command()
def serve(
    ctx: typer.Context,
    runs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Runs to serve, one model id each (default: the most recent run).", show_default=False
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="CHARLM_API_KEY", help="Require Authorization: Bearer KEY.", show_default=False),
    ] = None,
    max_streams: Annotated[
        int, typer.Option(help="Streams generated at once per model (more get 429).")
    ] = 256,
    max_tokens: Annotated[int, typer.Option(help="The most max_tokens a request may ask for.")] = 4096,
    max_prompt: Annotated[int, typer.Option(help="The longest prompt, in characters.")] = 100_000,
    checkpoint: Tag = CheckpointTag.best,
    device: Device = "auto",
) -> None:
    """Serve runs over HTTP in the shape of OpenAI's completions API (POST /v1/completions, GET
    /v1/models, GET /health; a page to try it at /). Every active request is a row of one batched
    recurrent step. SIGTERM or Ctrl-C end the streams properly and the server with exit code 0."""

    def action() -> None:
        from charlm.serve.app import Limits
        from charlm.serve.server import serve as run_server

        def status(message: str) -> None:
            style = "bold yellow" if message.startswith("warning:") else "dim"
            stderr.print(f"[{style}]{escape(message)}[/]", highlight=False, soft_wrap=True)

        limits = Limits(max_tokens=max_tokens, max_prompt_chars=max_prompt)
        run_server(runs or [], host, port, api_key, checkpoint.value, device, max_streams, limits, status)

    _guard(ctx, action)


@app.command()
def plot(
    ctx: typer.Context,
    run: RunArg = None,
    out: Annotated[
        Path | None, typer.Option(help="PNG file (default: RUN/training.png).", show_default=False)
    ] = None,
) -> None:
    """Draw a run's training and validation loss, bits per character, gradient norm (and clipped
    fraction) and learning rate to a PNG."""

    def action() -> None:
        from charlm.diagnostics.plots import plot_training
        from charlm.runs import rundir

        loaded = rundir.load_run(run or rundir.latest_run())
        records = rundir.read_metrics(loaded.path)
        if not records:
            raise CheckpointError(f"{loaded.path} has no validation yet: nothing to plot")
        path = plot_training(records, out or loaded.path / "training.png", str(loaded.path))
        stderr.print(f"wrote {escape(str(path))}", highlight=False)

    _guard(ctx, action)


def main() -> None:
    """Entry point of the ``charlm`` console script.

    Under torchrun every rank parses the same command line, so a mistake in it is said once, by
    rank 0 (as every error of a distributed run is): the other ranks leave with its exit code.
    """
    if os.environ.get("RANK", "0") == "0":
        app()
        return
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # a usage error
        code = exc.exit_code
    except typer.Abort:
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)
