"""Quality and speed of bf16 autocast training against fp32: the same run, step for step.

    python benchmarks/precision.py [CORPUS.txt ...] [--steps 1000] [--device auto] [--batch 64]

Trains the same model from the same seed for the same number of steps twice, with
``--precision fp32`` and ``--precision bf16``, through charlm's own training loop, and prints the
held-out bits per character of each (validation always scores in fp32), their relative
difference, and each run's training throughput, as a table and as one JSON object. Without a
corpus it uses the built-in one (CPython's documentation), so it runs anywhere offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

import torch

from charlm.config import ModelConfig, Precision, RunConfig, TokenizerConfig, TrainConfig
from charlm.data.prepare import builtin_corpus
from charlm.device import resolve_device
from charlm.model.scoring import evaluate_text
from charlm.runs import checkpoint
from charlm.training.loop import fit, prepare_run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, nargs="*")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--bptt", type=int, default=TrainConfig().bptt)
    parser.add_argument("--hidden", type=int, default=ModelConfig().hidden)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if not corpus:
            corpus = [Path(tmp) / "pydoc.txt"]
            corpus[0].write_text(builtin_corpus(), encoding="utf-8")
        for precision in (Precision.fp32, Precision.bf16):
            train = dataclasses.replace(
                TrainConfig(),
                max_steps=args.steps,
                epochs=10_000,
                eval_every=args.steps,
                batch_size=args.batch,
                bptt=args.bptt,
                device=args.device,
                precision=precision,
                save_seconds=None,
            )
            model = ModelConfig(hidden=args.hidden, embed=args.hidden)
            config = RunConfig(TokenizerConfig(), model, train)
            run, train_ids, val_ids = prepare_run(corpus, config, Path(tmp) / precision.value)
            result = fit(run, train_ids, val_ids)
            assert result.best is not None
            model = checkpoint.load_model(run, checkpoint.BEST, resolve_device(args.device))
            text = run.heldout_text()
            fp32_score = evaluate_text(model, run.tokenizer, text, None).bpc
            bf16_score = evaluate_text(model, run.tokenizer, text, torch.bfloat16).bpc
            figures[precision.value] = {
                "heldout_bpc": round(result.best.bpc, 4),
                "heldout_bpc_scored_fp32": round(fp32_score, 5),
                "heldout_bpc_scored_bf16": round(bf16_score, 5),
                "tokens_per_s": round(result.tokens / result.elapsed),
                "steps": result.steps,
            }
    fp32, bf16 = figures["fp32"], figures["bf16"]
    report = {
        **figures,
        "bpc_relative_difference": round(bf16["heldout_bpc"] / fp32["heldout_bpc"] - 1, 5),
        "speedup": round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 3),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine(),
        "config": {"hidden": args.hidden, "batch": args.batch, "bptt": args.bptt, "steps": args.steps},
        "corpus": [str(p) for p in args.corpus] or ["built-in (pydoc_data)"],
        "torch": torch.__version__,
    }
    for name in ("fp32", "bf16"):
        f = figures[name]
        print(f"{name}: held-out bpc {f['heldout_bpc']:.4f}, {f['tokens_per_s']:,} tokens/s (whole loop)")
    print(f"bf16 / fp32: bpc {report['bpc_relative_difference']:+.2%}, throughput {report['speedup']:.2f}x")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
