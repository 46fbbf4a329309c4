"""Fine-tuning against training from scratch on a small corpus, at equal time on it.

    python benchmarks/finetune.py [--parent-time 10m] [--time 2m] [--parent-mb 4] [--small-kb 100]
                                  [--parent RUN]
                                  [--extra "--lr 1e-3"] [--work DIR] [--json-out F]

The corpora come from this Python's standard library sources (.py files, tests and site-packages
left out, in sorted path order), so every machine has them: the **large** corpus is the first
``--parent-mb`` MB, the **small** one the ``--small-kb`` KB of the files that follow (other modules
of the same kind of text, none of it in the large corpus; the generated codec tables of
``encodings/`` left out). The small corpus is split by characters
into its first 90% (the training file), the next 5% (valid) and the last 5% (test).

Three systems, each run as a user would and scored with ``charlm eval RUN --data valid.txt|test.txt``:

- ``parent``: ``charlm train large.txt --max-time PARENT-TIME``, not trained on the small corpus;
- ``finetuned``: ``charlm train train.txt --init-from PARENT --max-time TIME``;
- ``scratch``: ``charlm train train.txt --max-time TIME``.

One after the other, never two at once (they would share the CPU). Prints a table and one JSON
object. A quick check that it works: ``--parent-time 20s --time 10s --parent-mb 0.5``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from generalise import split_corpus  # the protocol's 90/5/5 split (this script's folder)

from charlm import __version__ as charlm_version

SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


# Generated code left out of the small corpus: the codec modules are one table each, nearly the
# same file over and over (a slice of them scores ~0.3 bpc from scratch: it measures copying).
GENERATED = "encodings"


def stdlib_texts() -> list[tuple[Path, str]]:
    """The standard library's .py files (paths relative to it) and texts, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts))
    return [(p.relative_to(root), p.read_text(encoding="utf-8", errors="replace")) for p in files]


def corpora(parent_chars: int, small_chars: int) -> tuple[str, str]:
    """The large corpus (whole files up to ``parent_chars``) and the small one (the hand-written
    files after it, up to ``small_chars``): related text, none of the small corpus in the large one."""
    large, small, size, small_size = [], [], 0, 0
    for path, text in stdlib_texts():
        if size < parent_chars:
            large.append(text)
            size += len(text)
        elif GENERATED not in path.parts:
            small.append(text)
            small_size += len(text)
            if small_size >= small_chars:
                break
    small_text = "".join(small)
    if len(small_text) < small_chars // 2:
        raise SystemExit("this Python's standard library is too small for these sizes")
    return "".join(large), small_text[:small_chars]


def charlm(*args: object, quiet: bool = True) -> str:
    """One ``charlm`` command; its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "charlm", *map(str, args)],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"charlm {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result.stdout


def train(corpus: Path, out: Path, budget: str, extra: list[str]) -> dict:
    """``charlm train`` for ``budget``; its steps and wall time."""
    start = time.monotonic()
    charlm("train", corpus, "--out", out, "--max-time", budget, *extra)
    state = json.loads((out / "latest" / "state.json").read_text())
    return {"steps": state["step"], "wall_s": round(time.monotonic() - start, 1)}


def score(run: Path, paths: dict[str, Path]) -> dict[str, float]:
    """Static bits per character of the run's best checkpoint on the valid and test slices."""
    return {
        name: json.loads(charlm("eval", run, "--data", paths[name], "--json"))["bpc"]
        for name in ("valid", "test")
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parent-time", default="10m", help="the parent run's budget on the large corpus")
    parser.add_argument("--time", default="2m", help="each run's budget on the small corpus")
    parser.add_argument("--parent-mb", type=float, default=4.0, help="size of the large corpus")
    parser.add_argument("--small-kb", type=float, default=100.0, help="size of the small corpus")
    parser.add_argument("--extra", default="", help="options for both small-corpus runs, e.g. '--lr 1e-3'")
    parser.add_argument("--work", type=Path, help="keep the corpora and runs here (default: a temporary dir)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--parent",
        type=Path,
        help="the parent run of an earlier --work with the same --parent-mb, used again",
    )
    args = parser.parse_args()
    extra = shlex.split(args.extra)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        large, small = corpora(int(args.parent_mb * 1_000_000), int(args.small_kb * 1_000))
        (work / "large.txt").write_text(large, encoding="utf-8")
        paths = split_corpus(small, work)
        print(f"large corpus {len(large):,} chars, small corpus {len(small):,} chars", file=sys.stderr)

        runs: dict[str, dict] = {}
        parent = work / "parent"
        if args.parent:
            parent = args.parent
            state = json.loads((parent / "latest" / "state.json").read_text())
            runs["parent"] = {"steps": state["step"], "wall_s": None}
        else:
            runs["parent"] = train(work / "large.txt", parent, args.parent_time, [])
        runs["finetuned"] = train(
            paths["train"], work / "finetuned", args.time, ["--init-from", parent, *extra]
        )
        runs["scratch"] = train(paths["train"], work / "scratch", args.time, extra)
        for name, run in (
            ("parent", parent),
            ("finetuned", work / "finetuned"),
            ("scratch", work / "scratch"),
        ):
            runs[name].update(score(run, paths))

    provenance = {
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "charlm": charlm_version,
        "command": " ".join(sys.argv),
    }
    print(f"{'system':<10} {'steps':>7} {'valid bpc':>10} {'test bpc':>9}")
    for name, r in runs.items():
        print(f"{name:<10} {r['steps']:>7} {r['valid']:>10.3f} {r['test']:>9.3f}")
    ratio = {k: runs["finetuned"][k] / runs["scratch"][k] for k in ("valid", "test")}
    print(f"finetuned / scratch: valid {ratio['valid']:.3f}, test {ratio['test']:.3f}")
    result = {"runs": runs, "finetuned_over_scratch": ratio, "provenance": provenance}
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
