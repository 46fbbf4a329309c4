"""charlm chat: a prompt in a real terminal (a pseudo-terminal), and the conversation it keeps."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch

import charlm
from charlm.config import SampleConfig
from charlm.generation.chat import Conversation

# prompt_toolkit draws the prompt with cursor movements, not as plain "> ": it switches bracketed
# paste on each time it shows a prompt, which marks the prompt in the terminal's byte stream.
PROMPT = re.escape("\x1b[?2004h")


def spawn(*args: object, ignore_sigint: bool = False) -> pexpect.spawn:
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "COLUMNS": "100"}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return pexpect.spawn(
        sys.executable, ["-m", "charlm", "chat", *map(str, args)], env=env, encoding="utf-8", timeout=60,
        preexec_fn=ignore,
    )  # fmt: skip


def test_chat_in_a_terminal_replies_and_leaves_on_ctrl_d(trained_run: Path) -> None:
    child = spawn(trained_run, "--seed", "1", "--length", "30", "--device", "cpu")
    child.expect("Ctrl-D leaves")
    child.expect(PROMPT)
    child.sendline("The quick brown fox")
    child.expect(PROMPT)  # a reply of at most 30 tokens, then the prompt again
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("ignore_sigint", [False, True])
def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(trained_run: Path, ignore_sigint: bool) -> None:
    """A reply that would go on and on: Ctrl-C stops that reply, and the chat goes on. Also when
    the chat was started with SIGINT ignored, as a non-interactive shell's background job is (CI
    launched so found this): at a terminal the chat takes Ctrl-C back."""
    args = ("--seed", "1", "--length", "1000000", "--stop", "QQQQQQQQQQ", "--device", "cpu")
    talk = spawn(trained_run, *args, ignore_sigint=ignore_sigint)
    talk.expect(PROMPT)
    for line in ("Once upon a time", "and then"):
        talk.sendline(line)
        time.sleep(2)  # it is replying (the terminal is back in cooked mode: Ctrl-C is a signal)
        talk.sendcontrol("c")
        talk.expect(PROMPT, timeout=30)
    talk.sendcontrol("d")
    talk.expect(pexpect.EOF, timeout=30)
    talk.close()
    assert talk.exitstatus == 0


def test_chat_reads_piped_lines(trained_run: Path) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "charlm", "chat", str(trained_run), "--seed", "2", "--length", "20"],
        input="first line\nsecond line\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") >= 2


def test_the_state_carries_across_turns(trained_run: Path) -> None:
    """After two turns the model's state is that of reading the whole conversation at once."""
    model = charlm.load(trained_run, device="cpu")
    talk = Conversation(model.network, model.run.tokenizer, SampleConfig(length=40, seed=3))
    first = "".join(talk.reply("Hello there"))
    second = "".join(talk.reply("And again"))
    assert first and second
    whole = model.read("Hello there\n" + first + "And again\n" + second)
    torch.testing.assert_close(talk.state.logits, whole.logits, atol=1e-4, rtol=1e-4)


def test_a_reply_cut_short_is_remembered(trained_run: Path) -> None:
    model = charlm.load(trained_run, device="cpu")
    talk = Conversation(model.network, model.run.tokenizer, SampleConfig(length=1000, seed=4, stop=("\x00",)))
    pieces = talk.reply("Stop me")
    got = "".join(next(pieces) for _ in range(5))
    pieces.close()  # as Ctrl-C does
    assert talk.state.tail.endswith("Stop me\n" + got)


@pytest.mark.parametrize("option", ["--stop", "--ban"])
def test_chat_takes_the_sampling_options(trained_run: Path, option: str) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "charlm", "chat", str(trained_run), "--length", "30", option, "e"],
        input="line\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "e" not in result.stdout
