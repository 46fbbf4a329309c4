"""Ctrl-C during training saves a checkpoint and exits cleanly with 130."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import TINY_MODEL


def test_ctrl_c_saves_latest_and_exits_130(tmp_path: Path, corpus: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charlm",
            "train",
            str(corpus),
            "--out",
            str(run),
            "--epochs",
            "1000",
            "--eval-every",
            "5",
            *TINY_MODEL,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    state = json.loads((run / "latest" / "state.json").read_text())
    assert state["interrupted"] and state["step"] >= 5
    assert (run / "latest" / "model.safetensors").is_file()
