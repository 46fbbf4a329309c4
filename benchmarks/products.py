"""The sampler's step at B rows with every product prepacked through oneDNN, against the products
as :func:`charlm.model.stepper.prepacks` picks them (NumPy's for weights under 4 MB on a CPU without
AVX-512), for the default scan model and an LSTM of its size.

    python benchmarks/products.py [--rows 2,8,32,128] [--rounds 15]

The two steppers of one model take turns, a round of 40 steps each, so that the machine's drift
falls on both alike; prints the median microseconds a step of each and their ratio, then one JSON
object. On a CPU with AVX-512 the rule prepacks everything, and the two columns time the same
products.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from charlm.config import Cell, ModelConfig
from charlm.model import stepper
from charlm.model.network import RNNLM, count_parameters


def step_us(step: stepper.Stepper, rows: int, state: list, steps: int = 40) -> tuple[float, list]:
    """Microseconds a step of ``rows`` rows over ``steps`` steps, and the state reached."""
    tokens = np.arange(rows) % 300
    start = time.perf_counter()
    for _ in range(steps):
        _, state = step.step(tokens, state)
    return (time.perf_counter() - start) / steps * 1e6, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2,8,32,128")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "minGRU 3x192": RNNLM(ModelConfig(vocab_size=324)).eval(),
        "LSTM 2x282": RNNLM(
            ModelConfig(vocab_size=324, cell=Cell.lstm, hidden=282, embed=282, dropout=0.0)
        ).eval(),
    }
    rule = stepper.prepacks
    results = []
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"{'model':<24} {'rows':>5} {'prepacked us':>13} {'rule us':>9} {'prepacked / rule':>17}")
    for name, model in models.items():
        stepper.prepacks = lambda weight: True  # every product through oneDNN
        packed = stepper.Stepper(model)
        stepper.prepacks = rule
        picked = stepper.Stepper(model)
        for rows in (int(r) for r in args.rows.split(",")):
            times: dict[str, list[float]] = {"packed": [], "rule": []}
            states = {"packed": packed.zero_state(rows), "rule": picked.zero_state(rows)}
            for _ in range(args.rounds):
                for key, step in (("packed", packed), ("rule", picked)):
                    _, states[key] = step_us(step, rows, states[key], steps=5)  # warm
                    us, states[key] = step_us(step, rows, states[key])
                    times[key].append(us)
            a, b = statistics.median(times["packed"]), statistics.median(times["rule"])
            label = f"{name} ({count_parameters(model) / 1e6:.2f}M)"
            print(f"{label:<24} {rows:>5} {a:>13,.0f} {b:>9,.0f} {a / b:>17.2f}")
            results.append({"model": name, "rows": rows, "prepacked_us": round(a, 1), "rule_us": round(b, 1)})
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "results": results}))


if __name__ == "__main__":
    main()
