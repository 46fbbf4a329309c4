"""``charlm serve``: runs over HTTP (:func:`charlm.serve.server.serve`), with its status lines on
stderr. Needs the ``serve`` extra (starlette, uvicorn): without it, one line says how to get it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from charlm.cli.options import Device, Tag, guard, status
from charlm.config import CheckpointTag


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
    chat_format: Annotated[
        Path | None,
        typer.Option(
            help="How /v1/chat/completions writes messages as text: a JSON file of templates, e.g. "
            '{"user": "Q: {content}\\n", "assistant": "A: {content}\\n\\n"} (default: charlm chat\'s).',
            show_default=False,
        ),
    ] = None,
    state_cache: Annotated[
        float,
        typer.Option(
            help="MB per model for the states of recent prompts, so that a prompt which extends one "
            "(the next turn of a chat) reads only its new tokens; 0: none.",
        ),
    ] = 64,
    checkpoint: Tag = CheckpointTag.best,
    device: Device = "auto",
) -> None:
    """Serve runs over HTTP in the shape of OpenAI's API (POST /v1/completions and
    /v1/chat/completions, GET /v1/models, GET /health; a page to try it at /). Every active request
    is a row of one batched recurrent step. SIGTERM or Ctrl-C end the streams properly and the
    server with exit code 0."""

    def action() -> None:
        from charlm.serve.app import Limits  # charlm.serve says which extra is missing, if one is
        from charlm.serve.server import read_chat_format
        from charlm.serve.server import serve as run_server

        limits = Limits(max_tokens=max_tokens, max_prompt_chars=max_prompt)
        template = read_chat_format(chat_format) if chat_format is not None else None
        run_server(
            runs or [], host, port, api_key, checkpoint.value, device, max_streams, limits, status,
            chat_format=template, cache_bytes=round(state_cache * 2**20),
        )  # fmt: skip

    guard(ctx, action)
