"""Make the documentation's pictures from real runs (``make figures``; a few minutes on 2 cores).

    .venv/bin/python docs/figures.py [--corpus data/pydoc.txt] [--out docs/images] [--keep DIR [--replot]]

Every picture comes from the project's own commands on ``data/pydoc.txt`` (CPython's documentation,
which ``make demo`` also trains on), so a change that alters what a picture shows is one run of
this script away from the picture that shows it (``--keep DIR --replot`` draws them again from
kept runs, without training, after a change to the drawing alone):

- ``training.png``: 400 steps of the default model (about a minute), validated every 25 steps,
  drawn by ``charlm plot``;
- ``gradients.png``: 200 steps of each cell (rnn, gru, lstm, mingru, minlstm) at one size, each
  measured with ``charlm diagnose RUN --json`` and drawn together by the function behind
  ``charlm diagnose --plot``;
- ``serve-page.png``: ``charlm serve`` on the first run, its page at ``/`` in headless Chromium
  (Playwright), after typing a prompt and clicking Generate.

Each image is reduced to a 256-colour palette, which keeps it well under 200 KB and looks the same
for line plots and a page of text. Needs the ``plot`` and ``serve`` extras and Playwright (the
``dev`` extra), with Chromium on the PATH or installed by ``playwright install chromium``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Steps, not seconds, so the pictures do not depend on how busy the machine is (and repeat exactly
# on one machine, as a run with a seed does).
MAIN_STEPS = 400  # the run whose curves are drawn: 16 validations, about a minute on 2 cores
CELL_STEPS = 200  # each run of the gradient picture
CELLS = ("rnn", "gru", "lstm", "mingru", "minlstm")
CELL_SHAPE = ("--layers", "2", "--hidden", "128")  # one size for every cell, so only the cell differs
MAX_BYTES = 200_000


def charlm(*args: str | Path, capture: bool = False, cwd: Path | None = None) -> str:
    """Run a charlm command with this interpreter; its progress goes to our stderr."""
    command = [sys.executable, "-m", "charlm", *map(str, args)]
    print("$ charlm", *map(str, args), flush=True)
    out = subprocess.PIPE if capture else None
    done = subprocess.run(command, check=True, text=True, stdout=out, cwd=cwd)
    return done.stdout or ""


def train(corpus: Path, out: Path, steps: int, *options: str, replot: bool = False) -> Path:
    """A run of ``steps`` steps into ``out``; with ``replot``, the run already there (``--replot``)."""
    if replot and (out / "run.json").is_file():
        print(f"reusing {out}", flush=True)
        return out
    charlm("train", corpus, "--out", out, "--max-steps", str(steps), "--seed", "1", *options)
    return out


def training_curves(run: Path, path: Path) -> None:
    """``charlm plot``, run beside the run so that its title is the run's name, not a scratch path."""
    charlm("plot", run.name, "--out", path.resolve(), cwd=run.parent)


def gradients(corpus: Path, work: Path, path: Path, replot: bool = False) -> None:
    """Gradient against distance for each cell after the same short training, on one chart."""
    from charlm.diagnostics.plots import plot_gradients

    curves: dict[str, list[float]] = {}
    for cell in CELLS:
        run = train(corpus, work / cell, CELL_STEPS, "--cell", cell, *CELL_SHAPE, "--eval-every", "100",
                    replot=replot)  # fmt: skip
        report = json.loads(charlm("diagnose", run, "--json", "--depth", "200", "--seed", "1", capture=True))
        memory = report["effective_memory"]
        reach = f"effective memory {memory}" if memory is not None else "effective memory > 200"
        curves[f"{cell} 2x128, {CELL_STEPS} steps ({reach})"] = report["norms"]
    plot_gradients(curves, path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(url: str, server: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"charlm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise SystemExit(f"charlm serve did not answer {url} in {seconds:g} s")


def serve_page(run: Path, path: Path) -> None:
    """The page ``charlm serve`` shows at ``/``, after a generation, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"$ charlm serve {run} --port {port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "charlm", "serve", str(run), "--port", str(port)])
    try:
        wait_until_up(f"{base}/health", server)
        chromium = (
            shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        )
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 540})
            page.goto(f"{base}/")
            page.fill("#prompt", "The ")
            page.fill("#seed", "1")
            page.fill("#max_tokens", "400")
            page.click("#go")
            page.wait_for_function(
                "document.getElementById('status').textContent === 'done'", timeout=120_000
            )
            page.screenshot(path=str(path))
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def shrink(path: Path) -> None:
    """A 256-colour palette: line plots and a page of text look the same at a fraction of the size."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    size = path.stat().st_size
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({size:,} bytes)")
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size:,} bytes, over the {MAX_BYTES:,} the docs allow")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "pydoc.txt")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument(
        "--replot", action="store_true", help="with --keep: draw again from the runs there, without training"
    )
    args = parser.parse_args()
    if args.replot and args.keep is None:
        parser.error("--replot needs --keep DIR (the runs to draw from)")
    if not args.corpus.exists():  # make demo's corpus: CPython's docs, no download
        subprocess.run([sys.executable, "-m", "charlm.data.prepare", str(args.corpus)], check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="charlm-figures-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        run = train(args.corpus, work / "pydoc", MAIN_STEPS, "--eval-every", "25", replot=args.replot)
        pictures = {
            "training.png": lambda p: training_curves(run, p),
            "gradients.png": lambda p: gradients(args.corpus, work, p, args.replot),
            "serve-page.png": lambda p: serve_page(run, p),
        }
        for name, make in pictures.items():
            target = args.out / name
            make(target)
            shrink(target)


if __name__ == "__main__":
    main()
