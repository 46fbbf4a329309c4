"""``charlm sample``: text from a trained run, streamed to stdout (:meth:`charlm.Model.stream_samples`)
or written as JSON Lines with ``--output`` (:meth:`charlm.Model.sample_records`)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from charlm.cli.options import (
    SAMPLE,
    Ban,
    Device,
    Encoding,
    FrequencyPenalty,
    IncludeStop,
    Length,
    MinP,
    PenaltyWindow,
    PresencePenalty,
    RepetitionPenalty,
    RunArg,
    Seed,
    StateFile,
    Stop,
    Tag,
    Temp,
    TopK,
    TopP,
    guard,
    stderr,
    write,
)
from charlm.config import CheckpointTag, SampleConfig
from charlm.errors import CharlmError

if TYPE_CHECKING:  # imported by the command, so `charlm --help` stays instant
    from charlm.api import Model


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
        from charlm.api import load
        from charlm.data.prepare import read_corpus

        config = SampleConfig(  # checked before the run is loaded
            length=length, temperature=temp, top_k=top_k, top_p=top_p, prime=prime,
            num_samples=num_samples, seed=seed, stop=tuple(stop or ()), include_stop=include_stop,
            min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, penalty_window=penalty_window, ban=tuple(ban or ()),
        )  # fmt: skip
        model = load(run, checkpoint, device)
        start = model.load_state(state) if state is not None else None
        if prime_file is not None:
            start = model.read(read_corpus([prime_file], encoding), start)
        if save_state is not None:
            model.save_state(model.read(prime, start) if prime or start is None else start, save_state)
        if length == 0:
            return
        options = dataclasses.asdict(config)  # the prime is read on from `start`
        if output is not None:
            _to_file(model, options, start, output)
        else:
            _to_stdout(model, options, start)

    try:
        guard(ctx, action)
    except BrokenPipeError:  # `charlm sample | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _to_stdout(model: Model, options: dict[str, Any], start: Any) -> None:
    """Each sample's text on stdout, as it is known, with a rule on stderr before each of several."""
    n = options["num_samples"]
    if n > 1:
        stderr.rule(f"sample 1 of {n}")
    shown = 0
    for i, text in model.stream_samples(**options, state=start):
        if i != shown:
            stderr.rule(f"sample {i + 1} of {n}")
            shown = i
        write(text)


def _to_file(model: Model, options: dict[str, Any], start: Any, output: Path) -> None:
    """``--output FILE.jsonl``: one JSON object per sample, written as each batch ends."""
    from charlm.cli.render import TrainProgress
    from charlm.files import os_errors

    n = options["num_samples"]
    with (
        os_errors(CharlmError, f"cannot write {output}"),
        open(output, "w", encoding="utf-8") as file,
        TrainProgress(stderr) as bar,
    ):
        bar.on_progress("sampling", 0, n)
        for record in model.sample_records(**options, state=start):
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.on_progress("sampling", record["sample"] + 1, n)
    stderr.print(f"wrote {n} samples to {escape(str(output))}", highlight=False)
