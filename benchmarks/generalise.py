"""Quality on text the model never saw: charlm's defaults against two plain PyTorch references.

    python benchmarks/generalise.py [--corpus NAME=FILE ...] [--budget 600] [--systems gpt,lstm,charlm]
                                    [--json-out F]

The protocol users and papers use: split each corpus by characters into its first 90% (the
training file), the next 5% (validation) and the last 5% (test); train on the training file only,
for the same wall-clock budget; score the other two slices. charlm is run exactly as a user would:
``charlm train train.txt --max-time BUDGET`` and ``charlm eval RUN --data valid.txt|test.txt``.

Two references, written here in plain PyTorch. ``gpt`` follows nanoGPT's README CPU recipe (see
:func:`run_gpt`), scored with a sliding window of its block size (stride half a block). Like
nanoGPT it trains on the whole training file, and its figure is its last checkpoint's; the
checkpoint nanoGPT itself would keep (the best on the last 10% of the text, which here are the
scored slices) is reported beside it. Checked against nanoGPT's own ``train.py`` on this machine
(9,800 steps, its checkpoint scored with the same window): 2.111 / 2.296 bpc on tinyshakespeare,
the reference 2.090 / 2.303 in 10 minutes. ``lstm`` follows PyTorch's
word_language_model example (``main.py``): a 2x512 LSTM on
characters, plain SGD at lr 20 divided by 4 when its held-out loss stops improving, gradient norm
clipped to 0.25, dropout 0.2, batch 20, BPTT 35, uniform(-0.1, 0.1) initialisation, fp32, the best
model by held-out loss kept. It validates at every epoch end on the text of the training file that
charlm holds out (the same split; it never sees the validation or test slices while training) and at
the end of the budget. It uses charlm's character tokenizer for its ids, so both models predict
the same tokens, and it is scored with the same stream layout as ``charlm eval``.

Corpora: ``--corpus NAME=FILE`` (repeatable), plus, unless ``--no-stdlib``, ``python-stdlib``:
the first ``--stdlib-mb`` MB of this Python's standard library sources in sorted path order (code,
not prose: another kind of text, on every machine).

Prints one table (valid and test bpc of each, and charlm / each reference) and one JSON object.
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
    """Summed loss of ``ids`` in the layout ``charlm eval`` uses (32 streams, each after the first
    reading the text before it, 256-step windows)."""
    from charlm.data.batches import eval_streams
    from charlm.model.scoring import EVAL_CONTEXT, EVAL_STREAMS

    model.eval()
    layout, hidden, total = eval_streams(ids, start_id, EVAL_STREAMS, EVAL_CONTEXT), None, 0.0
    if layout.context.numel():
        _, (h, c) = model(layout.context, None)
        h[:, 0], c[:, 0] = 0.0, 0.0  # the first piece starts the text, from nothing
        hidden = (h, c)
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
    from charlm.config import TokenizerConfig, TrainConfig
    from charlm.data.prepare import split_text
    from charlm.data.tokenizer import train_tokenizer

    torch.manual_seed(seed)
    text = paths["train"].read_text(encoding="utf-8")
    fit_text, heldout = split_text(
        text, TrainConfig.val_fraction, TrainConfig.val_pieces
    )  # what charlm holds out
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


# ---------------------------------------------------------------- the transformer reference


class Block(nn.Module):
    """nanoGPT's Block: x + attn(ln(x)), then x + mlp(ln(x)); LayerNorm without bias."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.c_fc = nn.Linear(width, 4 * width, bias=False)
        self.mlp_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT's GPT (model.py) as its README's CPU recipe sizes it: 4 layers of width 128, 4
    heads, block 64, no dropout, no biases, tied embedding and output, its initialisation."""

    def __init__(
        self, vocab: int, width: int = 128, layers: int = 4, heads: int = 4, block: int = 64
    ) -> None:
        super().__init__()
        self.block = block
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(block, width)
        self.h = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
        for block_ in self.h:  # nanoGPT's scaled init of the residual projections
            for proj in (block_.c_proj, block_.mlp_proj):
                nn.init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of ``idx`` (B, T)."""
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@torch.no_grad()
def gpt_nats(model: GPT, ids: torch.Tensor, start_id: int, batch: int = 64, stride: int = 0) -> float:
    """Summed loss of ``ids`` (N,) after a start-of-text newline, with a sliding window of the
    model's block size moved by ``stride`` tokens (default half a block): each token is scored
    once, with at least block - stride tokens of context (all it has near the start)."""
    model.eval()
    device = model.lm_head.weight.device
    seq = torch.cat([torch.tensor([start_id]), ids])  # (N + 1,)
    T, stride = model.block, stride or model.block // 2
    starts = list(range(0, max(len(seq) - T, 0) + stride, stride))
    total = 0.0
    for i in range(0, len(starts), batch):
        chunk = starts[i : i + batch]
        windows = [seq[s : s + T + 1] for s in chunk]
        width = max(len(w) for w in windows)
        x = torch.stack([nn.functional.pad(w[:-1], (0, width - len(w))) for w in windows])  # (b, T)
        y = torch.stack([nn.functional.pad(w[1:], (0, width - len(w)), value=-100) for w in windows])
        for row, s in enumerate(chunk):  # score only what earlier windows did not
            if s > 0:
                y[row, : T - stride] = -100
        logits = model(x.to(device))
        y = y.to(device)
        total += nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
    model.train()
    return total


