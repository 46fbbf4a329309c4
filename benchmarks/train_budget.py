"""Held-out bits per character of the default model after a fixed wall-clock training budget.

    python benchmarks/train_budget.py CORPUS.txt [--budget 600] [--out DIR] [--threads N]

Trains charlm's default configuration (exactly what `charlm train CORPUS` would do) with
``--max-time`` set to the budget, then prints the best held-out figures, the step count and the
throughput, as a line of text and as one JSON object. The budget bounds the training loop,
validations included; tokenizer training and encoding come before it (their time is printed too),
and one final validation runs after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from charlm.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from charlm.training.loop import fit, prepare_run


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

    train = dataclasses.replace(TrainConfig(), max_time=args.budget, epochs=10_000)
    config = RunConfig(TokenizerConfig(), ModelConfig(), train)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "run"
        start = time.monotonic()
        run, train_ids, val_ids = prepare_run(args.corpus, config, out)
        prepared = time.monotonic() - start
        result = fit(run, train_ids, val_ids)
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
            "model": run.config.to_dict()["model"],
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
