"""The corpus inputs people have: directories, several files, glob patterns and compressed files,
read as one text in a stable order, checksummed, and resumed from the inputs as given."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from charlm.config import TokenizerConfig
from charlm.data.corpus import corpus_name, expand_inputs, scan
from charlm.data.prepare import prepare_corpus, read_corpus
from charlm.errors import CorpusError
from tests.conftest import TINY_MODEL, invoke

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
}


@pytest.fixture()
def tree(tmp_path: Path, corpus_text: str) -> Path:
    """A directory of text files, nested, with hidden and binary files that are not corpus."""
    root = tmp_path / "data"
    parts = {
        "b.txt": corpus_text[:6000],
        "a.txt": corpus_text[6000:9000],
        "sub/c.md": corpus_text[9000:14000],
        "sub/deeper/d": corpus_text[14000:],  # no extension: text all the same
        "a2/e.txt.gz": "compressed text, read as it is\n",
    }
    for name, text in parts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    (root / ".hidden.txt").write_text("not corpus")
    (root / ".git").mkdir()
    (root / ".git" / "notes.txt").write_text("not corpus")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    return root


def test_a_directory_reads_its_text_files_in_sorted_order(tree: Path) -> None:
    listed = [tree / "a.txt", tree / "a2" / "e.txt.gz", tree / "b.txt", tree / "sub" / "c.md",
              tree / "sub" / "deeper" / "d"]  # fmt: skip
    assert expand_inputs([tree]) == listed
    assert scan(expand_inputs([tree])).sha256 == scan(listed).sha256
    assert read_corpus([tree]) == read_corpus(listed)
    config = TokenizerConfig()
    from_dir, from_list = (prepare_corpus(inputs, config, 0.1, 1, 16) for inputs in ([tree], listed))
    assert from_dir.sha256 == from_list.sha256
    assert torch.equal(from_dir.train_ids, from_list.train_ids)
    assert torch.equal(from_dir.val_ids, from_list.val_ids)


def test_glob_patterns_are_expanded_in_the_library(tree: Path) -> None:
    assert expand_inputs([f"{tree}/*.txt"]) == [tree / "a.txt", tree / "b.txt"]
    assert expand_inputs([f"{tree}/**/*.txt"]) == [tree / "a.txt", tree / "b.txt"]  # .hidden is left out
    assert expand_inputs([f"{tree}/su*"]) == expand_inputs([tree / "sub"])  # a matched directory
    with pytest.raises(CorpusError, match="no file matches the pattern"):
        expand_inputs([f"{tree}/*.csv"])
    assert expand_inputs([tree / "b.txt", tree / "a.txt"]) == [tree / "b.txt", tree / "a.txt"]  # as given


def test_the_run_name_comes_from_the_inputs(tree: Path) -> None:
    assert corpus_name([tree]) == "data"
    assert corpus_name([f"{tree}/*.txt"]) == "data"
    assert corpus_name([tree / "a2" / "e.txt.gz"]) == "e"
    assert corpus_name([tree / "a.txt", tree / "b.txt"]) == "a"


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_a_compressed_file_is_the_same_text(tmp_path: Path, corpus_text: str, suffix: str) -> None:
    plain = tmp_path / "tiny.txt"
    plain.write_text(corpus_text)
    packed = tmp_path / f"tiny.txt{suffix}"
    packed.write_bytes(COMPRESSORS[suffix](corpus_text.encode()))
    assert read_corpus([packed]) == corpus_text
    assert scan([packed]).sha256 == scan([plain]).sha256
    done: list[tuple[int, int]] = []
    scan([packed], progress=lambda task, n, total: done.append((n, total)))
    assert done[-1] == (packed.stat().st_size, packed.stat().st_size)  # counted in bytes on disk


def test_a_directory_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\0\1\2")
    for name in ("empty", "bin"):
        with pytest.raises(CorpusError, match="is a directory with no text files in it"):
            read_corpus([tmp_path / name])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda data: data[: len(data) // 2], "not intact gzip data"),  # cut short
        (lambda data: data[:40] + b"\xff" * 40 + data[80:], "not intact gzip data"),  # corrupted
        (lambda data: b"plain text, not gzip", "not intact gzip data"),
    ],
)
def test_a_damaged_gzip_is_a_clear_error(
    tmp_path: Path, corpus_text: str, damage: Callable[[bytes], bytes], message: str
) -> None:
    path = tmp_path / "tiny.txt.gz"
    path.write_bytes(damage(gzip.compress(corpus_text.encode())))
    with pytest.raises(CorpusError, match=message):
        read_corpus([path])


def test_compressed_binary_and_encoding_errors_name_the_offset_in_the_text(tmp_path: Path) -> None:
    path = tmp_path / "c.txt.xz"
    path.write_bytes(lzma.compress(b"abc\0def"))
    with pytest.raises(CorpusError, match="NUL byte at offset 3 of its decompressed text"):
        read_corpus([path])
    path.write_bytes(lzma.compress(b"caf\xe9"))
    with pytest.raises(CorpusError, match="byte 0xe9 at offset 3 of its decompressed text"):
        read_corpus([path])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "latest" / "model.safetensors")


def test_compressed_corpora_train_and_evaluate_as_the_plain_text(
    in_tmp: Path, corpus: Path, corpus_text: str
) -> None:
    runs = {}
    for suffix in ["", *sorted(COMPRESSORS)]:
        source = corpus
        if suffix:
            source = in_tmp / f"tiny.txt{suffix}"
            source.write_bytes(COMPRESSORS[suffix](corpus_text.encode()))
        result = invoke("train", source, "--out", f"run{suffix}", "--max-steps", "3", *TINY_MODEL)
        assert result.exit_code == 0, result.output
        runs[suffix] = in_tmp / f"run{suffix}"
    reference = weights(runs[""])
    for suffix, run in runs.items():
        assert all(torch.equal(reference[name], tensor) for name, tensor in weights(run).items()), suffix
        scored = invoke(
            "eval", runs[""], "--json", "--data", in_tmp / f"tiny.txt{suffix}" if suffix else corpus
        )
        assert scored.exit_code == 0, scored.output
        assert (
            json.loads(scored.stdout)["loss"]
            == json.loads(invoke("eval", runs[""], "--json", "--data", corpus).stdout)["loss"]
        )


def test_train_on_a_directory_and_a_quoted_glob_then_resume_without_the_corpus(
    in_tmp: Path, tree: Path
) -> None:
    for inputs, name in (([str(tree)], "data"), ([f"{tree}/**/*.txt", str(tree / "sub")], "data-2")):
        result = invoke("train", *inputs, "--max-steps", "2", *TINY_MODEL)
        assert result.exit_code == 0, result.output
        run = in_tmp / "checkpoints" / name  # named after the directory the inputs start from
        assert json.loads((run / "run.json").read_text())["config"]["corpus"] == inputs  # as given
        resumed = invoke("train", "--resume", "--out", run, "--max-steps", "4")
        assert resumed.exit_code == 0, resumed.output
        assert "resuming" in resumed.output
        assert json.loads((run / "latest" / "state.json").read_text())["step"] == 4


def test_eval_reads_a_directory_and_several_inputs(trained_run: Path, tree: Path) -> None:
    whole = json.loads(invoke("eval", trained_run, "--json", "--data", tree).stdout)
    repeated = [arg for path in expand_inputs([tree]) for arg in ("--data", path)]
    parts = invoke("eval", trained_run, "--json", *repeated)
    assert parts.exit_code == 0, parts.output
    assert json.loads(parts.stdout)["loss"] == whole["loss"]
    assert whole["characters"] == len(read_corpus([tree]))


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "DAMAGED"], "not intact gzip data"),
        (["eval", "RUN", "--data", "DAMAGED"], "not intact gzip data"),
        (["train", "NOTHING/*.txt"], "no file matches the pattern"),
        (["diagnose", "RUN", "--data", "EMPTY_DIR"], "no text files"),
    ],
)
def test_unusable_inputs_get_one_line_and_exit_1(
    tmp_path: Path, trained_run: Path, corpus_text: str, args: list[str], message: str
) -> None:
    damaged = tmp_path / "tiny.txt.gz"
    damaged.write_bytes(gzip.compress(corpus_text.encode())[:-20])
    (tmp_path / "empty").mkdir()
    paths = {"DAMAGED": str(damaged), "RUN": str(trained_run), "EMPTY_DIR": str(tmp_path / "empty"),
             "NOTHING/*.txt": str(tmp_path / "nothing" / "*.txt")}  # fmt: skip
    result = invoke(*[paths.get(a, a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in result.output