def run_gpt(
    paths: dict[str, Path],
    budget: float,
    seed: int = 1337,
    max_steps: int | None = None,
    device: str = "cpu",
    holdout: bool = False,
) -> dict:
    """nanoGPT's README CPU recipe for ``budget`` seconds (validations included): batch 12 of
    block 64, AdamW (lr 1e-3, betas 0.9 / 0.99, weight decay 0.1 on matrices, clip 1), 100 warmup
    steps, then a cosine to 1e-4 over the budget (its step count set to fill it: the schedule
    follows the elapsed time). As nanoGPT does, it trains on the whole training file; its figure
    is the last checkpoint's (nanoGPT keeps the best on its validation split, the last 10% of the
    text: the slices scored here; that checkpoint is reported beside it). ``holdout``: train on
    the training file less what charlm holds out, and keep the best on that, as charlm does (held
    out as the file's 5% tail, which on tinyshakespeare is the play the validation slice goes on
    with, 10 minutes without it scored 2.46 / 2.49 against 2.11 / 2.30 with it). ``max_steps``: a
    fixed step count instead of the time (the schedule then follows the steps; for runs on a faster
    machine)."""
    from charlm.config import TokenizerConfig, TrainConfig
    from charlm.data.prepare import split_text
    from charlm.data.tokenizer import train_tokenizer

    torch.manual_seed(seed)
    text = paths["train"].read_text(encoding="utf-8")
    fit_text, heldout = (
        split_text(text, TrainConfig.val_fraction, TrainConfig.val_pieces) if holdout else (text, "")
    )
    tok = train_tokenizer(fit_text, TokenizerConfig())

    def ids(t: str) -> torch.Tensor:
        return torch.from_numpy(tok.encode_array(t)).long()

    train_ids, held_ids = ids(fit_text), ids(heldout)
    model = GPT(tok.vocab_size).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99),
    )  # fmt: skip
    batch, block, warmup, lr_max, lr_min = 12, 64, 100, 1e-3, 1e-4
    best, best_state, steps = math.inf, None, 0
    generator = torch.Generator().manual_seed(seed)
    # nanoGPT's own selection, for the check against its figure: it validates on the last 10% of
    # the text it is given (here the validation and test slices), 20 batches of 12 windows
    scored = torch.cat([ids(paths[s].read_text(encoding="utf-8")) for s in ("valid", "test")])
    at = torch.randint(len(scored) - block - 1, (240,), generator=torch.Generator().manual_seed(seed))
    nano_x = torch.stack([scored[i : i + block] for i in at]).to(device)  # (240, T)
    nano_y = torch.stack([scored[i + 1 : i + 1 + block] for i in at]).to(device)
    nano: dict = {"loss": math.inf, "state": None, "step": 0}

    def validate() -> None:
        nonlocal best, best_state
        if holdout:  # windows side by side, to keep validating cheap (nanoGPT's own: 20 batches)
            loss = gpt_nats(model, held_ids, tok.newline_id, stride=block) / held_ids.numel()
            if loss < best:
                best, best_state = loss, {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.eval()
            own = nn.functional.cross_entropy(model(nano_x).flatten(0, 1), nano_y.flatten()).item()
            model.train()
        if own < nano["loss"]:
            nano.update(loss=own, state={k: v.clone() for k, v in model.state_dict().items()}, step=steps)

    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < budget if max_steps is None else steps < max_steps:
        progress = elapsed / budget if max_steps is None else steps / max_steps
        lr = lr_max * (steps + 1) / warmup if steps < warmup else (
            lr_min + 0.5 * (1 + math.cos(math.pi * progress)) * (lr_max - lr_min))  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr
        ix = torch.randint(len(train_ids) - block - 1, (batch,), generator=generator)
        x = torch.stack([train_ids[i : i + block] for i in ix])  # (B, T)
        y = torch.stack([train_ids[i + 1 : i + 1 + block] for i in ix])
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x).view(-1, tok.vocab_size), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
        if steps % 250 == 0:
            validate()
    train_loss = loss.item()
    validate()

    def bpc(path: Path) -> float:
        t = path.read_text(encoding="utf-8")
        return gpt_nats(model, ids(t), tok.newline_id) / (math.log(2) * len(t))

    final = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(nano["state"])
    nanogpt = {"valid": bpc(paths["valid"]), "test": bpc(paths["test"]), "step": nano["step"],
               "val_loss": nano["loss"]}  # fmt: skip
    model.load_state_dict(best_state if holdout else final)
    return {
        "valid": bpc(paths["valid"]), "test": bpc(paths["test"]),
        "selected_as_nanogpt": nanogpt,
        "heldout_bpc": best * held_ids.numel() / (math.log(2) * len(heldout)) if holdout else math.nan,
        "steps": steps, "train_loss": train_loss, "heldout_loss": best, "holdout": holdout,
        "tokens_per_s": round(steps * batch * block / (time.monotonic() - start)),
        "params": sum(p.numel() for p in model.parameters()),
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
    parser.add_argument(
        "--systems", default="gpt,lstm,charlm",
        help="which to run, in this order: gpt (nanoGPT's CPU recipe), lstm (word_language_model's), charlm",
    )  # fmt: skip
    parser.add_argument(
        "--charlm-args",
        default="",
        help='extra `charlm train` options (an ablation), joined with "=" since they start with a dash: '
        '--charlm-args="--dropout 0.2"',
    )
    parser.add_argument("--gpt-steps", type=int, help="gpt: this many steps instead of the budget")
    parser.add_argument("--gpt-device", default="cpu", help="gpt: the torch device (cpu, cuda)")
    parser.add_argument("--gpt-holdout", action="store_true", help="gpt: hold out what charlm does (run_gpt)")
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
                if system == "lstm":
                    entry[system] = run_reference(paths, args.budget)
                elif system == "gpt":
                    entry[system] = run_gpt(
                        paths, args.budget, max_steps=args.gpt_steps, device=args.gpt_device,
                        holdout=args.gpt_holdout,
                    )  # fmt: skip
                else:
                    entry[system] = run_charlm(
                        paths, args.budget, args.charlm_args.split(), Path(tmp), not args.no_dynamic
                    )
                    if args.keep:
                        shutil.copytree(Path(tmp) / "charlm-run", args.keep / name, dirs_exist_ok=True)
                print(f"  {json.dumps(entry[system])}", file=sys.stderr)
        if "charlm" in entry:
            entry["ratio"] = {
                ref: {s: entry["charlm"][s] / entry[ref][s] for s in ("valid", "test")}
                for ref in ("gpt", "lstm") if ref in entry
            }  # fmt: skip

    print(f"\n{'corpus':<16} {'system':<10} {'valid bpc':>10} {'test bpc':>10} {'held-out':>9} {'steps':>7}")
    for name, entry in report["corpora"].items():
        for system in systems:
            r = entry[system]
            print(f"{name:<16} {system:<10} {r['valid']:>10.4f} {r['test']:>10.4f} "
                  f"{r['heldout_bpc']:>9.4f} {r['steps']:>7}")  # fmt: skip
        for ref, ratio in entry.get("ratio", {}).items():
            print(f"{name:<16} {'/ ' + ref:<10} {ratio['valid']:>10.3f} {ratio['test']:>10.3f}")
    print(json.dumps(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
