"""The GPU path: training, resume, sampling, evaluation, diagnosis and the server on CUDA.

Marked ``cuda`` and skipped (with the reason) where no CUDA GPU is present, which is CI and this
project's own machine; ``make gpu-check`` runs them where there is one. They check what can differ
on a GPU: the module's cuDNN kernels instead of the CPU's NumPy stepper, bf16 autocast on the
GPU, tensors that must move between the CPU and the device (a checkpoint written on one and
resumed on the other, the scores handed to the picker), and the GPU's random generator in the
checkpoint.

What "the same" means here: on one GPU the same seed gives the same text (sampling draws from a
CPU generator; the scores it draws from come from the same kernels). Against the CPU, the
arithmetic is another (cuDNN's against the NumPy stepper's or oneDNN's), so scores are compared
within float tolerance, not the sampled text: a token near a tie may go either way.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import charlm
from charlm.config import Cell, SampleConfig
from charlm.serve.engine import Emit, Engine, Request
from charlm.training.report import StepReport
from tests.conftest import invoke, metrics

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs these where one is)"
    ),
]

# A tiny model, as the CPU tests train it, but on the GPU.
MODEL = ["--hidden", "32", "--layers", "2", "--batch-size", "8", "--bptt", "16", "--optimizer", "adam"]
CELLS = ["lstm", "gru", "mingru", "minlstm"]
API_MODEL = {"hidden": 32, "layers": 2, "batch_size": 8, "bptt": 16, "optimizer": "adam"}


def bf16_or_skip(precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")


def train(corpus: Path, out: Path, *options: str) -> Path:
    result = invoke("train", corpus, "--out", out, *MODEL, *options)
    assert result.exit_code == 0, result.output
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "latest" / "model.safetensors")


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """One tiny run trained on the GPU (fp32), for the sampling, eval and server tests."""
    root = tmp_path_factory.mktemp("cuda-run")
    corpus = root / "tiny.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    return train(corpus, root / "run", "--device", "cuda", "--precision", "fp32", "--max-steps", "40",
                 "--eval-every", "10", "--cell", "lstm")  # fmt: skip


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("cell", CELLS)
def test_training_on_cuda_lowers_the_loss(corpus: Path, tmp_path: Path, cell: str, precision: str) -> None:
    bf16_or_skip(precision)
    run = train(corpus, tmp_path / "run", "--device", "cuda", "--precision", precision, "--cell", cell,
                "--max-steps", "60", "--eval-every", "20")  # fmt: skip
    losses = [r["val_loss"] for r in metrics(run)]
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    assert charlm.load(run, device="cpu").sample(length=20, seed=1)  # written on the GPU, read on the CPU


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("cell", ["lstm", "mingru"])
def test_resume_on_cuda_continues_the_run(corpus: Path, tmp_path: Path, cell: str, precision: str) -> None:
    """Stopped at step 10 and resumed to 20 against 20 straight, both on the GPU: the same weights
    and the same validation losses.

    To float tolerance rather than bit for bit: some CUDA kernels (the embedding's backward among
    them) add with atomics, whose order varies from run to run, so two uninterrupted runs on one
    GPU need not be identical either. The CPU tests hold resume to the bit."""
    bf16_or_skip(precision)
    options = {**API_MODEL, "device": "cuda", "precision": precision, "cell": cell, "max_steps": 20,
               "eval_every": 5, "seed": 3}  # fmt: skip
    stop = threading.Event()

    class StopAtTen(charlm.SilentCallbacks):
        def on_step(self, report: StepReport) -> None:
            if report.step >= 10:
                stop.set()

    straight = charlm.train(corpus, out=tmp_path / "straight", **options)
    stopped = charlm.train(corpus, out=tmp_path / "stopped", callbacks=StopAtTen(), stop=stop, **options)
    assert (stopped.stop_reason, stopped.steps) == ("stopped", 10)
    resumed = charlm.train(corpus, out=tmp_path / "stopped", resume=True, **options)
    assert (straight.steps, resumed.steps) == (20, 20)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    curves = [
        [(r["step"], r["val_loss"]) for r in metrics(tmp_path / run)] for run in ("straight", "stopped")
    ]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] and curves[0][-1][0] == 20
    for (_, x), (_, y) in zip(*curves, strict=True):
        assert abs(x - y) < 1e-3, curves


@pytest.mark.parametrize(("first", "then"), [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_run_moves_between_the_cpu_and_the_gpu(corpus: Path, tmp_path: Path, first: str, then: str) -> None:
    """A checkpoint written on one device resumes on the other: the optimizer state, the carried
    hidden state and the weights move, the random generator state of the other device is ignored."""
    run = train(corpus, tmp_path / "run", "--device", first, "--precision", "fp32", "--max-steps", "6",
                "--eval-every", "3", "--cell", "lstm")  # fmt: skip
    result = invoke("train", "--resume", "--out", run, "--device", then, "--max-steps", "12")
    assert result.exit_code == 0, result.output
    records = metrics(run)
    assert records[-1]["step"] == 12 and all(r["val_loss"] < 10 for r in records)
    model = charlm.load(run, "latest", device=then)
    assert model.device.type == then and model.sample(length=20, seed=1)


def test_sampling_on_cuda_gives_a_seed_the_same_text_again(cuda_run: Path) -> None:
    model = charlm.load(cuda_run, device="cuda")
    assert model.device.type == "cuda"
    first = model.sample(prime="The ", length=60, temperature=0.9, seed=3)
    assert first == model.sample(prime="The ", length=60, temperature=0.9, seed=3)
    assert first != model.sample(prime="The ", length=60, temperature=0.9, seed=4)
    printed = invoke("sample", cuda_run, "--device", "cuda", "--prime", "The ", "--length", "60",
                     "--temp", "0.9", "--seed", "3")  # fmt: skip
    assert printed.exit_code == 0, printed.output
    assert printed.stdout == "The " + first + ("" if first.endswith("\n") else "\n")
    batched = list(model.samples(4, prime="The ", length=30, seed=5))
    assert batched == list(model.samples(4, prime="The ", length=30, seed=5))


@pytest.fixture()
def full_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN's RNNs in true fp32. By default PyTorch lets cuDNN compute fp32 in TF32 (a 10-bit
    mantissa) on Ampere and later GPUs, which moves a small model's scores by about 1e-3: these
    tests compare the GPU's arithmetic with the CPU's, not TF32's rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.usefixtures("full_fp32")
def test_scores_on_cuda_match_the_cpu(cuda_run: Path) -> None:
    """The module on the GPU and the CPU's stepper give the next token the same probabilities,
    after a prime and after each of a few sampled steps (the rows of the batched sampler)."""
    gpu, cpu = charlm.load(cuda_run, device="cuda"), charlm.load(cuda_run, device="cpu")
    for text in ("The ", "def f(x):\n    return", ""):
        on_gpu = dict(gpu.next_token_probs(text, k=20))
        on_cpu = dict(cpu.next_token_probs(text, k=20))
        shared = on_gpu.keys() & on_cpu.keys()
        assert len(shared) >= 15
        for piece in shared:
            assert abs(on_gpu[piece] - on_cpu[piece]) < 1e-4, (text, piece)
    from charlm.generation.rows import Rows, fast_stepper

    gpu_rows, cpu_rows = (
        Rows(gpu.network, fast_stepper(gpu.network)),
        Rows(cpu.network, fast_stepper(cpu.network)),
    )
    assert gpu_rows.stepper is None and cpu_rows.stepper is not None  # the torch path on the GPU
    gpu_start, cpu_start = gpu.read("The "), cpu.read("The ")
    gpu_rows.join(gpu_start.hidden, gpu_start.logits, 3)
    cpu_rows.join(cpu_start.hidden, cpu_start.logits, 3)
    tokens = torch.tensor([5, 9, 11]).numpy()
    for _ in range(5):
        torch.testing.assert_close(
            torch.from_numpy(gpu_rows.scores), torch.from_numpy(cpu_rows.scores), rtol=1e-4, atol=1e-4
        )
        gpu_rows.step(tokens)
        cpu_rows.step(tokens)


def test_eval_on_cuda_matches_the_cpu(cuda_run: Path, corpus_text: str) -> None:
    """Within 1e-3 bpc of the CPU's score, with PyTorch's defaults (TF32 allowed in cuDNN)."""
    text = corpus_text[-4000:]
    gpu = charlm.load(cuda_run, device="cuda").evaluate(text, precision="fp32")
    cpu = charlm.load(cuda_run, device="cpu").evaluate(text, precision="fp32")
    assert gpu.tokens == cpu.tokens and abs(gpu.bpc - cpu.bpc) < 1e-3, (gpu.bpc, cpu.bpc)
    dynamic = charlm.load(cuda_run, device="cuda").evaluate(text[:1000], precision="fp32", dynamic=True)
    assert 0 < dynamic.bpc < 10
    result = invoke("eval", cuda_run, "--device", "cuda", "--perplexity", "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.usefixtures("full_fp32")
def test_a_state_file_moves_between_devices(cuda_run: Path, tmp_path: Path) -> None:
    """A state read on the GPU, saved, and loaded on the CPU continues as the GPU's does."""
    gpu, cpu = charlm.load(cuda_run, device="cuda"), charlm.load(cuda_run, device="cpu")
    path = tmp_path / "state.safetensors"
    gpu.save_state(gpu.read("The quick brown "), path)
    on_cpu = cpu.load_state(path)
    assert on_cpu.logits.device.type == "cpu"
    torch.testing.assert_close(on_cpu.logits, cpu.read("The quick brown ").logits, rtol=1e-4, atol=1e-4)
    assert gpu.sample(length=20, seed=2, state=gpu.load_state(path))


