"""The public Python API: :func:`train` a run, :func:`load` it as a :class:`Model`, then sample,
stream, score and inspect it. The command line is a face on these same functions, so a figure or a
sample from Python is the one ``charlm`` prints for the same options and seed.

    import charlm
    result = charlm.train(["corpus.txt"], out="checkpoints/x", hidden=256, max_time="10m")
    model = charlm.load("checkpoints/x")
    model.sample(prime="The ", length=200, temperature=0.8, seed=1)
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from charlm.config import DYNAMIC_DECAY, DYNAMIC_LR, CheckpointTag, Precision, SampleConfig
from charlm.data.corpus import expand_inputs, text_chunks
from charlm.device import resolve_device, resolve_precision
from charlm.diagnostics.novelty import Novelty, novelty
from charlm.generation.chat import DEFAULT_STOP, Conversation
from charlm.generation.sampling import Context, Sample, generate, make_generator, read, sample_all
from charlm.generation.state import load_state, save_state
from charlm.model.network import RNNLM
from charlm.model.scoring import EvalResult, evaluate_dynamic, evaluate_text
from charlm.runs import checkpoint as ckpt
from charlm.runs import rundir
from charlm.runs.rundir import Run
from charlm.training.launch import train_run

_SAMPLE = SampleConfig()

train = train_run  # charlm.train(corpus, out=..., resume=..., callbacks=..., stop=..., **options)


def resolve_seed(seed: int | None) -> int:
    """``seed``, or a fresh random one where it is None: a seed to record beside samples drawn
    without one, so that they can be drawn again."""
    return seed if seed is not None else secrets.randbits(32)


def load(
    path: str | os.PathLike[str] | None = None,
    checkpoint: CheckpointTag | str = CheckpointTag.best,
    device: str = "auto",
) -> Model:
    """Open a trained run for use.

    Args:
        path: the run directory; default, the run under ``checkpoints/`` trained last.
        checkpoint: "best" (lowest held-out loss; a run stopped before its first validation has
            only "latest", which is then used) or "latest".
        device: "auto" (CUDA when present), "cpu" or "cuda".

    Raises:
        CheckpointError: no such run, or it is damaged (the message names the file).
        DeviceError: "cuda" asked for and none present.
    """
    return Model.open(path, checkpoint, device)


class Model:
    """A trained run's model, with its tokenizer: text in, text or figures out.

    Build one with :func:`load`. ``network`` is the torch module, ``run`` the run directory's
    config and tokenizer.
    """

    def __init__(self, run: Run, network: RNNLM, tag: str, weights_sha256: str = "") -> None:
        self.run, self.network, self.checkpoint = run, network, tag
        self.weights_sha256 = weights_sha256

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None, tag: CheckpointTag | str, device: str) -> Model:
        """See :func:`load`."""
        name = CheckpointTag(tag).value
        dev = resolve_device(device)
        run = rundir.load_run(Path(path) if path is not None else rundir.latest_run())
        if name == ckpt.BEST and ckpt.checkpoint_dir(run.path, name) is None:
            name = ckpt.LATEST  # a run interrupted before its first validation
        return cls(run, ckpt.load_model(run, name, dev), name, ckpt.weights_sha256(run.path, name))

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def device(self) -> torch.device:
        return self.network.device

    def __repr__(self) -> str:
        return f"<charlm.Model {self.path} ({self.checkpoint}) on {self.device.type}>"

    @property
    def identity(self) -> dict[str, str]:
        """What a state file is tied to: this checkpoint's weights (by checksum), run and tag."""
        return {"weights_sha256": self.weights_sha256, "run": str(self.path), "checkpoint": self.checkpoint}

    def read(self, text: str, state: Context | None = None) -> Context:
        """Read ``text`` (any length: windows of tokens at a time), from a start-of-text context or
        on from ``state``: the state to start samples from (:meth:`stream`'s ``state``)."""
        return read(self.network, self.run.tokenizer, text, state)

    def save_state(self, state: Context, path: str | os.PathLike[str]) -> None:
        """Save ``state`` (from :meth:`read`) as a state file tied to this model."""
        save_state(Path(path), state, self.identity)

    def load_state(self, path: str | os.PathLike[str]) -> Context:
        """A state file saved by :meth:`save_state` of this model (another model's is refused)."""
        return load_state(Path(path), self.identity, self.device)

    def stream(
        self,
        prime: str = "",
        length: int = _SAMPLE.length,
        temperature: float = _SAMPLE.temperature,
        top_k: int = _SAMPLE.top_k,
        top_p: float = _SAMPLE.top_p,
        seed: int | None = None,
        state: Context | None = None,
        **controls: Any,
    ) -> Iterator[str]:
        """The continuation of ``prime`` (not included), in pieces as each becomes certain: the
        text :meth:`sample` returns and ``charlm sample`` prints after the prime for this seed.

        ``length`` counts tokens (characters for a char tokenizer); ``temperature`` 0 picks the
        most likely token; ``top_k`` 0 and ``top_p`` 1 switch those filters off. ``state`` starts
        from a saved state (the prime, if any, is read on from it). ``controls`` are the other
        options of ``charlm sample``: ``stop`` and ``ban`` (lists of strings), ``include_stop``,
        ``min_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``,
        ``penalty_window`` (see :class:`charlm.config.SampleConfig`).

        Raises:
            ConfigError: a value out of range. TypeError: an unknown control.
        """
        config = SampleConfig(
            length=length,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            prime=prime,
            seed=seed,
            **controls,
        )
        for _, piece in generate(self.network, self.run.tokenizer, config, make_generator(seed), state):
            yield piece

    def sample(
        self,
        prime: str = "",
        length: int = _SAMPLE.length,
        temperature: float = _SAMPLE.temperature,
        top_k: int = _SAMPLE.top_k,
        top_p: float = _SAMPLE.top_p,
        seed: int | None = None,
        state: Context | None = None,
        **controls: Any,
    ) -> str:
        """The continuation of ``prime`` (not included), as one string (see :meth:`stream`)."""
        return "".join(self.stream(prime, length, temperature, top_k, top_p, seed, state, **controls))

    def samples(
        self,
        num_samples: int,
        prime: str = "",
        length: int = _SAMPLE.length,
        seed: int | None = None,
        state: Context | None = None,
        batch: int = 64,
        **options: Any,
    ) -> Iterator[Sample]:
        """``num_samples`` samples (``.index``, ``.text``, ``.tokens``, ``.stopped``), drawn
        ``batch`` at a time in one batched step each: what ``charlm sample --num-samples N
        --output FILE.jsonl`` writes. ``options`` as :meth:`stream`'s (temperature, controls)."""
        config = SampleConfig(length=length, prime=prime, num_samples=num_samples, seed=seed, **options)
        return sample_all(self.network, self.run.tokenizer, config, make_generator(seed), state, batch)

    def stream_samples(
        self,
        num_samples: int = 1,
        prime: str = "",
        length: int = _SAMPLE.length,
        seed: int | None = None,
        state: Context | None = None,
        **options: Any,
    ) -> Iterator[tuple[int, str]]:
        """What ``charlm sample`` prints on stdout, as (sample index, text) in the order printed:
        all samples are drawn at once (a batch costs little more than one), the first streams as
        it is generated and the others follow it whole. Each sample starts with ``prime`` and ends
        with a newline unless its text did. ``options`` as :meth:`stream`'s; empty texts are not
        yielded.

        Raises:
            ConfigError: a value out of range. TypeError: an unknown option.
        """
        config = SampleConfig(length=length, prime=prime, num_samples=num_samples, seed=seed, **options)
        texts: list[list[str]] = [[prime] for _ in range(num_samples)]
        if prime:
            yield 0, prime
        pieces = generate(self.network, self.run.tokenizer, config, make_generator(seed), state)
        for i, piece in pieces:
            if i == 0:
                yield 0, piece
            texts[i].append(piece)
        for i, parts in enumerate(texts):
            if i > 0:
                yield i, "".join(parts)
            if not parts[-1].endswith("\n"):
                yield i, "\n"

    def sample_records(
        self,
        num_samples: int = 1,
        prime: str = "",
        length: int = _SAMPLE.length,
        seed: int | None = None,
        state: Context | None = None,
        batch: int = 64,
        **options: Any,
    ) -> Iterator[dict[str, Any]]:
        """The JSON objects ``charlm sample --output FILE.jsonl`` writes, one a sample as each batch
        of :meth:`samples` ends: ``sample`` (its index), ``text`` (the prime not included),
        ``tokens``, ``stopped``, ``seed`` and ``parameters`` (the sampling options, the run and the
        checkpoint). Without a ``seed`` a random one is drawn and recorded, so that the samples can
        be drawn again. Plain JSON values: a record equals its own JSON round trip.

        Raises:
            ConfigError: a value out of range. TypeError: an unknown option.
        """
        seed = resolve_seed(seed)
        config = SampleConfig(length=length, prime=prime, num_samples=num_samples, seed=seed, **options)
        parameters: dict[str, Any] = {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(config).items()
            if name not in ("seed", "num_samples")
        }
        parameters.update(run=str(self.path), checkpoint=self.checkpoint)
        for s in self.samples(num_samples, prime, length, seed, state, batch, **options):
            yield {
                "sample": s.index, "text": s.text, "tokens": s.tokens, "stopped": s.stopped,
                "seed": seed, "parameters": dict(parameters),
            }  # fmt: skip

    def conversation(self, state: Context | None = None, **options: Any) -> Conversation:
        """A chat: ``.reply(line)`` yields the model's continuation of each line in pieces, and the
        state carries from turn to turn (``charlm chat``). ``options`` as :meth:`stream`'s; the
        stop string defaults to a blank line."""
        options.setdefault("stop", DEFAULT_STOP)
        return Conversation(self.network, self.run.tokenizer, SampleConfig(**options), state)

    def novelty(self, text: str, corpus: str | None = None) -> Novelty:
        """How much of ``text`` is copied verbatim from the run's training corpus (or ``corpus``,
        a text): ``.longest_copied``, ``.copied_fraction`` by window size, ``.longest_spans``.

        Raises:
            CorpusError: the run's corpus cannot be read here (then give ``corpus``).
        """
        if corpus is not None:
            return novelty(text, corpus)
        paths = expand_inputs(list(self.run.config.corpus))
        return novelty(text, lambda: text_chunks(paths))

    def evaluate(
        self,
        text: str,
        precision: Precision | str | None = None,
        dynamic: bool = False,
        dynamic_lr: float = DYNAMIC_LR,
        dynamic_decay: float = DYNAMIC_DECAY,
        progress: Callable[[int, int], None] | None = None,
    ) -> EvalResult:
        """Score ``text``: ``.loss`` (nats per token), ``.perplexity`` (per token), ``.bpc`` (bits
        per character), ``.tokens``, ``.characters``; the figure ``charlm eval`` prints for it.

        Args:
            precision: "auto", "fp32" or "bf16"; default, the run's own (as its training scored).
            dynamic: score with dynamic evaluation instead (Krause et al. 2018): the model learns
                from each window right after scoring it, on a copy (the run is not changed).
            progress: called with (tokens done, tokens) during dynamic evaluation.

        Raises:
            ConfigError: an empty text, or dynamic settings out of range.
        """
        from charlm.errors import ConfigError

        if not text:
            raise ConfigError("nothing to score: the text is empty")
        dtype = self._autocast(precision)
        if not dynamic:
            return evaluate_text(self.network, self.run.tokenizer, text, dtype)
        if not (dynamic_lr > 0 and 0 <= dynamic_decay < 1):
            what = "{dynamic_lr} must be positive and {dynamic_decay} in [0, 1)"
            raise ConfigError(what, fields=("dynamic_lr", "dynamic_decay"))
        return evaluate_dynamic(
            self.network, self.run.tokenizer, text, dtype, dynamic_lr, dynamic_decay, progress
        )

    def precision(self, precision: Precision | str | None = None) -> str:
        """The arithmetic :meth:`evaluate` uses for ``precision``: "bf16" or "fp32"."""
        return "bf16" if self._autocast(precision) is not None else "fp32"

    def _autocast(self, precision: Precision | str | None) -> torch.dtype | None:
        chosen = Precision(precision) if precision is not None else self.run.config.train.precision
        return resolve_precision(chosen, self.device, self.run.config.train.optimizer)

    @torch.no_grad()
    def next_token_probs(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` likeliest next tokens after ``text`` (read from a start-of-text context, as
        sampling reads a prime), as (piece, probability), most likely first. A piece is the text
        the token stands for; a byte-fallback token (part of a character) shows as ``<0xE2>``.
        """
        tokenizer = self.run.tokenizer
        context = [tokenizer.newline_id, *tokenizer.encode(text)]
        self.network.eval()
        logits, _ = self.network(torch.tensor(context, device=self.device).view(-1, 1))  # (T, 1, V)
        last = logits[-1, 0].float()  # (V,)
        last[tokenizer.unk_id] = -math.inf  # no text encodes to it (byte fallback)
        probs = torch.softmax(last, dim=-1)
        top = torch.topk(probs, min(k, probs.numel()))
        return [
            (self._piece_text(i), p) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    def _piece_text(self, token_id: int) -> str:
        tokenizer = self.run.tokenizer
        if tokenizer.byte_value(token_id) is not None:
            return tokenizer.piece(token_id)
        return tokenizer.decode([token_id])
