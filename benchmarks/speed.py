"""Tokens per second where users wait, charlm against a plain PyTorch reference, in one run.

    python benchmarks/speed.py [--seconds 10] [--threads N] [--hidden 512] [--device auto]

The reference model is issue 4's: a 2-layer LSTM, 512 hidden units, a character vocabulary of 65
symbols (charlm's char tokenizer adds 256 byte-fallback pieces: 324 outputs, on both sides), batch
64, BPTT 128, random tokens (speed does not depend on the text). Measured, each for about
``--seconds`` after a warm-up, the median of three timed repeats:

- training: the reference is a textbook fp32 loop (Embedding -> nn.LSTM -> Linear, Adam, global
  norm clipping); charlm is :func:`charlm.training.loop.train_step` on
  :class:`charlm.model.network.RNNLM` in the
  precision ``--precision auto`` picks on this device (bf16 autocast on a GPU with bf16 or a CPU with
  AVX-512 bf16 / AMX, else fp32; when it picks bf16, charlm's fp32 step is measured too);
- evaluation: :func:`charlm.model.scoring.evaluate` (no autograd, 32 long streams, in the same precision
  as charlm's training, as ``charlm eval`` scores a run), against charlm's own training throughput;
- sampling: the reference calls ``nn.LSTM`` once per token and samples from the softmax (what most
  tools do); charlm is :func:`charlm.generation.sampling.generate`, the whole path of ``charlm sample``
  (prime, set-up, picking, streaming decoding), for one sample of 1000 tokens and for 32 samples
  of 200 drawn at once (``--num-samples 32``), and both again with every sampling control on
  (stop string, banned strings, min-p, repetition, presence and frequency penalties);
- start-up: the median wall time of ``charlm --help`` in a new process (five runs);
- the scan cell (``--cell mingru``, the default, at its default shape) beside an LSTM of about
  the same parameter count: training, evaluation and sampling (1 and 32 streams) tokens/s, in the
  same precision, batch and BPTT as above (sampling: the two models in five interleaved rounds of
  ``2 * --seconds / 5`` each, the median of each, so that their ratio is measured at the same
  times); and the scan cell's training step through ``torch.compile`` (``charlm train
  --compile``), with the seconds its compilation took.

Prints a table of absolute figures and ratios, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from charlm.config import Cell, ModelConfig, OptimizerKind, Precision, SampleConfig, TokenizerConfig
from charlm.data.tokenizer import train_tokenizer
from charlm.device import resolve_device, resolve_precision
from charlm.generation.sampling import generate, make_generator
from charlm.model.network import RNNLM, count_parameters, detach_hidden
from charlm.model.scoring import evaluate
from charlm.training.loop import train_step


class Reference(nn.Module):
    """The plain model everyone writes first."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, 2)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, hidden: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        out, hidden = self.rnn(self.embedding(x), hidden)  # (T, B, H)
        return self.decoder(out), hidden  # (T, B, V)


