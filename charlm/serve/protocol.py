"""The server's request schema: OpenAI's completions and chat completions requests, declared as
pydantic models, and the errors a request can get, in OpenAI's shape.

A request is checked in three steps, each naming the JSON field it refuses (``param``):

1. its types and OpenAI's own bounds, declared here (:class:`CompletionRequest`,
   :class:`ChatRequest`); a field the API does not have is refused, as OpenAI refuses it, so a
   misspelt ``temprature`` is never ignored without a word;
2. this server's limits (:meth:`Sampling.within`: ``--max-tokens``, ``--max-prompt``, the streams
   one request may ask for);
3. the library's own rules, by building :class:`~charlm.config.SampleConfig`: its
   :class:`~charlm.errors.ConfigError` names library fields (``length``, ``top_p``), which
   :func:`config_error` words as the JSON keys a client sent (``max_tokens``, ``top_p``).

Whatever could fail in the engine is refused here, with a 4xx, never a 500.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from charlm.config import SampleConfig
from charlm.errors import ConfigError

__all__ = [
    "ApiError", "ChatRequest", "CompletionRequest", "Limits", "Message", "Sampling", "config_error",
    "json_key", "parse", "request_error",
]  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask for (the server's options, not OpenAI's)."""

    max_tokens: int = 4096
    max_prompt_chars: int = 100_000
    max_n: int = 16


class ApiError(Exception):
    """A request the API refuses: an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message may quote what the client sent, lone surrogates included, which
        # UTF-8 cannot encode (Starlette's JSONResponse failed on them with a 500)
        return Response(json.dumps(self.body()), self.status, media_type="application/json")


# The library's sampling fields that a request names otherwise; every other is the same word.
_JSON_KEYS = {"length": "max_tokens", "num_samples": "n"}


def json_key(field: str) -> str:
    """The JSON key of the request that sets the library's sampling field ``field``."""
    return _JSON_KEYS.get(field, field)


def config_error(exc: ConfigError) -> ApiError:
    """The library's refusal of a sampling value, in the words of the request: its fields named
    as the JSON keys the client sent, the first of them as ``param``."""
    param = json_key(exc.fields[0]) if exc.fields else None
    return ApiError(400, exc.worded(json_key), param=param)


