"""One prepacked product of the server engine's step (a default scan block's 192 -> 768), timed
in a thread of its own on one thread of arithmetic and on the process's, with the main thread
doing no arithmetic (as ``charlm serve`` runs it) or with an OpenMP team of its own (as the main
thread that loaded the model had before).

    python benchmarks/engine_threads.py [--rows 1,4,8,32,128] [--main-team]

GNU OpenMP spins only briefly for work when its teams hold more threads than the CPU has cores,
so a second team (the main thread's) slows every parallel product of the engine's. Prints the
median microseconds of 2,000 products per number of rows, one thread against the process's count,
each measured twice (the lower taken).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
import torch

from charlm.model.stepper import Linear


def product_us(linear: Linear, rows: int, threads: int, calls: int = 2000) -> float:
    """Median microseconds of ``linear`` on ``rows`` rows on ``threads`` threads (this thread's)."""
    torch.set_num_threads(threads)
    x = np.random.default_rng(0).standard_normal((rows, linear.weight_t.shape[0]), dtype=np.float32)
    times = []
    for i in range(calls + 200):  # the first 200 warm up
        start = time.perf_counter()
        linear(x)
        if i >= 200:
            times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,4,8,32,128")
    parser.add_argument("--main-team", action="store_true", help="give the main thread an OpenMP team first")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    if not args.main_team:
        torch.set_num_threads(1)  # as charlm serve's main thread, before any arithmetic
    rng = np.random.default_rng(0)
    # prepacked whatever the CPU (on one without AVX-512 the stepper takes NumPy's for this size)
    linear = Linear(rng.standard_normal((768, 192), dtype=np.float32), np.zeros(768, np.float32), packed=True)
    if args.main_team:  # the main thread's own products, as loading and warming a model make
        product_us(linear, 32, threads, calls=200)

    def measure() -> None:
        print(f"main thread {'with' if args.main_team else 'without'} a team: "
              f"microseconds per product, one thread / {threads}")  # fmt: skip
        for rows in (int(r) for r in args.rows.split(",")):
            one = min(product_us(linear, rows, 1) for _ in range(2))
            many = min(product_us(linear, rows, threads) for _ in range(2))
            print(f"{rows:>5} rows  {one:8.1f}  {many:8.1f}")

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()


if __name__ == "__main__":
    main()
