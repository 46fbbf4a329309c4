"""The scan blocks' MLP nonlinearity: GELU (tanh form, runs written before) against the squared ReLU
(the default), in time: the default model's training step and one stream's sampling step.

    python benchmarks/mlp.py [--repeats 12]

Both models (3x192 minGRU, a 65-token vocabulary) live in one process and are timed in turn, so
the machine's drift touches both alike. The training step is forward, backward and AdamW on a batch
of 32 x 64 tokens in float32; the sampling step is :class:`~charlm.model.stepper.Stepper` on one
stream (the CPU's fast path of ``charlm sample``). Prints the medians. What the nonlinearity does
to the model's quality is measured with ``benchmarks/generalise.py`` (docs/scan-cells.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from charlm.config import Activation, ModelConfig
from charlm.model.network import RNNLM
from charlm.model.stepper import Stepper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=12, help="training steps of each (the first 2 not counted)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {m: RNNLM(ModelConfig(vocab_size=65, mlp=m)) for m in Activation}
    optimizers = {m: torch.optim.AdamW(model.parameters(), lr=1e-3) for m, model in models.items()}
    tokens = torch.randint(0, 65, (65, 32))  # (T + 1, B)
    train: dict[Activation, list[float]] = {m: [] for m in models}
    for _ in range(args.repeats):
        for m, model in models.items():
            start = time.perf_counter()
            loss, _ = model(tokens[:-1], None, tokens[1:])
            loss.backward()
            optimizers[m].step()
            optimizers[m].zero_grad()
            train[m].append(time.perf_counter() - start)
    steppers = {m: Stepper(model.eval()) for m, model in models.items()}
    sample: dict[Activation, list[float]] = {m: [] for m in models}
    for _ in range(5):
        for m, stepper in steppers.items():
            state, token = stepper.zero_state(1), np.array([3])
            start = time.perf_counter()
            for _ in range(500):
                _, state = stepper.step(token, state)
            sample[m].append((time.perf_counter() - start) / 500)
    for m in models:
        step_ms, one_us = statistics.median(train[m][2:]) * 1e3, statistics.median(sample[m]) * 1e6
        print(f"{m.value:6} training step {step_ms:6.1f} ms   one stream's step {one_us:5.0f} us")


if __name__ == "__main__":
    main()
