"""Quality on text the model never saw: charlm's defaults against a plain PyTorch reference.

    python benchmarks/generalise.py [--corpus NAME=FILE ...] [--budget 600] [--json-out F]

The protocol users and papers use: split each corpus by characters into its first 90% (the
training file), the next 5% (validation) and the last 5% (test); train on the training file only,
for the same wall-clock budget; score the other two slices. charlm is run exactly as a user would:
``charlm train train.txt --max-time BUDGET`` and ``charlm eval RUN --data valid.txt|test.txt``.

The reference follows PyTorch's word_language_model example (``main.py``): a 2x512 LSTM on
characters, plain SGD at lr 20 divided by 4 when its held-out loss stops improving, gradient norm
clipped to 0.25, dropout 0.2, batch 20, BPTT 35, uniform(-0.1, 0.1) initialisation, fp32, the best
model by held-out loss kept. It validates at every epoch end on the tail of the training file (the
same 5% tail charlm holds out; it never sees the validation or test slices while training) and at
the end of the budget. It uses charlm's character tokenizer for its ids, so both models predict
the same tokens, and it is scored with the same stream layout as ``charlm eval``.

Corpora: ``--corpus NAME=FILE`` (repeatable), plus, unless ``--no-stdlib``, ``python-stdlib``:
the first ``--stdlib-mb`` MB of this Python's standard library sources in sorted path order (code,
not prose: another kind of text, on every machine).

Prints one table (valid and test bpc of both, and charlm / reference) and one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

SPLIT = (0.90, 0.95)


def stdlib_corpus(megabytes: float) -> str:
    """The first ``megabytes`` million characters of the standard library's .py files (tests and
    site-packages left out), in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    want, parts, size = int(megabytes * 1_000_000), [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= want:
            break
    return "".join(parts)[:want]


def split_corpus(text: str, directory: Path) -> dict[str, Path]:
    """Write train.txt, valid.txt and test.txt: the first 90%, the next 5%, the last 5%."""
    cuts = [0, int(len(text) * SPLIT[0]), int(len(text) * SPLIT[1]), len(text)]
    paths = {}
    for name, start, end in zip(("train", "valid", "test"), cuts, cuts[1:], strict=False):
        paths[name] = directory / f"{name}.txt"
        paths[name].write_text(text[start:end], encoding="utf-8")
    return paths


def charlm_eval(run: Path, data: Path, dynamic: bool = True) -> dict:
    """``charlm eval RUN --data FILE --json [--dynamic]``: the static and the dynamic figures."""
    out = subprocess.run(
        [sys.executable, "-m", "charlm", "eval", str(run), "--data", str(data), "--json",
         *(["--dynamic"] if dynamic else [])],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def run_charlm(
    paths: dict[str, Path], budget: float, extra: list[str], work: Path, dynamic: bool = True
) -> dict:
    """``charlm train`` on the training file for ``budget`` seconds, then ``charlm eval``."""
    run = work / "charlm-run"
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "charlm", "train", str(paths["train"]), "--out", str(run),
         "--max-time", f"{budget:g}", *extra],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.monotonic() - start
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scores = {name: charlm_eval(run, paths[name], dynamic) for name in ("valid", "test")}
    best = min(metrics, key=lambda m: m["val_loss"])
    return {
        **{name: s["bpc"] for name, s in scores.items()},
        "dynamic": {name: s["dynamic"]["bpc"] for name, s in scores.items() if "dynamic" in s},
        "heldout_bpc": best["val_bpc"], "steps": metrics[-1]["step"], "train_loss": metrics[-1]["train_loss"],
        "heldout_loss": metrics[-1]["val_loss"], "wall_s": round(wall, 1), "args": extra,
    }  # fmt: skip


# ---------------------------------------------------------------- the plain PyTorch reference


class Reference(nn.Module):
    """word_language_model's RNNModel (LSTM): embedding -> dropout -> LSTM -> dropout -> decoder."""

    def __init__(self, vocab: int, size: int = 512, layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = nn.LSTM(size, size, layers, dropout=dropout)
        self.decoder = nn.Linear(size, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x: torch.Tensor, hidden: tuple | None) -> tuple[torch.Tensor, tuple]:
        output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)  # (T, B, H)
        return self.decoder(self.drop(output)), hidden  # (T, B, V)


@torch.no_grad()
def reference_nats(model: Reference, ids: torch.Tensor, start_id: int) -> float:
    """Summed loss of ``ids`` in the layout ``charlm eval`` uses (32 streams, 256-step windows)."""
    from charlm.data.batches import eval_streams

    model.eval()
    layout, hidden, total = eval_streams(ids, start_id, 32), None, 0.0
    for i in range(0, layout.inputs.size(0), 256):
        logits, hidden = model(layout.inputs[i : i + 256], hidden)
        total += nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), layout.targets[i : i + 256].reshape(-1),
            ignore_index=-100, reduction="sum",
        ).item()  # fmt: skip
    model.train()
    return total


