"""The data path on a large corpus: encoding time, the cache, peak memory and loading overhead.

    python benchmarks/data.py SOURCE.txt [--size-mb 100] [--steps 100] [--val-fraction 0.002] [--processes N]

Builds a corpus of ``--size-mb`` megabytes by repeating SOURCE (in a temporary directory), then:

1. runs ``charlm train`` on it with an empty token cache (reading, tokenizer training, encoding,
   ``--steps`` training steps) and again with the cache filled, each in a new process, and
   reports their wall time and peak resident memory (the process's maxrss);
2. times, in this process, reading and batching the next BPTT window from the memory-mapped
   cache (as training does, mean) against one training step of the default model on it (median),
   and prints their ratio, and the cost of a window far from any read before (page faults).

Prints a table and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from charlm.config import ModelConfig, TokenizerConfig, TrainConfig
from charlm.data.batches import batchify, count_windows, window
from charlm.data.prepare import prepare_corpus
from charlm.model.network import RNNLM, detach_hidden
from charlm.training.loop import build_optimizer, train_step


def build_corpus(source: Path, target: Path, size: int) -> None:
    """Repeat ``source`` into ``target`` until it holds ``size`` bytes (in whole lines)."""
    text = source.read_bytes()
    with target.open("wb") as out:
        written = 0
        while written < size:
            piece = text[: size - written]
            piece = piece[: piece.rfind(b"\n") + 1] or piece
            out.write(piece)
            written += len(piece)


def run_train(
    corpus: Path, out: Path, steps: int, val: float, processes: int, env: dict[str, str]
) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``charlm train``: of its largest process, under torchrun
    when ``processes`` > 1 (wait4's maxrss covers the waited-for descendants)."""
    launch = [sys.executable, "-m", "charlm"]
    if processes > 1:
        launch = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "charlm",
        ]  # fmt: skip
    command = [
        *launch, "train", str(corpus), "--out", str(out), "--max-steps", str(steps),
        "--eval-every", str(steps), "--val-fraction", str(val), "--device", "cpu",
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"charlm train failed: {process.stderr.read().decode() if process.stderr else ''}")
    return wall, usage.ru_maxrss / 1024  # KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--processes", type=int, default=1, help="train under torchrun with N processes")
    parser.add_argument(
        "--val-fraction", type=float, default=0.002, help="kept small: validation is not measured"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        build_corpus(args.source, corpus, int(args.size_mb * 1e6))
        env = {**os.environ, "CHARLM_CACHE_DIR": str(Path(tmp) / "cache")}
        cold_s, cold_rss = run_train(
            corpus, Path(tmp) / "cold", args.steps, args.val_fraction, args.processes, env
        )
        warm_s, warm_rss = run_train(
            corpus, Path(tmp) / "warm", args.steps, args.val_fraction, args.processes, env
        )
        cache_mb = sum(f.stat().st_size for f in (Path(tmp) / "cache").rglob("*") if f.is_file()) / 1e6

        os.environ["CHARLM_CACHE_DIR"] = env["CHARLM_CACHE_DIR"]
        train = TrainConfig()
        prepared = prepare_corpus(
            [corpus], TokenizerConfig(), args.val_fraction, train.val_pieces, 2 * train.batch_size
        )
        streams = batchify(prepared.train_ids, train.batch_size)  # (B, L), memory-mapped
        model = RNNLM(ModelConfig(vocab_size=prepared.tokenizer.vocab_size))
        optimizer = build_optimizer(model, train)
        hidden = model.init_hidden(train.batch_size)
        load_times, far_times, step_times = [], [], []
        windows = count_windows(streams, train.bptt)
        for i in range(args.steps):
            start = time.perf_counter()
            x, y = window(streams, windows // 2 + i, train.bptt)  # as training reads: the next window
            load_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            window(streams, (i + 1) * windows // (args.steps + 2), train.bptt)  # a jump: pages not yet read
            far_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            _, _, hidden, _ = train_step(model, optimizer, x, y, hidden, train.effective_clip)
            hidden = detach_hidden(hidden)
            step_times.append(time.perf_counter() - start)
    load, far, step = statistics.mean(load_times), statistics.mean(far_times), statistics.median(step_times)
    report = {
        "corpus_mb": round(corpus_size_mb := args.size_mb, 1),
        "tokens": prepared.train_ids.numel() + prepared.val_ids.numel(),
        "cold_train_s": round(cold_s, 1),
        "cold_peak_rss_mb": round(cold_rss),
        "warm_train_s": round(warm_s, 1),
        "warm_peak_rss_mb": round(warm_rss),
        "cache_mb": round(cache_mb, 1),
        "processes": args.processes,
        "window_load_ms": round(load * 1e3, 4),
        "far_window_load_ms": round(far * 1e3, 4),
        "step_ms": round(step * 1e3, 2),
        "load_fraction_of_step": round(load / step, 5),
        "steps": args.steps,
        "threads": torch.get_num_threads(),
    }
    print(f"corpus {corpus_size_mb:g} MB, {report['tokens']:,} tokens, cache {cache_mb:.0f} MB on disk")
    print(f"charlm train, cold cache: {cold_s:.1f} s, peak RSS {cold_rss:.0f} MB")
    print(f"charlm train, warm cache: {warm_s:.1f} s, peak RSS {warm_rss:.0f} MB")
    print(
        f"the next window from the mapped cache {load * 1e3:.3f} ms (mean) vs one training step "
        f"{step * 1e3:.1f} ms (median): {load / step:.3%}; a far jump: {far * 1e3:.2f} ms"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