def test_diagnose_on_cuda(cuda_run: Path) -> None:
    result = invoke("diagnose", cuda_run, "--device", "cuda", "--depth", "20", "--batches", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["norms"]) == 21 and report["norms"][0] > 0


@pytest.fixture()
def engine(cuda_run: Path) -> Iterator[Engine]:
    model = charlm.load(cuda_run, device="cuda")
    running = Engine(model.network, model.run.tokenizer, 64)
    assert running.stepper is None  # the module steps the rows on the GPU
    running.start()
    yield running
    running.stop()


def complete(engine: Engine, prompts: list[tuple[str, int]], length: int = 40) -> list[str]:
    """Submit (prompt, seed) requests at once and wait for their texts."""
    texts: list[list[str]] = [[] for _ in prompts]
    done = threading.Event()
    finished = [0]

    def sink(i: int) -> Emit:
        def emit(piece: str, finish: str | None) -> None:
            texts[i].append(piece)
            if finish is not None:
                finished[0] += 1
                if finished[0] == len(prompts):
                    done.set()

        return emit

    requests = [
        Request(p, SampleConfig(length=length, temperature=0.9, seed=s), sink(i))
        for i, (p, s) in enumerate(prompts)
    ]
    engine.submit(requests)
    assert done.wait(60), "the engine did not finish"
    return ["".join(t) for t in texts]


