"""Held-out bits per character of the default model after a fixed wall-clock training budget.

    python benchmarks/train_budget.py CORPUS.txt [--budget 600] [--out DIR] [--threads N]

Trains charlm's default configuration (exactly what `charlm train CORPUS` would do) with
``--max-time`` set to the budget, then prints the best held-out figures, the step count and the
throughput, as a line of text and as one JSON object. The budget bounds the training loop,
validations included; tokenizer training and encoding come before it, and one final validation
runs after it (``prepare_s``: the wall time outside the budget). It runs through ``charlm.train``,
the function ``charlm train`` calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import charlm
from charlm.runs import rundir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, nargs="+")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training")
    parser.add_argument("--out", type=Path, help="keep the run here (default: a temporary directory)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        out = args.out or Path(tmp) / "run"
        result = charlm.train(args.corpus, out=out, max_time=args.budget, epochs=10_000)
        prepared = time.monotonic() - start - result.elapsed  # reading, tokenizer, encoding, last validation
        config = rundir.load_run(result.run_dir).config
    train = config.train
    assert result.best is not None
    report = {
        "corpus": [str(p) for p in args.corpus],
        "budget_s": args.budget,
        "prepare_s": round(prepared, 2),
        "train_s": round(result.elapsed, 1),
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens / result.elapsed),
        "parameters": result.parameters,
        "heldout_bpc": round(result.best.bpc, 4),
        "heldout_loss_nats": round(result.best.loss, 4),
        "heldout_ppl": round(result.best.perplexity, 4),
        "heldout_characters": result.best.characters,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "config": {
            "model": config.to_dict()["model"],
            "optimizer": train.optimizer.value,
            "lr": train.effective_lr,
            "batch_size": train.batch_size,
            "bptt": train.bptt,
        },
    }
    print(
        f"held-out bpc {report['heldout_bpc']:.4f} (loss {report['heldout_loss_nats']:.4f} nats, "
        f"ppl {report['heldout_ppl']:.3f}) after {report['train_s']}s, {result.steps} steps, "
        f"{report['tokens_per_s']:,} tokens/s, {result.parameters:,} parameters"
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
