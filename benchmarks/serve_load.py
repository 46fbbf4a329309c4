"""``charlm serve`` under load: 1, 8, 32 and 128 concurrent streaming clients, on loopback.

    python benchmarks/serve_load.py [--concurrency 1,8,32,128] [--tokens 200] [--seconds 4]
                                    [--rounds 3] [--cell mingru] [--hidden H] [--prompt "The "]

Trains a run of the default model (or ``--cell``, ``--layers``, ``--hidden``) for one step on
CPython's own documentation (the weights do not change the cost), starts ``charlm serve`` on a free
loopback port, and for each concurrency runs that many streaming ``/v1/completions`` clients at
once, each sending requests of ``--tokens`` tokens one after another until ``--seconds`` have
passed (the request under way is finished: bounded in requests and time), so streams join and leave
the batch all along. The levels are run ``--rounds`` times, interleaved, and each figure is the
median over the rounds: the aggregate tokens/s (all tokens over the wall time), the p50/p99 time to
first token and inter-token latency (gaps between a stream's chunks), and the server's resident
memory per stream (the peak RSS of its processes, its engine's included, at that level over their
peak with one stream, per extra stream). Beside each level, in every round, the server idle:
``Model.samples`` drawing that many streams in one batch in this process, again and again for
``--seconds`` as the level ran, the fair limit of a server (the same model, the same streams, no
server), and the server's tokens/s over it ("x samples"). Then the same levels without HTTP: the
server's :class:`~charlm.serve.engine.Engine` in this process, that many streams of ``--tokens`` at
once for ``--seconds``, so the table shows what the batched step itself allows (the server's
tokens/s can only come near it, not above) and what the HTTP layer costs; and the model's batched
step alone (the engine's ``Stepper``, no sampling, no HTTP), whose ratio between levels is what
this CPU's arithmetic allows. Prints a table and one JSON object.

The clients run in this process (one asyncio loop, aiohttp, its connections kept alive) on the same
2-core CPU as the server: they take a share of it, as real clients on the same machine would.
(httpx, the first choice, held a kept-alive connection's next request back until the server's
keep-alive timeout closed it, 5 s, once 128 streams ran at once: the server never saw the request
before; aiohttp does not.)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

import charlm
from charlm.config import SampleConfig
from charlm.data.prepare import builtin_corpus
from charlm.model.stepper import Stepper
from charlm.serve.engine import Engine, Request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` and its children (the server's engines run in
    processes of their own), MB."""
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += sum(rss_mb(int(child)) for child in (task / "children").read_text().split())
    except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
        pass
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_stream(
    client: aiohttp.ClientSession, url: str, model: str, prompt: str, tokens: int, seed: int
) -> tuple[float, list[float], int]:
    """(time to first token, gaps between the stream's chunks, tokens) of one streaming request. A
    chunk may carry several tokens when the server is busy; every request here runs to
    ``max_tokens`` (no stop string), which is its token count, checked by its finish reason."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "stream": True, "seed": seed}
    start = time.perf_counter()
    arrivals, finish = [], None
    async with client.post(url, json=body) as reply:
        async for line in reply.content:  # lines, b"\n" included
            if not line.startswith(b"data: {"):
                continue
            arrivals.append(time.perf_counter())
            for choice in json.loads(line[6:])["choices"]:
                finish = choice["finish_reason"] or finish
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return (arrivals[0] - start if arrivals else float("nan")), gaps, tokens if finish == "length" else 0


async def level(
    url: str, model: str, prompt: str, clients: int, tokens: int, seconds: float, pid: int
) -> dict[str, float]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:
        peak = [rss_mb(pid)]

        async def watch() -> None:
            while True:
                peak.append(rss_mb(pid))
                await asyncio.sleep(0.2)

        async def user(index: int) -> list[tuple[float, list[float], int]]:
            done = []
            while not done or time.perf_counter() - start < seconds:
                done.append(await one_stream(client, url, model, prompt, tokens, 1000 * index + len(done)))
            return done

        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
        watcher.cancel()
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    total = sum(r[2] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "failed": sum(1 for r in results if not r[2]),  # no tokens, or not to max_tokens: counted as 0
        "tokens": total,
        "seconds": round(wall, 2),
        "tokens_per_s": round(total / wall, 1),
        "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1),
        "ttft_p99_ms": round(1000 * percentile(ttft, 0.99), 1),
        "itl_p50_ms": round(1000 * percentile(gaps, 0.5), 2),
        "itl_p99_ms": round(1000 * percentile(gaps, 0.99), 2),
        "rss_peak_mb": round(max(peak), 1),
    }


def engine_alone(run: Path, prompt: str, clients: int, tokens: int, seconds: float) -> float:
    """Tokens/s of the server's engine with no HTTP: ``clients`` streams of ``tokens`` at once, each
    replaced as it finishes, for ``seconds`` (the streams under way are finished); the prompt and
    temperature (1.0) of the HTTP levels, and, as there, only streams that ran to ``tokens`` count."""
    model = charlm.load(run, device="cpu")
    engine = Engine(model.network, model.run.tokenizer, 2 * clients)  # a finished row leaves after it says so
    finished = threading.Semaphore(0)
    complete = []

    def end(piece: str, finish: str | None) -> None:
        if finish is not None:
            complete.append(finish == "length")
            finished.release()

    def request(seed: int) -> Request:
        return Request(prompt, SampleConfig(length=tokens, temperature=1.0, seed=seed), end)

    engine.start()
    try:
        engine.submit([request(i) for i in range(clients)])  # warm-up round
        for _ in range(clients):
            finished.acquire()
        complete.clear()
        start, sent = time.perf_counter(), 0
        engine.submit([request(i) for i in range(clients)])
        while time.perf_counter() - start < seconds:
            finished.acquire()
            sent += 1
            engine.submit([request(clients + sent)])
        for _ in range(clients):
            finished.acquire()
        return sum(complete) * tokens / (time.perf_counter() - start)
    finally:
        engine.stop()


def sampler_alone(model: charlm.Model, prompt: str, clients: int, tokens: int, seconds: float) -> float:
    """Tokens/s of ``Model.samples``: ``clients`` samples of ``tokens`` drawn in one batch, in this
    process, with the prompt and temperature of the HTTP levels, drawn again until ``seconds`` have
    passed (the draw under way is finished), as a level runs for ``seconds``: one draw of 32 streams
    takes a quarter of a second, and one draw's figure moved by a factor 1.7 between levels of one
    run. The same model drawing the same streams with no server: the fair limit of the server's
    tokens/s at that level."""
    start, made, draw = time.perf_counter(), 0, 0
    while not made or time.perf_counter() - start < seconds:
        made += sum(s.tokens for s in model.samples(clients, prime=prompt, length=tokens, temperature=1.0,
                                                    seed=clients + draw, batch=clients))  # fmt: skip
        draw += 1
    return made / (time.perf_counter() - start)


def step_alone(run: Path, rows: int, calls: int = 300) -> float:
    """Tokens/s of the model's batched recurrent step alone for ``rows`` streams: the engine's
    :class:`~charlm.model.stepper.Stepper`, no sampling, no Python per row, no HTTP; the median of
    ``calls`` steps. Its ratio between levels is what the arithmetic itself allows this CPU."""
    model = charlm.load(run, device="cpu")
    stepper = Stepper(model.network)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.run.tokenizer.vocab_size, rows)  # (B,)
    state = stepper.zero_state(rows)
    times = []
    for i in range(calls + 20):  # the first 20 warm up
        start = time.perf_counter()
        _, state = stepper.step(tokens, state)
        if i >= 20:
            times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds of one level."""
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]} | {
        "clients": rounds[0]["clients"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per request")
    parser.add_argument("--seconds", type=float, default=4.0, help="how long each level sends requests")
    parser.add_argument("--rounds", type=int, default=3, help="times each level is run (medians)")
    parser.add_argument("--cell", default="mingru", help="the run's cell (default: charlm's default)")
    parser.add_argument("--layers", type=int, help="default: the cell's (see charlm train --help)")
    parser.add_argument("--hidden", type=int, help="default: the cell's")
    parser.add_argument("--prompt", default="The ", help="every request's prompt")
    args = parser.parse_args()
    levels = sorted(int(c) for c in args.concurrency.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pydoc.txt"
        corpus.write_text(builtin_corpus(), encoding="utf-8")
        shape = {k: v for k, v in (("layers", args.layers), ("hidden", args.hidden), ("embed", args.hidden))
                 if v is not None}  # fmt: skip
        run = charlm.train(corpus, out=Path(tmp) / "run", max_steps=1, cell=args.cell, device="cpu",
                           **shape).run_dir  # fmt: skip
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "charlm", "serve", str(run), "--port", str(port), "--device", "cpu",
             "--max-streams", str(max(levels))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            for _ in range(300):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            url = f"http://127.0.0.1:{port}/v1/completions"
            asyncio.run(level(url, run.name, args.prompt, 2, 20, 0.5, server.pid))  # warm-up
            idle = rss_mb(server.pid)
            rounds: dict[int, list[dict[str, float]]] = {c: [] for c in levels}
            sampler = charlm.load(run, device="cpu")
            sampler_alone(sampler, args.prompt, 2, 20, 0)  # warm-up
            for _ in range(args.rounds):  # the sampler's figure beside each level's, the server idle
                for c in levels:
                    figures = level(url, run.name, args.prompt, c, args.tokens, args.seconds, server.pid)
                    rounds[c].append(asyncio.run(figures))
                    alone = sampler_alone(sampler, args.prompt, c, args.tokens, args.seconds)
                    rounds[c][-1]["sampler_tokens_per_s"] = round(alone, 1)
                    rounds[c][-1]["vs_sampler"] = round(rounds[c][-1]["tokens_per_s"] / alone, 3)
            results = [median_of(rounds[c]) for c in levels]
        finally:
            server.terminate()
            server.wait(timeout=30)
        for r in results:  # one process at a time: the server has ended
            alone = [engine_alone(run, args.prompt, r["clients"], args.tokens, args.seconds)
                     for _ in range(args.rounds)]  # fmt: skip
            r["engine_tokens_per_s"] = round(statistics.median(alone), 1)
            steps = [step_alone(run, r["clients"]) for _ in range(args.rounds)]
            r["step_tokens_per_s"] = round(statistics.median(steps), 1)
    one = results[0]["tokens_per_s"]
    for r in results:
        r["vs_one_stream"] = round(r["tokens_per_s"] / one, 2)
        r["engine_vs_one_stream"] = round(r["engine_tokens_per_s"] / results[0]["engine_tokens_per_s"], 2)
        r["step_vs_one_stream"] = round(r["step_tokens_per_s"] / results[0]["step_tokens_per_s"], 2)
        # what one more stream costs: the peak RSS over the one-stream level's, per extra stream
        extra = r["clients"] - results[0]["clients"]
        grown = r["rss_peak_mb"] - results[0]["rss_peak_mb"]
        r["rss_per_stream_kb"] = round(1024 * grown / extra, 1) if extra else 0
    print(f"{run.name}: {args.cell}, {args.tokens} tokens per request, medians of {args.rounds} rounds of "
          f"{args.seconds:g} s, server idle RSS {idle:.0f} MB")  # fmt: skip
    columns = ("clients", "tokens/s", "x one", "TTFT p50 ms", "p99", "ITL p50 ms", "p99", "KB/stream",
               "samples()", "x samples", "no HTTP", "x one", "step alone", "x one")  # fmt: skip
    print("  ".join(f"{c:>11}" for c in columns))
    for r in results:
        row = (r["clients"], f"{r['tokens_per_s']:,.0f}", f"{r['vs_one_stream']:.2f}", r["ttft_p50_ms"],
               r["ttft_p99_ms"], r["itl_p50_ms"], r["itl_p99_ms"], r["rss_per_stream_kb"],
               f"{r['sampler_tokens_per_s']:,.0f}", f"{r['vs_sampler']:.2f}",
               f"{r['engine_tokens_per_s']:,.0f}", f"{r['engine_vs_one_stream']:.2f}",
               f"{r['step_tokens_per_s']:,.0f}", f"{r['step_vs_one_stream']:.2f}")  # fmt: skip
        print("  ".join(f"{v!s:>11}" for v in row))
    for r in results:
        if r["failed"]:
            print(f"warning: {r['failed']:g} requests at {r['clients']} clients did not run to max_tokens")
    summary = {"hidden": args.hidden, "tokens": args.tokens, "seconds": args.seconds, "rounds": args.rounds,
               "idle_rss_mb": round(idle, 1), "levels": results, "all_rounds": rounds}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