def test_the_server_s_engine_on_cuda(engine: Engine, cuda_run: Path) -> None:
    """On the GPU a stream gets the text charlm sample gives its seed there, alone and among
    others, and the same again."""
    model = charlm.load(cuda_run, device="cuda")
    expected = model.sample(prime="The ", length=40, temperature=0.9, seed=7)
    assert complete(engine, [("The ", 7)]) == [expected]
    crowd = complete(engine, [("The ", 7), ("A ", 1), ("def ", 2), ("The ", 8)])
    assert crowd[0] == expected
    assert crowd == complete(engine, [("The ", 7), ("A ", 1), ("def ", 2), ("The ", 8)])


def test_the_server_over_http_on_cuda(cuda_run: Path) -> None:
    """``charlm serve --device cuda``'s app answers a completion with charlm sample's text."""
    import httpx
    import uvicorn

    from charlm.serve.app import create_app
    from tests.test_serve import free_port

    model = charlm.load(cuda_run, device="cuda")
    engine = Engine(model.network, model.run.tokenizer, 64)
    engine.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app({"tiny": engine}), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        body = {"model": "tiny", "prompt": "The ", "max_tokens": 30, "seed": 3, "temperature": 0.9}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        text = answer.json()["choices"][0]["text"]
        assert text == model.sample(prime="The ", length=30, temperature=0.9, seed=3)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


@pytest.mark.xfail(
    reason="suspected: PyTorch's autocast wrapper of cuDNN's RNN (aten/src/ATen/cudnn/AutocastRNN.cpp) "
    "casts to fp16 whatever the autocast dtype, so --precision bf16 would run the classic cells' "
    "recurrence in fp16, without loss scaling"
)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bf16_autocast_runs_the_classic_cells_in_bf16(cell: str) -> None:
    bf16_or_skip("bf16")
    from charlm.diagnostics.gradients import fresh_model

    model = fresh_model(Cell(cell), 2, 32, 50).cuda().train()
    tokens = torch.randint(0, 50, (16, 4), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output, _ = model.features(tokens)
    assert output.dtype in (torch.bfloat16, torch.float32), output.dtype
