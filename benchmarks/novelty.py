"""``charlm novelty`` against a 100 MB training corpus: seconds per sample and peak memory.

    python benchmarks/novelty.py [--mb 100] [--chars 2000] [--repeats 3]

Builds a corpus of ``--mb`` MB from this Python's standard library sources (repeated as needed),
a tiny run, and a sample of ``--chars`` characters (half a passage of the corpus, half text of the
model), then runs ``charlm novelty RUN SAMPLE --corpus CORPUS --json`` as a user would, ``--repeats``
times: the median wall time and the peak resident memory of the command (its own maxrss, torch's
import included, as the command loads it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import charlm
from charlm.data.prepare import builtin_corpus


def stdlib_text(limit: int) -> str:
    parts, size = [], 0
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    while size < limit:
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if "\x00" in text:  # charlm reads text, not binary
                continue
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
    return "".join(parts)[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        text = stdlib_text(int(args.mb * 1_000_000))
        corpus.write_text(text, encoding="utf-8")
        small = Path(tmp) / "small.txt"
        small.write_text(builtin_corpus()[:100_000], encoding="utf-8")
        run = charlm.train(
            small, out=Path(tmp) / "run", max_steps=1, hidden=64, embed=64, device="cpu"
        ).run_dir
        model = charlm.load(run)
        half = args.chars // 2
        written = model.sample(length=half, seed=1).replace("\x00", "")  # an untrained model's text
        sample = text[len(text) // 3 : len(text) // 3 + half] + written
        sample_file = Path(tmp) / "sample.txt"
        sample_file.write_text(sample, encoding="utf-8")
        command = [sys.executable, "-m", "charlm", "novelty", str(run), str(sample_file)]
        command += ["--corpus", str(corpus), "--json"]
        # A small launcher runs the command and reports its peak memory: measured from this process,
        # a child's peak would count the pages it shares with this (large) one before exec.
        launcher = (
            "import resource, subprocess, sys; "
            "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stdout.write(done.stdout); sys.stderr.write(done.stderr); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(done.returncode)"
        )
        times, peaks, report = [], [], {}
        for _ in range(args.repeats):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", launcher, *command], capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if done.returncode:
                raise SystemExit(done.stderr)
            report = json.loads(done.stdout)
            peaks.append(int(done.stderr.strip().splitlines()[-1]) / 1024)
        peak_mb = max(peaks)
    result = {
        "corpus_mb": round(corpus_size := len(text.encode()) / 1e6, 1), "sample_chars": len(sample),
        "seconds_median": round(statistics.median(times), 2), "seconds": [round(t, 2) for t in times],
        "peak_rss_mb": round(peak_mb), "longest_copied": report["longest_copied"],
        "copied_fraction": report["copied_fraction"],
    }  # fmt: skip
    print(
        f"novelty of {len(sample):,} characters against {corpus_size:.0f} MB: {result['seconds_median']}s "
        f"(median of {args.repeats}), peak memory {result['peak_rss_mb']} MB; longest copied "
        f"{report['longest_copied']} characters"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
