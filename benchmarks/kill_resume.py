"""Kill a training run with SIGKILL many times at random moments, resume it each time, and check
that it ends bit-identical to a run that was never stopped.

    python benchmarks/kill_resume.py [CORPUS.txt] [--kills 12] [--steps 600] [--seed 0]

Both runs use one thread (the same arithmetic in every process) and save every two steps, so
many kills land while a checkpoint is being written; the script counts those (a temporary save
directory or a moved-aside old checkpoint left behind). Prints one line per kill, a summary line
and a JSON object. Exit status 0 only if the final weights and the metrics log match exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

MODEL = ["--hidden", "128", "--batch-size", "16", "--bptt", "32", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(*args: str | Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "charlm", "train", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)


def saved_step(run: Path) -> int:
    try:
        return json.loads((run / "latest" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def comparable_metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_sec", "elapsed")}
        for line in lines
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("corpus", type=Path, nargs="?", help="default: CPython's docs (built in)")
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--max-delay", type=float, default=6.0, help="longest a process lives (s)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="charlm-kill-"))
    corpus = args.corpus
    if corpus is None:
        from charlm.data.prepare import builtin_corpus

        corpus = work / "corpus.txt"
        corpus.write_text(builtin_corpus()[:300_000], encoding="utf-8")
    options = ["--max-steps", str(args.steps), "--eval-every", "50", "--save-every", "2", *MODEL]

    started = time.monotonic()
    reference = train(corpus, "--out", work / "reference", *options)
    _, err = reference.communicate()
    if reference.returncode != 0:
        sys.exit(f"reference run failed: {err.decode()[-2000:]}")
    duration = time.monotonic() - started
    print(f"reference run: {args.steps} steps in {duration:.1f}s (process start included)")

    run = work / "killed"
    proc, kills, mid_save, log = train(corpus, "--out", run, *options), 0, 0, []
    while kills < args.kills:
        # at random, from start-up (about 2-3 s of imports) to a second or two of training
        delay = rng.uniform(0.3, args.max_delay)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            leftovers = sorted(p.name for p in run.glob(".*") if p.name != ".lock") if run.exists() else []
            mid_save += bool(leftovers)
            step = saved_step(run)
            log.append(
                {"kill": kills, "after_s": round(delay, 2), "checkpoint_step": step, "left": leftovers}
            )
            print(f"kill {kills:2d} after {delay:5.2f}s: latest checkpoint at step {step}, left {leftovers}")
            # killed before the run existed (no run.json yet): start it again, as a user would
            proc = (
                train("--resume", "--out", run)
                if (run / "run.json").exists()
                else train(corpus, "--out", run, *options)
            )
            continue
        if proc.returncode != 0:
            sys.exit(f"run failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        print(f"the run finished after {kills} kills; use more --steps or a shorter --max-delay")
        break
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"final resume failed: {err.decode()[-2000:]}")

    a = load_file(work / "reference" / "latest" / "model.safetensors")
    b = load_file(run / "latest" / "model.safetensors")
    identical = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    same_log = comparable_metrics(work / "reference") == comparable_metrics(run)
    print(
        f"{kills} SIGKILLs ({mid_save} during a save), resumed each time: weights "
        f"{'bit-identical' if identical else 'DIFFERENT'} to the uninterrupted run; metrics log "
        f"{'identical' if same_log else 'DIFFERENT'}"
    )
    print(json.dumps({"kills": kills, "mid_save": mid_save, "identical_weights": identical,
                      "identical_metrics": same_log, "steps": args.steps, "log": log}))  # fmt: skip
    return 0 if identical and same_log else 1


if __name__ == "__main__":
    sys.exit(main())
