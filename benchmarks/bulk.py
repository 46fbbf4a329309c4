"""Bulk sampling: 1,000 samples in one command against 1,000 commands, on a default-size model.

    python benchmarks/bulk.py [--samples 1000] [--length 200] [--runs 10]

Trains a run of charlm's default model (2x512 LSTM) for one step on CPython's own documentation (the
weights do not change the cost of sampling), then times, as a user would run them:

- ``charlm sample RUN --num-samples N --length L --output FILE.jsonl`` once (drawn 64 at a time);
- ``charlm sample RUN --length L`` ``--runs`` times; the cost of N such commands is N times their
  median (start-up, loading and sampling of one sample each).

Prints the wall times, tokens/s and the ratio, as text and as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import charlm
from charlm.data.prepare import builtin_corpus


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10, help="single-sample commands timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pydoc.txt"
        corpus.write_text(builtin_corpus(), encoding="utf-8")
        run = charlm.train(corpus, out=Path(tmp) / "run", max_steps=1, device="cpu").run_dir
        base = [
            sys.executable,
            "-m",
            "charlm",
            "sample",
            str(run),
            "--length",
            str(args.length),
            "--seed",
            "1",
        ]
        out = Path(tmp) / "samples.jsonl"
        bulk = timed([*base, "--num-samples", str(args.samples), "--output", str(out)])
        lines = out.read_text(encoding="utf-8").count("\n")
        one = statistics.median(timed(base) for _ in range(args.runs))
    tokens = args.samples * args.length
    report = {
        "samples": args.samples, "length": args.length, "written": lines,
        "bulk_seconds": round(bulk, 2), "bulk_tokens_per_s": round(tokens / bulk),
        "one_command_seconds_median": round(one, 3), "commands_seconds": round(one * args.samples, 1),
        "speedup": round(one * args.samples / bulk, 1),
    }  # fmt: skip
    print(
        f"{args.samples} samples of {args.length} tokens: one command {bulk:.1f}s "
        f"({tokens / bulk:,.0f} tokens/s); "
        f"{args.samples} commands ~{one * args.samples:,.0f}s ({one:.2f}s each, median of {args.runs}): "
        f"{report['speedup']}x"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