def run_reference(paths: dict[str, Path], budget: float, seed: int = 1111) -> dict:
    """The word_language_model recipe for ``budget`` seconds of training (validations included)."""
    from charlm.config import TokenizerConfig
    from charlm.data.prepare import split_text
    from charlm.data.tokenizer import train_tokenizer

    torch.manual_seed(seed)
    text = paths["train"].read_text(encoding="utf-8")
    fit_text, heldout = split_text(text, 0.05)  # the tail charlm holds out too
    tok = train_tokenizer(fit_text, TokenizerConfig())

    def ids(t: str) -> torch.Tensor:
        return torch.from_numpy(tok.encode_array(t)).long()

    train_ids, held_ids = ids(fit_text), ids(heldout)
    batch, bptt, lr, clip = 20, 35, 20.0, 0.25
    n = train_ids.numel() // batch
    data = train_ids[: n * batch].view(batch, n).t().contiguous()  # (L, B)
    model = Reference(tok.vocab_size)
    criterion = nn.CrossEntropyLoss()
    best, best_state, steps, epochs = math.inf, None, 0, 0
    start = time.monotonic()

    def validate() -> None:
        nonlocal best, best_state, lr
        loss = reference_nats(model, held_ids, tok.newline_id) / held_ids.numel()
        if loss < best:
            best, best_state = loss, {k: v.clone() for k, v in model.state_dict().items()}
        else:
            lr /= 4.0

    out_of_time = False
    while not out_of_time:
        hidden = None
        for i in range(0, data.size(0) - 1, bptt):
            seq = min(bptt, data.size(0) - 1 - i)
            x, y = data[i : i + seq], data[i + 1 : i + 1 + seq]
            hidden = tuple(h.detach() for h in hidden) if hidden is not None else None
            model.zero_grad()
            logits, hidden = model(x, hidden)
            loss = criterion(logits.view(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-lr)
            steps += 1
            if time.monotonic() - start >= budget:
                out_of_time = True
                break
        epochs += 1
        validate()
    train_loss = loss.item()
    model.load_state_dict(best_state)

    def bpc(path: Path) -> float:
        t = path.read_text(encoding="utf-8")
        return reference_nats(model, ids(t), tok.newline_id) / (math.log(2) * len(t))

    return {
        "valid": bpc(paths["valid"]), "test": bpc(paths["test"]),
        "heldout_bpc": best * held_ids.numel() / (math.log(2) * len(heldout)),
        "steps": steps, "epochs": epochs, "train_loss": train_loss, "heldout_loss": best,
        "wall_s": round(time.monotonic() - start, 1),
    }  # fmt: skip


# ---------------------------------------------------------------- the protocol


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--no-stdlib", action="store_true", help="leave out the python-stdlib corpus")
    parser.add_argument("--stdlib-mb", type=float, default=4.5)
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds for each system")
    parser.add_argument("--systems", default="reference,charlm", help="which to run, in this order")
    parser.add_argument("--charlm-args", default="", help="extra `charlm train` options (an ablation)")
    parser.add_argument("--no-dynamic", action="store_true", help="skip dynamic evaluation (minutes)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    parser.add_argument("--keep", type=Path, help="keep each charlm run as KEEP/CORPUS-NAME")
    args = parser.parse_args()

    corpora: dict[str, str] = {}
    for spec in args.corpus:
        name, _, file = spec.partition("=")
        corpora[name] = Path(file).read_text(encoding="utf-8")
    if not args.no_stdlib:
        corpora["python-stdlib"] = stdlib_corpus(args.stdlib_mb)
    systems = args.systems.split(",")
    report: dict = {
        "budget_s": args.budget, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "charlm_args": args.charlm_args,
        "corpora": {},
    }  # fmt: skip
    os.environ.setdefault("CHARLM_CACHE_DIR", tempfile.mkdtemp(prefix="charlm-cache-"))
    for name, text in corpora.items():
        entry = report["corpora"][name] = {
            "characters": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        }  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            paths = split_corpus(text, Path(tmp))
            for system in systems:
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {system} for {args.budget:g}s", file=sys.stderr)
                if system == "reference":
                    entry[system] = run_reference(paths, args.budget)
                else:
                    entry[system] = run_charlm(
                        paths, args.budget, args.charlm_args.split(), Path(tmp), not args.no_dynamic
                    )
                    if args.keep:
                        shutil.copytree(Path(tmp) / "charlm-run", args.keep / name, dirs_exist_ok=True)
                print(f"  {json.dumps(entry[system])}", file=sys.stderr)
        if {"reference", "charlm"} <= set(entry):
            entry["ratio"] = {s: entry["charlm"][s] / entry["reference"][s] for s in ("valid", "test")}

    print(f"\n{'corpus':<16} {'system':<10} {'valid bpc':>10} {'test bpc':>10} {'held-out':>9} {'steps':>7}")
    for name, entry in report["corpora"].items():
        for system in systems:
            r = entry[system]
            print(f"{name:<16} {system:<10} {r['valid']:>10.4f} {r['test']:>10.4f} "
                  f"{r['heldout_bpc']:>9.4f} {r['steps']:>7}")  # fmt: skip
        if "ratio" in entry:
            print(
                f"{name:<16} {'ratio':<10} {entry['ratio']['valid']:>10.3f} {entry['ratio']['test']:>10.3f}"
            )
    print(json.dumps(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
