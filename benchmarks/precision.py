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
import json
import platform
import tempfile
from pathlib import Path

import torch

import charlm
from charlm.config import ModelConfig, Precision, TrainConfig
from charlm.data.prepare import builtin_corpus


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, nargs="*")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--bptt", type=int, default=TrainConfig().bptt)
    parser.add_argument("--cell", default=ModelConfig().cell.value)
    parser.add_argument("--hidden", type=int, help="default: the cell's")
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
            result = charlm.train(
                corpus, out=Path(tmp) / precision.value, max_steps=args.steps, epochs=10_000,
                eval_every=args.steps, batch_size=args.batch, bptt=args.bptt, device=args.device,
                precision=precision, save_every="1000000000", cell=args.cell,
                **({"hidden": args.hidden, "embed": args.hidden} if args.hidden else {}),
            )  # fmt: skip
            assert result.best is not None
            model = charlm.load(result.run_dir, device=args.device)
            text = model.run.heldout_text()
            fp32_score = model.evaluate(text, Precision.fp32).bpc
            bf16_score = model.evaluate(text, Precision.bf16).bpc
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
