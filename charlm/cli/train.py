"""``charlm train``: parse the options, hand them to :func:`charlm.training.launch.train_run`
(the options typed, by name: the library's defaults are the CLI's), draw its progress on stderr,
and end with the run's summary and an exit code (130 when interrupted, 143 when terminated).

Under torchrun every rank runs this; errors every rank shares are said once, by rank 0. With
``--nproc-per-node`` it launches those ranks itself (:mod:`charlm.training.elastic`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from charlm.cli.options import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    MODEL,
    TOK,
    TRAIN,
    Device,
    Encoding,
    guard,
    report,
    stderr,
)
from charlm.config import (
    CELL_DEFAULTS,
    DEFAULT_CLIP,
    DEFAULT_LR,
    FINE_TUNE_LR,
    Activation,
    Cell,
    CheckpointTag,
    OptimizerKind,
    Precision,
    Softmax,
    TokenizerKind,
    weight_decay_rule,
)

_SEVERAL = "Several processes"
_LAUNCH = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")


def _per_optimizer(defaults: dict[OptimizerKind, float]) -> str:
    return ", ".join(f"{kind.value} {value:g}" for kind, value in defaults.items())


def _by_cell(name: str) -> str:
    """A model field's default for each group of cells: "mingru, minlstm 4; lstm, gru, ... 2"."""
    groups: dict[Any, list[str]] = {}
    for cell, defaults in CELL_DEFAULTS.items():
        groups.setdefault(defaults[name], []).append(cell.value)
    return "; ".join(f"{', '.join(cells)} {value:g}" for value, cells in groups.items())


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
            "--eval-every, --save-every, --device, --precision and --compile."
        ),
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Fine-tune: start a new run from this run's weights, tokenizer and model (its model "
            "options given again must keep its values; the training options are this command's).",
            show_default=False,
        ),
    ] = None,
    checkpoint: Annotated[
        CheckpointTag | None,
        typer.Option(
            help="Which checkpoint of --init-from to start from (default: best).", show_default=False
        ),
    ] = None,
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
            f"(default: {_by_cell('dropout')}).",
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
    mlp: Annotated[
        Activation,
        typer.Option(
            help="mingru, minlstm: their MLP's nonlinearity, relu2 (squared ReLU) or gelu (earlier runs')."
        ),
    ] = MODEL.mlp,
    batch_size: Annotated[int, typer.Option(help="Parallel token streams per step.")] = TRAIN.batch_size,
    bptt: Annotated[int, typer.Option(help="Tokens per truncated-BPTT window.")] = TRAIN.bptt,
    optimizer: Annotated[
        OptimizerKind, typer.Option(help="adam or sgd (clipped; classic cells halve the lr on a plateau).")
    ] = TRAIN.optimizer,
    lr: Annotated[
        float | None,
        typer.Option(
            help=f"Learning rate (default: {_per_optimizer(DEFAULT_LR)}; with --init-from, "
            f"{FINE_TUNE_LR:g} of that).",
            show_default=False,
        ),
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
            help="Weight decay (decoupled, AdamW; L2 with sgd). Default 0; scan cells with adam: by the "
            f"passes the run makes over its corpus, {weight_decay_rule()}.",
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
        float, typer.Option(help="Fraction of the corpus held out for validation.")
    ] = TRAIN.val_fraction,
    val_pieces: Annotated[
        int, typer.Option(help="Hold it out in this many pieces spread over the corpus (1: its tail).")
    ] = TRAIN.val_pieces,
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
    compile: Annotated[
        bool,
        typer.Option(
            help="Compile the training step with torch.compile: 1.2x to 1.7x the tokens/s of the default "
            "model on a 2-core CPU, after a compilation of about a minute (seconds once cached). Needs a C++ "
            "compiler on a CPU; without one the run trains uncompiled and says so."
        ),
    ] = TRAIN.compile,
    encoding: Encoding = "utf-8",
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            help="Train in this many processes on this machine (one per GPU, or CPU processes), "
            "launched as torchrun launches them; --batch-size is the global batch.",
            show_default=False,
            rich_help_panel=_SEVERAL,
        ),
    ] = None,
    nnodes: Annotated[
        int, typer.Option(help="Machines taking part, each running this command.", rich_help_panel=_SEVERAL)
    ] = 1,
    node_rank: Annotated[
        int,
        typer.Option(
            help="This machine's place among them (0: the one at --master-addr).", rich_help_panel=_SEVERAL
        ),
    ] = 0,
    master_addr: Annotated[
        str | None,
        typer.Option(
            help="Address of machine 0, where the processes meet.",
            show_default=False,
            rich_help_panel=_SEVERAL,
        ),
    ] = None,
    master_port: Annotated[
        int | None,
        typer.Option(
            help="Port on machine 0 where the processes meet (default: 29500, or any free "
            "port on one machine).",
            show_default=False,
            rich_help_panel=_SEVERAL,
        ),
    ] = None,
) -> None:
    """Train a language model on CORPUS; writes a run directory under checkpoints/.

    With --nproc-per-node (or under torchrun) it trains in several processes; --batch-size is then
    the global batch.
    """
    if any(_given_here(ctx, name) for name in _LAUNCH):
        code = guard(ctx, lambda: _launch(ctx, nproc_per_node, nnodes, node_rank, master_addr, master_port))
        if code:
            raise typer.Exit(code)
        return

    ranks = None

    def action() -> int:
        nonlocal ranks
        from charlm.cli.render import TrainProgress, train_summary
        from charlm.training.distributed import from_env
        from charlm.training.launch import train_run

        ranks = from_env()
        own = {"corpus", "out", "resume", "init_from", "checkpoint", "encoding", *_LAUNCH}
        with TrainProgress(stderr) as progress:
            result = train_run(
                corpus or (), out=out, resume=resume, init_from=init_from, checkpoint=checkpoint,
                encoding=encoding, callbacks=progress, on_error=report, **_given(ctx, exclude=own),
            )  # fmt: skip
        code = {"interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED}.get(result.stop_reason, 0)
        if ranks.main:
            stderr.print(escape(train_summary(result)), highlight=False, soft_wrap=True)
        return code

    try:
        code = guard(ctx, action)
    except typer.Exit as exc:
        code = exc.exit_code
    if ranks is not None and ranks.distributed:
        from charlm.training import distributed

        distributed.exit_now(code)  # see its docstring: a clean exit can abort under gloo
    if code:
        raise typer.Exit(code)


def _launch(
    ctx: typer.Context,
    nproc_per_node: int | None,
    nnodes: int,
    node_rank: int,
    master_addr: str | None,
    master_port: int | None,
) -> int:
    """This command, without its launch options, in several processes (see
    :func:`charlm.training.elastic.launch`)."""
    import os

    from charlm.errors import ConfigError
    from charlm.training.elastic import launch

    if "RANK" in os.environ:
        raise ConfigError("{nproc_per_node} launches the processes itself: not under torchrun",
                          fields=("nproc_per_node",))  # fmt: skip
    if nproc_per_node is None:
        raise ConfigError("{nnodes}, {node_rank}, {master_addr} and {master_port} go with {nproc_per_node}",
                          fields=(*_LAUNCH[1:], "nproc_per_node"))  # fmt: skip
    return launch(
        _argv(ctx, exclude=set(_LAUNCH)), nproc_per_node, nnodes, node_rank, master_addr, master_port
    )


def _given_here(ctx: typer.Context, name: str) -> bool:
    return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"


def _argv(ctx: typer.Context, exclude: set[str]) -> list[str]:
    """The options and arguments typed on this command line, ``exclude`` left out, as a command
    line again: what each launched process parses."""
    import enum

    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name is None or name in exclude or not _given_here(ctx, name):
            continue
        value = ctx.params[name]
        if param.param_type_name == "argument":
            args += [str(v) for v in value]
        elif getattr(param, "is_flag", False):
            args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value.value if isinstance(value, enum.Enum) else value)]
    return args


def _given(ctx: typer.Context, exclude: set[str]) -> dict[str, Any]:
    """The options typed on this command line, by name: the library's defaults are the CLI's, and
    a resumed run compares only what was given with its own values."""
    return {
        name: value for name, value in ctx.params.items() if name not in exclude and _given_here(ctx, name)
    }
