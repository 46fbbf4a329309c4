"""Everything a user can do, through the command line, on tiny inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_MODEL, invoke, metrics


def test_train_writes_a_self_contained_run(in_tmp: Path, corpus: Path) -> None:
    result = invoke("train", corpus, "--max-steps", "20", "--eval-every", "10", *TINY_MODEL)
    assert result.exit_code == 0, result.output
    run = in_tmp / "checkpoints" / "tiny"  # named after the corpus
    for part in (
        "run.json",
        "tokenizer.model",
        "heldout.txt",
        "metrics.jsonl",
        "best/model.safetensors",
        "latest/model.safetensors",
        "latest/state.json",
    ):
        assert (run / part).is_file(), part
    records = metrics(run)
    assert [r["step"] for r in records] == [10, 20]
    for key in (
        "step",
        "tokens",
        "train_loss",
        "val_loss",
        "val_ppl",
        "val_bpc",
        "lr",
        "grad_norm",
        "tokens_per_sec",
    ):
        assert key in records[0]
    assert "max_steps: 20 steps" in result.stderr
    assert result.stdout == ""  # progress and reports go to stderr


def test_a_second_run_gets_a_new_directory(in_tmp: Path, corpus: Path) -> None:
    for _ in range(2):
        assert invoke("train", corpus, "--max-steps", "2", *TINY_MODEL).exit_code == 0
    assert sorted(p.name for p in (in_tmp / "checkpoints").iterdir()) == ["tiny", "tiny-2"]


@pytest.mark.parametrize(
    "options",
    [
        ["--cell", "gru", "--tokenizer", "bpe", "--vocab-size", "400"],
        ["--cell", "rnn", "--tokenizer", "unigram", "--vocab-size", "400", "--layers", "1"],
        ["--cell", "irnn", "--forget-bias", "2"],
        ["--tie-weights", "--embed", "32", "--optimizer", "sgd", "--dropout", "0"],
        ["--tokenizer", "bpe", "--vocab-size", "500", "--softmax", "adaptive", "--precision", "fp32"],
    ],
)
def test_train_every_cell_and_tokenizer(in_tmp: Path, corpus: Path, options: list[str]) -> None:
    result = invoke("train", corpus, "--out", "run", "--max-steps", "3", *TINY_MODEL, *options)
    assert result.exit_code == 0, result.output
    assert invoke("sample", "run", "--length", "20", "--seed", "1").exit_code == 0
    report = json.loads(invoke("eval", "run", "--json").stdout)
    assert report["loss"] == pytest.approx(min(r["val_loss"] for r in metrics(in_tmp / "run")), rel=1e-6)


@pytest.mark.parametrize(("optimizer", "arithmetic"), [("adam", "bf16"), ("sgd", "fp32")])
def test_precision_auto_trains_sgd_in_fp32_where_bf16_is_native(
    in_tmp: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str, arithmetic: str
) -> None:
    """SGD hardly learned in bf16 on a 4.5 MB corpus (README), so ``auto`` keeps it in fp32, and
    ``charlm eval`` scores the run in the arithmetic its training validated in."""
    monkeypatch.setattr("charlm.device.cpu_has_bf16", lambda: True)
    result = invoke(
        "train", corpus, "--out", "run", "--max-steps", "2", "--optimizer", optimizer, *TINY_MODEL
    )
    assert result.exit_code == 0, result.output
    assert f"on cpu in {arithmetic}:" in result.stderr
    assert json.loads(invoke("eval", "run", "--json").stdout)["precision"] == arithmetic


def test_several_corpus_files(in_tmp: Path, corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("more text\n" * 200)
    result = invoke("train", corpus, other, "--out", "run", "--max-steps", "2", *TINY_MODEL)
    assert result.exit_code == 0, result.output
    assert json.loads((in_tmp / "run" / "run.json").read_text())["config"]["corpus"] == [
        str(corpus),
        str(other),
    ]


def test_max_time_accepts_durations(in_tmp: Path, corpus: Path) -> None:
    result = invoke("train", corpus, "--out", "run", "--max-time", "1s", "--epochs", "999", *TINY_MODEL)
    assert result.exit_code == 0, result.output
    assert "max_time" in result.stderr


def test_sample_with_a_seed_is_reproducible_and_only_text_on_stdout(trained_run: Path) -> None:
    args = ["sample", trained_run, "--temp", "0.8", "--length", "60", "--seed", "3"]
    a, b = invoke(*args), invoke(*args)
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout and len(a.stdout) >= 20
    assert invoke(*args[:-1], "4").stdout != a.stdout


def test_sample_defaults_to_the_most_recent_run(in_tmp: Path, corpus: Path) -> None:
    for seed, name in enumerate(("older", "newer")):
        args = ["--out", f"checkpoints/{name}", "--max-steps", "3", "--seed", str(seed), *TINY_MODEL]
        assert invoke("train", corpus, *args).exit_code == 0
    default = invoke("sample", "--temp", "0.8", "--length", "30", "--seed", "1")
    assert default.exit_code == 0, default.output
    assert default.stdout == invoke("sample", "checkpoints/newer", "--length", "30", "--seed", "1").stdout
    assert default.stdout != invoke("sample", "checkpoints/older", "--length", "30", "--seed", "1").stdout


def test_sample_stdout_is_exactly_the_generated_text(trained_run: Path) -> None:
    from charlm.config import SampleConfig
    from charlm.generation.sampling import generate, make_generator
    from charlm.runs import checkpoint, rundir

    run = rundir.load_run(trained_run)
    model = checkpoint.load_model(run)
    config = SampleConfig(length=80, temperature=0.9, prime="The ", seed=5)
    expected = "The " + "".join(
        piece for _, piece in generate(model, run.tokenizer, config, make_generator(5))
    )
    result = invoke(
        "sample", trained_run, "--length", "80", "--temp", "0.9", "--prime", "The ", "--seed", "5"
    )
    assert result.stdout == expected + ("" if expected.endswith("\n") else "\n")


def test_sample_into_a_closed_pipe_is_quiet(trained_run: Path) -> None:
    shell = f"{sys.executable} -m charlm sample {trained_run} --length 20000 --seed 1 | head -c 5"
    out = subprocess.run(shell, shell=True, capture_output=True, timeout=120)
    assert len(out.stdout) == 5
    assert b"Traceback" not in out.stderr and b"Error" not in out.stderr


def test_sample_greedy_prime_filters_and_several_samples(trained_run: Path) -> None:
    greedy = [invoke("sample", trained_run, "--temp", "0", "--length", "30").stdout for _ in range(2)]
    assert greedy[0] == greedy[1]  # no seed needed: temperature 0 is deterministic
    primed = invoke(
        "sample",
        trained_run,
        "--prime",
        "The ☃ ",
        "--length",
        "30",
        "--seed",
        "1",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
    )
    assert primed.exit_code == 0 and primed.stdout.startswith("The ☃ ")  # unseen characters work
    many = invoke(
        "sample", trained_run, "--num-samples", "3", "--length", "15", "--seed", "1", "--prime", "Q"
    )
    assert many.exit_code == 0 and many.stderr.count("sample ") == 3
    assert many.stdout.count("Q") >= 3 and many.stdout.startswith("Q")  # each sample shows its prime


def test_eval_reports_what_training_logged(trained_run: Path) -> None:
    result = invoke("eval", trained_run, "--perplexity", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    best = min(metrics(trained_run), key=lambda r: r["val_loss"])
    assert report["loss"] == pytest.approx(best["val_loss"], rel=1e-9)
    assert report["bpc"] == pytest.approx(best["val_bpc"], rel=1e-9)
    assert report["characters"] == len((trained_run / "heldout.txt").read_text(encoding="utf-8"))
    for key in ("tokens", "characters", "loss", "perplexity", "bpc"):
        assert key in report


def test_eval_table_and_other_data(trained_run: Path, tmp_path: Path) -> None:
    text = tmp_path / "other.txt"
    text.write_text("Some held-out text, with ünïcödé.\n")
    table = invoke("eval", trained_run, "--data", text)
    assert table.exit_code == 0 and "bits per character" in table.stdout
    report = json.loads(invoke("eval", trained_run, "--data", text, "--json").stdout)
    assert report["characters"] == len(text.read_text())


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["train", "missing.txt"], 1, "not found"),
        (["train", "CORPUS", "--dropout", "1.5"], 2, "--dropout"),
        (["train", "CORPUS", "--hidden", "0"], 2, "--hidden"),
        (["train", "CORPUS", "--val-fraction", "1"], 2, "--val-fraction"),
        (["train", "CORPUS", "--max-time", "soon"], 2, "--max-time"),
        (["train", "CORPUS", "--cell", "transformer"], 2, "transformer"),
        (["train", "CORPUS", "--tokenizer", "bpe", "--vocab-size", "100000"], 1, "too high"),
        (["train", "CORPUS", "--tokenizer", "bpe", "--vocab-size", "100"], 1, "or more (or --tokenizer"),
        (["train", "CORPUS", "--batch-size", "100000"], 1, "too small"),
        (["sample", "--temp", "-1"], 2, "--temp"),
        (["sample", "--top-p", "0"], 2, "--top-p"),
        (["sample", "--top-k", "-1"], 2, "--top-k"),
        (["sample", "--length", "-5"], 2, "--length"),
        (["sample"], 1, "no trained run found"),
        (["eval", "nowhere"], 1, "run not found"),
        (["eval", "notes[v2]"], 1, "notes[v2]"),  # no rich markup eaten
        (["sample", "--checkpoint", "worst"], 2, "worst"),
        (["train", "CORPUS", "--device", "cuda:7"], 2, "cuda"),
        (["train", "CORPUS", "--embed", "0"], 2, "--embed"),
        (["train", "CORPUS", "--layers", "-1"], 2, "--layers"),
        (["train", "CORPUS", "--batch-size", "0"], 2, "--batch-size"),
        (["train", "CORPUS", "--bptt", "-3"], 2, "--bptt"),
        (["train", "CORPUS", "--dropout", "-0.1"], 2, "--dropout"),
        (["train", "CORPUS", "--val-fraction", "0"], 2, "--val-fraction"),
        (["train", "CORPUS", "--tokenizer", "wordpiece"], 2, "wordpiece"),
        (["train", "CORPUS", "--softmax", "adaptive", "--tie-weights"], 2, "needs the full softmax"),
        (["train", "CORPUS", "--precision", "fp8"], 2, "fp8"),
        (["train", "CORPUS", "--save-every", "often"], 2, "--save-every"),
        (["train", "CORPUS", "--save-every", "0"], 2, "--save-every"),
        (["train"], 2, "give a corpus"),
        (["train", "--resume", "--out", "nowhere"], 1, "run not found"),
        (["train", "CORPUS", "--out", "CORPUS/run"], 1, "cannot create run directory"),
        (["train", "DIR"], 1, "is a directory with no text files"),
        (["train", "CORPUS.gz"], 1, "not intact gzip data"),
        (["train", "nowhere/*.txt"], 1, "no file matches the pattern nowhere/*.txt"),
        (["train", "--resume"], 1, "no trained run found"),
        (["train", "EMPTY"], 1, "corpus is empty"),
        (["train", "BLANK"], 1, "whitespace only"),
        (["train", "BINARY"], 1, "NUL byte at offset 4"),
        (["train", "LATIN1"], 1, "byte 0xe9 at offset 9"),
        (["train", "LATIN1"], 1, "--encoding"),
        (["train", "SMALL"], 1, "too small"),
        (["eval", "DIR"], 1, "is not a charlm run"),
        (["sample", "--device", "cuda"], 2, "cuda"),
        # NaN passes a range check (nan <= 0 is false): every number must be finite
        (["sample", "--temp", "nan"], 2, "--temp must be a finite number"),
        (["sample", "--repetition-penalty", "nan"], 2, "--repetition-penalty must be a finite number"),
        (["sample", "--frequency-penalty", "inf"], 2, "--frequency-penalty must be a finite number"),
        (["train", "CORPUS", "--lr", "nan"], 2, "--lr must be a finite number"),
        (["train", "CORPUS", "--lr", "inf"], 2, "--lr must be a finite number"),
        (["train", "CORPUS", "--clip", "nan"], 2, "--clip must be a finite number"),
        (["train", "CORPUS", "--weight-decay", "nan"], 2, "--weight-decay must be a finite number"),
        (["train", "CORPUS", "--forget-bias", "nan"], 2, "--forget-bias must be a finite number"),
    ],
)
def test_user_mistakes_get_one_line_and_an_exit_code(
    in_tmp: Path, corpus: Path, args: list[str], code: int, message: str
) -> None:
    (in_tmp / "dir").mkdir()
    files = {
        "EMPTY": b"",
        "BLANK": b" \n\t\n",
        "BINARY": b"text\0more",
        "LATIN1": ("text: caf\xe9\n" * 3).encode("latin-1"),
        "SMALL": b"just a few words\n",
    }
    for name, data in files.items():
        (in_tmp / name.lower()).write_bytes(data)
    (in_tmp / "damaged.gz").write_bytes(b"\x1f\x8b\x08\x00" + corpus.read_bytes()[:100])
    paths = {"CORPUS": str(corpus), "DIR": str(in_tmp / "dir"), "CORPUS/run": f"{corpus}/run"}
    paths["CORPUS.gz"] = str(in_tmp / "damaged.gz")
    paths.update({name: str(in_tmp / name.lower()) for name in files})
    corpus_before = corpus.read_bytes()
    result = invoke(*[paths.get(a, a) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    if not result.output.startswith("Usage:"):  # the parser's own errors come with the usage line
        lines = result.output.strip().splitlines()  # status lines, if any, then the error
        assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, lines
        assert "" not in lines, lines
    assert corpus.read_bytes() == corpus_before  # nothing that existed is damaged


def test_an_unreadable_corpus(in_tmp: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.open

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == corpus:
            raise PermissionError(13, "Permission denied")  # chmod 000 does not stop root, so simulate
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    result = invoke("train", corpus, *TINY_MODEL)
    assert (
        result.exit_code == 1
        and "cannot read corpus" in result.output
        and "Permission denied" in result.output
    )


def test_an_output_directory_that_cannot_be_written(in_tmp: Path, corpus: Path) -> None:
    """A read-only file system or a full disk at the first write: one line, exit 1."""
    readonly = in_tmp / "ro"
    readonly.mkdir()
    (readonly / "keep.txt").write_text("mine")
    import os

    if os.geteuid() == 0:  # root writes anywhere; stand a file where the run's first file goes
        (readonly / "run").mkdir()
        (readonly / "run" / "tokenizer.model").mkdir()
        (readonly / "run" / ".tokenizer.model.tmp").mkdir()
    else:
        (readonly / "run").mkdir()
        (readonly / "run").chmod(0o500)
    result = invoke("train", corpus, "--out", readonly / "run", "--max-steps", "2", *TINY_MODEL)
    assert result.exit_code == 1, result.output
    assert "cannot" in result.output and "Traceback" not in result.output
    assert (readonly / "keep.txt").read_text() == "mine"


def test_help_is_fast_because_it_does_not_import_torch() -> None:
    probe = (
        "import sys; from typer.testing import CliRunner; from charlm.cli.app import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules, 'sentencepiece' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "charlm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "sample" in out.stdout


def test_the_data_progress_bar_renders_and_goes_away() -> None:
    import io

    from rich.console import Console

    from charlm.cli.render import TrainProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    with TrainProgress(console) as progress:
        progress.on_progress("encoding corpus", 5, 10)
        progress.on_progress("encoding corpus", 10, 10)  # done: the bar is removed
        progress.on_progress("reading corpus", 1, 4)  # a later pass gets a new bar
    assert "encoding corpus" in console.file.getvalue() and "reading corpus" in console.file.getvalue()


def test_a_sample_on_stderr_shows_control_characters_as_escapes() -> None:
    """A sampled NUL or carriage return must not reach a log or terminal raw (grep called such a
    log binary; a carriage return overwrites the line); a line break shows as ⏎, markup as text."""
    import io

    from rich.console import Console

    from charlm.cli.render import TrainProgress

    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    with TrainProgress(console) as progress:
        progress.on_sample(5, "a\x00b\nc\rd e\x7f[bold]")
    assert console.file.getvalue() == "sample at step 5: a\\x00b⏎ c\\x0dd e\\x7f[bold]\n"


def test_no_progress_bar_and_no_blank_line_in_a_log() -> None:
    """Where stderr is not a terminal no bar is drawn: a transient one (the corpus passes) left a
    blank line there, and the training bar a stale last line (rich draws it there once, at the
    end, with the last report's figures)."""
    import io

    from rich.console import Console

    from charlm.cli.render import TrainProgress
    from charlm.training.report import StepReport

    console = Console(file=io.StringIO(), force_terminal=False, width=80)
    with TrainProgress(console) as progress:
        progress.on_status("encoding")
        progress.on_progress("encoding corpus", 5, 10)
        progress.on_progress("encoding corpus", 10, 10)
        progress.on_status("done")
        report = StepReport(
            step=20,
            epoch=1,
            epochs=10,
            tokens=640,
            loss=2.0,
            bpc=2.9,
            lr=3e-3,
            grad_norm=0.5,
            clipped=0.0,
            tokens_per_sec=1e4,
            elapsed=1.0,
            fraction=0.8,
        )
        progress.on_step(report)
    assert console.file.getvalue() == "encoding\ndone\n"
