"""Dynamic evaluation's learning rate and decay, tried on a run's own held-out text.

    python benchmarks/dynamic.py RUN [--lrs 0.05,0.1,0.2,0.5,1] [--decays 0,0.01] [--chars 20000]

Scores the first ``--chars`` characters of the run's held-out split (the tail of its training
corpus, never trained on; not the text the figures are reported on) statically and under dynamic
evaluation at each learning rate and decay, and prints the bpc of each with its gain and time.
charlm's defaults (``charlm.model.scoring.DYNAMIC_LR``, ``DYNAMIC_DECAY``) were chosen with it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from charlm.device import resolve_precision
from charlm.model.scoring import evaluate_dynamic, evaluate_text
from charlm.runs.checkpoint import load_model
from charlm.runs.rundir import load_run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--lrs", default="0.05,0.1,0.2,0.5,1")
    parser.add_argument("--decays", default="0,0.01")
    parser.add_argument("--chars", type=int, default=20_000)
    args = parser.parse_args()

    run = load_run(args.run)
    model = load_model(run, "best")
    text = run.heldout_text()[: args.chars]
    dtype = resolve_precision(run.config.train.precision, model.device, run.config.train.optimizer)
    static = evaluate_text(model, run.tokenizer, text, dtype).bpc
    print(f"static: {static:.4f} bpc on {len(text):,} held-out characters")
    rows = []
    for decay in map(float, args.decays.split(",")):
        for lr in map(float, args.lrs.split(",")):
            start = time.monotonic()
            bpc = evaluate_dynamic(model, run.tokenizer, text, dtype, lr, decay).bpc
            rows.append({"lr": lr, "decay": decay, "bpc": bpc, "gain": bpc / static - 1,
                         "seconds": round(time.monotonic() - start, 1)})  # fmt: skip
            print(f"lr {lr:<5g} decay {decay:<5g} {bpc:.4f} bpc ({bpc / static - 1:+.2%}) "
                  f"{rows[-1]['seconds']}s")  # fmt: skip
    print(json.dumps({"run": str(args.run), "static": static, "dynamic": rows}))


if __name__ == "__main__":
    main()