def rate(work: Callable[[], int], seconds: float, device: torch.device, repeats: int = 3,
         warm_up: bool = True) -> float:  # fmt: skip
    """Median tokens/s of ``repeats`` repeats of ``work`` (returns tokens) for ``seconds`` /
    ``repeats`` each, after one call of it to warm up."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if warm_up:
        work()
    rates = []
    for _ in range(repeats):
        sync()
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / repeats:
            tokens += work()
        sync()
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def interleaved(works: dict[str, Callable[[], int]], seconds: float, device: torch.device,
                rounds: int = 5) -> dict[str, float]:  # fmt: skip
    """Median tokens/s of each of ``works`` over ``rounds`` rounds that take them in turn, each for
    ``seconds`` / ``rounds``: on a machine whose speed drifts, their ratio is measured at the same
    times, where :func:`rate` one after the other would measure each at its own."""
    for work in works.values():
        work()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            rates[name].append(rate(work, seconds / rounds, device, repeats=1, warm_up=False))
    return {name: statistics.median(values) for name, values in rates.items()}


def help_seconds(repeats: int = 5) -> float:
    """Median wall time of ``charlm --help`` in a new process."""
    command = [shutil.which("charlm") or sys.executable, "--help"]
    if command[0] == sys.executable:
        command.insert(1, "-m")
        command.insert(2, "charlm")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Every sampling control of `charlm sample` on at once (issue 14): the stop string is one a model
# of random weights will not write in 1000 tokens, so every sample runs its full length.
CONTROLS = {
    "stop": ("ZZZZZZZZZZZZ",), "ban": ("qx", "the end"), "min_p": 0.05, "repetition_penalty": 1.2,
    "presence_penalty": 0.3, "frequency_penalty": 0.2, "penalty_window": 64,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bptt", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    autocast = resolve_precision(Precision.auto, device, OptimizerKind.adam)  # it times Adam
    torch.manual_seed(0)
    # charlm's real char tokenizer over 65 characters (as tinyshakespeare's): the vocabulary is
    # those plus the 256 byte-fallback pieces and the specials; both sides use its size.
    alphabet = "\n !$&',-.:;?3ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    tokenizer = train_tokenizer("".join(random.Random(0).choices(alphabet, k=20_000)), TokenizerConfig())
    V, H, B, T, S = tokenizer.vocab_size, args.hidden, args.batch, args.bptt, args.seconds
    x = torch.randint(0, V, (T, B), device=device)
    y = torch.randint(0, V, (T, B), device=device)

    ref = Reference(V, H).to(device)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    ref_state: dict = {"h": None}

    def ref_train() -> int:
        logits, hidden = ref(x, ref_state["h"])
        ref_state["h"] = tuple(h.detach() for h in hidden)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        ref_opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        return x.numel()

    lstm = ModelConfig(vocab_size=V, cell=Cell.lstm, hidden=H, embed=H, layers=2, dropout=0.0)
    model = RNNLM(lstm).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ours: dict = {"h": model.init_hidden(B)}

    def our_train(precision: torch.dtype | None) -> Callable[[], int]:
        def work() -> int:
            _, _, hidden, _ = train_step(model, opt, x, y, ours["h"], 1.0, precision)
            ours["h"] = detach_hidden(hidden)
            return x.numel()

        return work

    eval_ids = torch.randint(0, V, (200_000,))

    def our_eval() -> int:
        evaluate(
            model, eval_ids, eval_ids.numel(), 0, autocast=autocast
        )  # as charlm eval: the run's precision
        return eval_ids.numel()

    def ref_sample(streams: int) -> Callable[[], int]:
        def work() -> int:
            token, hidden, n = torch.zeros((1, streams), dtype=torch.long, device=device), None, 200
            with torch.no_grad():  # as sampling scripts usually are
                for _ in range(n):
                    logits, hidden = ref(token, hidden)  # (1, B, V): one nn.LSTM call per token
                    token = torch.multinomial(torch.softmax(logits[0] / 0.8, -1), 1).view(1, streams)
            return n * streams

        return work

    model.eval()

    def our_sample(streams: int, length: int, **controls: object) -> Callable[[], int]:
        def work() -> int:  # the whole `charlm sample` path: prime, set-up, picking, decoding
            config = SampleConfig(length=length, temperature=0.8, num_samples=streams, **controls)  # type: ignore[arg-type]
            for _ in generate(model, tokenizer, config, make_generator(0)):
                pass  # the pieces stream out as they are generated
            return length * streams

        return work

    model.train()
    figures = {
        "train_reference": rate(ref_train, S, device),
        "train_charlm": rate(our_train(autocast), S, device),
    }
    if autocast is not None:
        figures["train_charlm_fp32"] = rate(our_train(None), S, device)
    figures["eval_charlm"] = rate(our_eval, S, device)
    figures["sample1_reference"] = rate(ref_sample(1), S, device)
    figures["sample1_charlm"] = rate(our_sample(1, 1000), S, device)
    figures["sample32_reference"] = rate(ref_sample(32), S, device)
    figures["sample32_charlm"] = rate(our_sample(32, 200), S, device)
    figures["sample1_charlm_controls"] = rate(our_sample(1, 1000, **CONTROLS), S, device)
    figures["sample32_charlm_controls"] = rate(our_sample(32, 200, **CONTROLS), S, device)
    cells = compare_cells(V, tokenizer, x, y, eval_ids, autocast, S, device)
    startup = help_seconds()
    ratios = {
        "train (charlm / reference)": figures["train_charlm"] / figures["train_reference"],
        "eval (charlm eval / charlm train)": figures["eval_charlm"] / figures["train_charlm"],
        "sample, 1 stream (charlm / reference)": figures["sample1_charlm"] / figures["sample1_reference"],
        "sample, 32 streams (charlm / reference)": figures["sample32_charlm"] / figures["sample32_reference"],
        "sample, 1 stream, all controls on / off": figures["sample1_charlm_controls"]
        / figures["sample1_charlm"],
        "sample, 32 streams, all controls on / off": figures["sample32_charlm_controls"]
        / figures["sample32_charlm"],
    }
    threads = f"{torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    precision = "bf16" if autocast is not None else "fp32"
    print(f"2x{H} LSTM, vocab {V}, batch {B}, BPTT {T}, {where}, charlm in {precision}, {torch.__version__}")
    print(f"{'measurement':<40} {'tokens/s':>12}")
    for name, value in figures.items():
        print(f"{name:<40} {value:>12,.0f}")
    print(f"{'ratio':<40} {'x':>12}")
    for name, value in ratios.items():
        print(f"{name:<40} {value:>12.2f}")
    print(f"{'charlm --help (s)':<40} {startup:>12.3f}")
    print(f"\n{'cell (parameters)':<28} {'train':>9} {'eval':>9} {'sample 1':>9} {'sample 32':>9}")
    for name, row in cells.items():
        print(f"{name:<28} " + " ".join(f"{row[k]:>9,.0f}" for k in ("train", "eval", "sample1", "sample32")))
        if "train_compiled" in row:
            compiled, seconds = row["train_compiled"], row["compile_s"]
            print(f"{'  the same, --compile':<28} {compiled:>9,.0f} (after {seconds:.0f} s compiling)")
    print(
        json.dumps(
            {
                "tokens_per_s": {k: round(v, 1) for k, v in figures.items()},
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
                "config": {"hidden": H, "vocab": V, "batch": B, "bptt": T, "layers": 2},
                "help_seconds": round(startup, 3),
                "cells": {name: {k: round(v, 1) for k, v in row.items()} for name, row in cells.items()},
                "device": where,
                "precision": precision,
                "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.machine(),
            }
        )
    )


def compare_cells(
    V: int,
    tokenizer: object,
    x: torch.Tensor,
    y: torch.Tensor,
    eval_ids: torch.Tensor,
    autocast: torch.dtype | None,
    seconds: float,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Training, evaluation and sampling tokens/s of the default scan cell and of an LSTM of
    about its parameter count (2 layers, the width that matches), each through charlm's own path."""
    torch.manual_seed(0)
    scan = RNNLM(ModelConfig(vocab_size=V)).to(device)
    target = count_parameters(scan)
    # a 2-layer LSTM of width w has about 16 w^2 + 2 V w parameters (embedding and decoder)
    width = int((-(2 * V) + ((2 * V) ** 2 + 4 * 16 * target) ** 0.5) / 32)
    lstm = RNNLM(ModelConfig(vocab_size=V, cell=Cell.lstm, hidden=width, embed=width, dropout=0.0)).to(device)
    rows: dict[str, dict[str, float]] = {}
    models: dict[str, RNNLM] = {}
    for model in (scan, lstm):
        c = model.config
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        state = {"h": model.init_hidden(x.size(1))}

        def train() -> int:
            _, _, hidden, _ = train_step(model, opt, x, y, state["h"], 1.0, autocast)  # noqa: B023
            state["h"] = detach_hidden(hidden)  # noqa: B023
            return x.numel()

        def score() -> int:
            evaluate(model, eval_ids, eval_ids.numel(), 0, autocast=autocast)  # noqa: B023
            return eval_ids.numel()

        model.train()
        row = {"train": rate(train, seconds, device)}
        if c.cell.scan:  # `charlm train --compile`: the same step through torch.compile
            compiled = torch.compile(model, dynamic=False)

            def train_compiled() -> int:
                _, _, hidden, _ = train_step(compiled, opt, x, y, state["h"], 1.0, autocast)  # noqa: B023
                state["h"] = detach_hidden(hidden)  # noqa: B023
                return x.numel()

            start = time.perf_counter()
            train_compiled()  # the compilation (seconds once torch's cache holds it)
            row["compile_s"] = time.perf_counter() - start
            row["train_compiled"] = rate(train_compiled, seconds, device)
        model.eval()
        row["eval"] = rate(score, seconds, device)
        name = f"{c.cell.value} {c.layers}x{c.hidden} ({count_parameters(model) / 1e6:.2f}M)"
        rows[name], models[name] = row, model
    # sampling: the two models in turns, so that their ratio is measured at the same times (one
    # stream's step is short enough for the machine's drift to move it by a fifth between runs)
    for key, streams, length in (("sample1", 1, 1000), ("sample32", 32, 200)):
        works = {name: sampler(model, tokenizer, streams, length) for name, model in models.items()}
        for name, figure in interleaved(works, 2 * seconds, device).items():
            rows[name][key] = figure
    return rows


def sampler(model: RNNLM, tokenizer: object, streams: int, length: int) -> Callable[[], int]:
    """``charlm sample``'s whole path for ``model``: ``streams`` samples of ``length`` tokens."""

    def work() -> int:
        config = SampleConfig(length=length, temperature=0.8, num_samples=streams)
        for _ in generate(model, tokenizer, config, make_generator(0)):  # type: ignore[arg-type]
            pass
        return length * streams

    return work


if __name__ == "__main__":
    main()