def request_error(exc: ValidationError) -> ApiError:
    """pydantic's first complaint about a request, as OpenAI words one (``param`` is the field's
    path: ``max_tokens``, ``messages.[0].role``)."""
    error = exc.errors(include_url=False)[0]
    param = _param(error["loc"])
    if error["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if error["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'", param=param)
    message = str(error["msg"])
    return ApiError(400, f"Invalid value for '{param}': {message[:1].lower()}{message[1:]}", param=param)


def _param(loc: Sequence[int | str]) -> str:
    """A pydantic location as OpenAI writes a field's path (``messages.[0].content``); an item of
    a list of plain values names the list (``stop``, not ``stop.[1]``)."""
    parts = [f"[{part}]" if isinstance(part, int) else part for part in loc]
    while len(parts) > 1 and isinstance(loc[len(parts) - 1], int):
        parts.pop()
    return ".".join(parts)


def parse(model: type[Sampling], body: Any, limits: Limits) -> Any:
    """``body`` (a decoded JSON value) as a request of ``model``, checked against ``limits``.

    Raises:
        ApiError: the first thing wrong with it.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise request_error(exc) from None
    request.within(limits)
    return request


def _unicode(text: str) -> str:
    """A string a tokenizer can take: JSON's ``\\ud800`` escapes give Python lone surrogates,
    which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("unicode", "not valid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _listed(what: str) -> Callable[[Any], Any]:
    """A field that takes a string or a list of them, as a list."""

    def listed(value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise PydanticCustomError("text_or_list", "must be {what}", {"what": what})
        return value

    return listed


def _off(*values: Any) -> Callable[[Any], Any]:
    """A field of OpenAI's that charlm does not do, taken only at its "off" values: a client
    that scores text with echo and logprobs must hear that it gets none, not text without them."""

    def off(value: Any) -> Any:
        if not any(value == v and type(value) is type(v) for v in values):
            raise PydanticCustomError("unsupported", "not supported by this server")
        return value

    return off


# OpenAI's fields that charlm does not do, each taken only at its "off" values
NoBias = Annotated[Any, BeforeValidator(_off({}))]
NoBestOf = Annotated[Any, BeforeValidator(_off(1))]
NoSuffix = Annotated[Any, BeforeValidator(_off(""))]
Never = Annotated[Any, BeforeValidator(_off())]  # any value asks for something (logprobs: 0 too)
NoLogprobs = Annotated[Any, BeforeValidator(_off(False))]
TextFormat = Annotated[Any, BeforeValidator(_off({"type": "text"}))]
NoTools = Annotated[Any, BeforeValidator(_off([]))]
NoToolChoice = Annotated[Any, BeforeValidator(_off("none"))]

# a chat reply's tokens when the request does not say (within --max-tokens): charlm chat's default
DEFAULT_REPLY_TOKENS = 500


class _Schema(BaseModel):
    """Strict JSON: no "9" for 9, no true for 1, no NaN; no field the schema has not."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class StreamOptions(_Schema):
    include_usage: bool = False
    include_obfuscation: bool = False  # nothing to obfuscate here: taken and ignored


class Sampling(_Schema):
    """The fields both endpoints share: the model, how many choices, the sampling controls (those
    of OpenAI's within its bounds, and charlm's own ``top_k``, ``min_p`` and
    ``repetition_penalty``), the stop strings and streaming. A field sent as ``null`` has its
    default, as if it were not sent."""

    model: str
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Annotated[list[Text], BeforeValidator(_listed("a string or a list of strings")),
                    Field(max_length=4)] = []  # fmt: skip
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = 1.0
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    user: str = ""
    logit_bias: NoBias = {}

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, body: Any) -> Any:
        return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body

    def length(self, limits: Limits) -> tuple[int, str]:
        """The most tokens a choice may have, and the field that says so."""
        raise NotImplementedError

    def within(self, limits: Limits) -> None:
        """Refuse what this server does not give, whatever OpenAI allows."""
        n = self.n
        length, field = self.length(limits)
        checks = [
            (length <= limits.max_tokens, field, f"at most {limits.max_tokens} on this server"),
            (n <= limits.max_n, "n", f"between 1 and {limits.max_n}"),
            # a choice j samples with seed + j, into a 64-bit generator seed
            (self.seed is None or self.seed <= 2**64 - n, "seed", f"between -2**63 and 2**64 - {n}"),
        ]
        for ok, param, what in checks:
            if not ok:
                raise ApiError(400, f"'{param}' must be {what}", param=param)

    def config(self, limits: Limits, stop: Sequence[str] = ()) -> SampleConfig:
        """The library's sampling config of this request (its ``seed`` is the first choice's);
        ``stop``: stop strings of the endpoint's own, before the request's.

        Raises:
            ApiError: the library refuses a value (worded as the request's field).
        """
        try:
            return SampleConfig(
                length=self.length(limits)[0],
                temperature=float(self.temperature),
                top_k=self.top_k,
                top_p=float(self.top_p),
                min_p=float(self.min_p),
                presence_penalty=float(self.presence_penalty),
                frequency_penalty=float(self.frequency_penalty),
                repetition_penalty=float(self.repetition_penalty),
                stop=tuple(dict.fromkeys([*stop, *self.stop])),
                seed=self.seed,
            )
        except ConfigError as exc:
            raise config_error(exc) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options.include_usage


class CompletionRequest(Sampling):
    """``POST /v1/completions``: continue each prompt."""

    prompt: Annotated[list[Text], BeforeValidator(_listed("a string or a non-empty list of strings")),
                      Field(min_length=1)] = [""]  # fmt: skip
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    best_of: NoBestOf = 1
    logprobs: Never = None
    suffix: NoSuffix = ""

    def length(self, limits: Limits) -> tuple[int, str]:
        return self.max_tokens, "max_tokens"

    def within(self, limits: Limits) -> None:
        super().within(limits)
        if any(len(p) > limits.max_prompt_chars for p in self.prompt):
            raise ApiError(
                400, f"a prompt is longer than {limits.max_prompt_chars} characters", param="prompt"
            )
        rows = limits.max_n * 4
        if len(self.prompt) * self.n > rows:
            what = f"'n' must be such that prompts x n is at most {rows}, not {len(self.prompt)} x {self.n}"
            raise ApiError(400, what, param="n")


def _text_of(content: Any) -> Any:
    """A message's content: a string, or OpenAI's list of parts, of which only text parts are
    taken (an image or audio part is refused, not dropped)."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise PydanticCustomError("text_parts", "only text parts are supported by this server")
        if set(part) - {"type", "text"}:
            raise PydanticCustomError("text_parts", "a text part has only 'type' and 'text'")
        texts.append(part["text"])
    return "".join(texts)


class Message(_Schema):
    """One message of a conversation. ``developer`` is OpenAI's newer name for ``system``; a
    ``name`` is taken and not written into the transcript."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, BeforeValidator(_text_of)]
    name: str | None = None


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``: the next message of a conversation. ``max_completion_tokens``
    is OpenAI's newer name for ``max_tokens``; without either, a reply has up to 500 tokens (as
    ``charlm chat``'s, within the server's ``--max-tokens``) and ends before that at the chat
    format's end of a reply."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: NoLogprobs = False
    top_logprobs: Never = None
    response_format: TextFormat = None
    tools: NoTools = None
    tool_choice: NoToolChoice = None
    parallel_tool_calls: bool = True  # without tools, nothing to call in parallel

    def length(self, limits: Limits) -> tuple[int, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        if self.max_tokens is not None:
            return self.max_tokens, "max_tokens"
        return min(DEFAULT_REPLY_TOKENS, limits.max_tokens), "max_tokens"

    def within(self, limits: Limits) -> None:
        super().within(limits)
        if sum(len(m.content) for m in self.messages) > limits.max_prompt_chars:
            what = f"the messages are longer than {limits.max_prompt_chars} characters in all"
            raise ApiError(400, what, param="messages")

    @property
    def turns(self) -> list[tuple[str, str]]:
        """(role, content) of each message, ``developer`` as ``system``."""
        return [("system" if m.role == "developer" else m.role, m.content) for m in self.messages]
