"""Full against adaptive softmax on a large vocabulary: the same run, step for step.

    python benchmarks/softmax.py CORPUS.txt [--vocab-size 8000] [--tokenizer bpe] [--steps 400]

Trains the same model from the same seed for the same number of steps with ``--softmax full``
and ``--softmax adaptive`` (BPE with 8,000 pieces by default), through charlm's own training loop
in the precision ``auto`` picks, and prints each run's training throughput (whole loop) and
held-out bits per character, and the ratios, as a table and as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import charlm
from charlm.config import Softmax, TokenizerKind


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, nargs="+")
    parser.add_argument("--tokenizer", type=TokenizerKind, default=TokenizerKind.bpe)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for softmax in (Softmax.full, Softmax.adaptive):
            result = charlm.train(
                args.corpus, out=Path(tmp) / softmax.value, tokenizer=args.tokenizer,
                vocab_size=args.vocab_size, softmax=softmax, max_steps=args.steps, epochs=10_000,
                eval_every=args.steps, device=args.device, save_every="1000000000",
            )  # fmt: skip
            assert result.best is not None
            figures[softmax.value] = {
                "tokens_per_s": round(result.tokens / result.elapsed),
                "heldout_bpc": round(result.best.bpc, 4),
                "parameters": result.parameters,
            }
    full, adaptive = figures["full"], figures["adaptive"]
    report = {
        **figures,
        "speedup": round(adaptive["tokens_per_s"] / full["tokens_per_s"], 3),
        "bpc_relative_difference": round(adaptive["heldout_bpc"] / full["heldout_bpc"] - 1, 5),
        "tokenizer": f"{args.tokenizer.value} {args.vocab_size}",
        "steps": args.steps,
        "corpus": [str(p) for p in args.corpus],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for name, f in figures.items():
        print(
            f"{name:>8}: {f['tokens_per_s']:>7,} tokens/s, held-out bpc {f['heldout_bpc']:.4f}, "
            f"{f['parameters']:,} parameters"
        )
    print(
        f"adaptive / full: throughput {report['speedup']:.2f}x, bpc {report['bpc_relative_difference']:+.2%}"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
