"""``charlm chat``: a terminal face on :meth:`charlm.Model.conversation`. At a terminal the lines
are typed at a prompt with line editing and history (prompt_toolkit, the ``chat`` extra); piped
lines are read as they come, without it."""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.markup import escape

from charlm.cli.options import (
    SAMPLE,
    Ban,
    Device,
    FrequencyPenalty,
    MinP,
    PenaltyWindow,
    PresencePenalty,
    RepetitionPenalty,
    RunArg,
    Seed,
    StateFile,
    Tag,
    Temp,
    TopK,
    TopP,
    guard,
    stderr,
    write,
)
from charlm.config import CheckpointTag, SampleConfig


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
        from charlm.api import load

        config = SampleConfig(  # checked before the run is loaded
            length=length, temperature=temp, top_k=top_k, top_p=top_p, seed=seed,
            stop=tuple(stop or ()), min_p=min_p, repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            penalty_window=penalty_window, ban=tuple(ban or ()),
        )  # fmt: skip
        options = dataclasses.asdict(config)
        if not stop:
            del options["stop"]  # the conversation's own default: a blank line
        model = load(run, checkpoint, device)
        start = model.load_state(state) if state is not None else None
        talk = model.conversation(start, **options)
        for line in _lines(
            f"chatting with {model.path} ({model.checkpoint}); Ctrl-C stops a reply, Ctrl-D leaves"
        ):
            replying = talk.reply(line)
            try:
                for piece in replying:
                    write(piece)
            except KeyboardInterrupt:  # this reply only
                replying.close()
            write("\n")

    guard(ctx, action)


def _interactive() -> bool:
    """Whether the lines come from a person at a terminal (else they are piped)."""
    return sys.stdin.isatty()


def _lines(greeting: str) -> Iterator[str]:
    """The lines a user types: at a prompt with line editing and history when stdin is a terminal
    (prompt_toolkit; Ctrl-C clears the line, Ctrl-D ends), else the lines of stdin."""
    if not _interactive():
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    from charlm.extras import require

    require("chat", "charlm chat at a terminal")  # one line naming the extra, not an ImportError
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
