"""One token at a time, fast, on the CPU: the recurrence of a trained :class:`RNNLM` as a few
prepacked matrix products and NumPy gate math.

Calling ``nn.LSTM`` once per generated token pays its whole set-up (weight checks, workspace,
the fused-kernel launch, autograd bookkeeping) for a single time step, many times the arithmetic
of that step (the docs' Speed page, docs/benchmarks/speed.md, has the figures: sampling one stream
against ``nn.LSTM`` called per token). So :class:`Stepper` keeps the weights in the layout one
step needs and does only that arithmetic:

- the first layer's input projection is a lookup: ``embedding @ W_ih0.T + b_ih0`` is precomputed
  as a (V, gates) table, so a token costs one row read instead of a matrix product;
- above the first layer, the input and recurrent products of an LSTM or RNN are one product of
  [x, h] with [W_ih | W_hh];
- the products of large weights (and of all weights on a CPU with AVX-512) go through oneDNN
  with the weights reordered once into its blocked layout (:class:`Linear`). A plain product
  repacks the weights on every call, so NumPy's (OpenBLAS) product of two rows of a large weight
  costs several times that of one, while the prepacked one grows far more slowly with the rows;
  a row alone goes through NumPy, faster there, and so do small weights on a CPU without AVX-512,
  where oneDNN's call costs more than their arithmetic (the timings are in
  docs/benchmarks/speed.md, "Evaluation and sampling"). A row's result is bit for bit the same
  whatever other rows share a prepacked product, while OpenBLAS's may move in the last bits with
  the rows beside it; both are within float rounding of the row's result alone;
- the gate math follows PyTorch's own definitions of LSTM, GRU and tanh RNN, so the
  probabilities equal ``nn.LSTM``'s to float rounding (a test holds them to 1e-5).

It steps B streams at once, so many samples cost little more than one. It is CPU-only: on CUDA a
step is bound by kernel launches, and :func:`charlm.generation.sampling.generate` calls the module (cuDNN).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from charlm.config import Cell
from charlm.model import scan
from charlm.model.network import RNNLM, Hidden

Array = np.ndarray

# The batch size oneDNN lays the packed weights out for. Any number of rows may be multiplied;
# packed for 32, 32 rows cost a small multiple of one row, and less than NumPy's product of them
# (docs/benchmarks/speed.md, "Evaluation and sampling").
_PACKED_FOR = 32
# On a CPU without AVX-512, weights of fewer numbers than this (4 MB of float32) multiply faster
# through NumPy than through oneDNN's prepacked product up to 32 rows, and about as fast beyond:
# oneDNN's call costs tens of microseconds there, a 192-wide product's whole arithmetic a few
# (docs/benchmarks/speed.md, "Evaluation and sampling").
_PACK_FROM = 1 << 20


def prepacks(weight: Array) -> bool:
    """Whether :class:`Linear` multiplies two rows or more of ``weight`` through oneDNN's
    prepacked product (else NumPy's): where the CPU has AVX-512 (measured there), or the weight is
    large (:data:`_PACK_FROM`)."""
    return weight.size >= _PACK_FROM or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _sigmoid(x: Array) -> Array:
    """sigmoid(x) = (1 + tanh(x / 2)) / 2, in place: NumPy has tanh but no sigmoid."""
    x *= 0.5
    np.tanh(x, out=x)
    x += 1.0
    x *= 0.5
    return x


class Linear:
    """``x @ weight.T + bias`` for a fixed ``weight`` (out, in), float32, for any number of rows.

    Two rows or more go through oneDNN with the weights reordered once into its blocked layout
    (the prepacked product PyTorch's own CPU inference compiler uses) where :func:`prepacks`
    says so, or ``packed`` is true; where oneDNN is missing or its product disagrees with NumPy's
    on a check at construction (a PyTorch built without it, another CPU), and for a single row,
    the product is NumPy's.
    """

    def __init__(self, weight: Array, bias: Array | None, packed: bool | None = None) -> None:
        # (in, out), a copy: NumPy's one-row product is twice as fast on this layout as on W.T
        self.weight_t = np.ascontiguousarray(weight.T, dtype=np.float32)
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self._packed: tuple[torch.Tensor, torch.Tensor | None] | None = None  # weights, bias
        if not (prepacks(weight) if packed is None else packed):
            return
        try:
            w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
            b = None if self.bias is None else torch.from_numpy(self.bias)
            self._packed = (torch.ops.mkldnn._reorder_linear_weight(w, _PACKED_FOR), b)
            probe = np.random.default_rng(0).standard_normal((3, w.shape[1]), dtype=np.float32)
            if not np.allclose(self(probe), self._numpy(probe), rtol=1e-4, atol=1e-4):
                self._packed = None
        except (AttributeError, TypeError, RuntimeError, NotImplementedError):  # a private op: it may change
            self._packed = None

    @property
    def packed(self) -> bool:
        """Whether the product is oneDNN's prepacked one (else NumPy's)."""
        return self._packed is not None

    def __call__(self, x: Array) -> Array:
        """(B, out) float32, a new array, for ``x`` (B, in) float32. One row goes through NumPy's
        matrix-vector product, the faster of the two for a single row (docs/benchmarks/speed.md,
        "Evaluation and sampling", says which products each number of streams takes)."""
        if self._packed is None or x.shape[0] == 1:
            return self._numpy(x)
        packed, bias = self._packed
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return out.numpy()

    def _numpy(self, x: Array) -> Array:
        out = x @ self.weight_t
        if self.bias is not None:
            out += self.bias
        return out


def _numpy(t: torch.Tensor) -> Array:
    return t.detach().float().cpu().numpy()


_A_MIN = float(np.exp(np.float32(scan.LOG_A_MIN)))
_GELU_SCALE = math.sqrt(2.0 / math.pi)  # a NumPy float64 scalar would turn float32 arrays to float64


def _rms_norm(x: Array, weight: Array | None = None) -> Array:
    """``nn.RMSNorm`` of ``x`` (B, D), a new array. Written as few NumPy calls as it can be: at one
    row, each call's overhead (about a microsecond) costs more than its arithmetic."""
    scale = np.add.reduce(x * x, 1, keepdims=True)  # (B, 1)
    scale *= 1.0 / x.shape[1]
    scale += scan.NORM_EPS
    np.sqrt(scale, out=scale)
    out = x / scale
    if weight is not None:
        out *= weight
    return out


def _softplus(x: Array) -> Array:
    """log(1 + exp(x)), without overflow."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


class _ScanBlock:
    """One :class:`~charlm.model.scan.ScanLayer` for one time step: the convolution reads its last
    K - 1 inputs from the state, the recurrence is ``h = a * h + b``, as the scan computes it.

    One stream's step is a few small products and some thirty elementwise operations on vectors of
    a few hundred floats, so the NumPy calls, not the arithmetic, set its time. The weights are
    laid out so that fewer calls are needed: the mixing product's outputs are reordered to
    (gates, output gate, candidate), so that a minGRU's update gate and output gate take one
    tanh; a minGRU's convolution bias and the halving its sigmoids take are folded into that
    product, and a GELU's factor 1/2 into the product after it.
    """

    def __init__(self, block: scan.ScanLayer) -> None:
        D, G = block.width, block.gate_count
        self.width, self.gates = D, G
        self.mingru = block.cell == "mingru"
        self.norm = _numpy(block.norm.weight)
        self.conv = _numpy(block.conv_weight)  # (K, D)
        self.conv1 = np.ascontiguousarray(self.conv.reshape(-1))  # (K * D,): for one row
        self.conv_bias: Array | None = _numpy(block.conv_bias)  # (D,)
        # the module's mix rows are (gates, candidate, output gate); here (gates, output gate, candidate)
        order = np.r_[0 : (G - 1) * D, G * D : (G + 1) * D, (G - 1) * D : G * D]
        weight, bias = _numpy(block.mix.weight)[order], _numpy(block.mix.bias)[order]
        if self.mingru:
            # mix(conv + b_conv) = mix(conv) + W b_conv; and every row is halved, since
            # sigmoid(v) = (1 + tanh(v / 2)) / 2 and SiLU(v) = v / 2 * (1 + tanh(v / 2))
            weight, bias = 0.5 * weight, 0.5 * (bias + weight @ self.conv_bias)
            self.conv_bias = None
        self.mix = Linear(weight, bias)
        self.out = Linear(_numpy(block.out.weight), None)
        # the MLP's norm weight is folded into its first product: W (n(x) * w) = (W * w) n(x)
        self.up = Linear(_numpy(block.up.weight) * _numpy(block.norm2.weight), _numpy(block.up.bias))
        self.gelu = block.mlp == "gelu"
        half = 0.5 if self.gelu else 1.0  # GELU's 1/2
        self.down = Linear(_numpy(block.down.weight) * half, _numpy(block.down.bias))

    def one(self, x: Array, state: Array) -> tuple[Array, Array]:
        """:meth:`__call__` for one stream: ``x`` (D,) and ``state`` (K * D,), neither changed;
        the stream after the block (D,) and the new state (K * D,).

        The same arithmetic in fewer NumPy calls, since at one row each call costs more than its
        arithmetic: vectors instead of (1, D) matrices (NumPy's matrix-vector product is faster
        than its (1, n) matrix product) and the norms' scales as Python floats."""
        D, dot = self.width, np.dot
        u = self.norm * (1.0 / math.sqrt(float(dot(x, x)) / D + scan.NORM_EPS))
        u *= x  # (D,): RMSNorm(x)
        window = np.concatenate((state[D:], u))  # (K * D,): the last K inputs, oldest first
        conv = np.add.reduce((window * self.conv1).reshape(scan.KERNEL, D), 0)  # (D,)
        if self.conv_bias is not None:  # (a minGRU's is in the mixing product)
            conv += self.conv_bias
        parts = dot(conv, self.mix.weight_t)  # ((G + 1) D,): gates, output gate g, candidate c
        parts += self.mix.bias
        h, out = self._recurrence(parts, state[:D])  # (D,), (D,)
        x = x + dot(out, self.out.weight_t)
        # the MLP's norm: its weight is in up's product, its scale multiplies the product
        m = dot(x, self.up.weight_t)  # (4D,)
        m *= 1.0 / math.sqrt(float(dot(x, x)) / D + scan.NORM_EPS)
        m += self.up.bias
        x += dot(self._activation(m), self.down.weight_t)
        x += self.down.bias
        window[:D] = h
        return x, window

    def _recurrence(self, parts: Array, h: Array) -> tuple[Array, Array]:
        """The new state h and the gated output SiLU(g) * h, (..., D) each, from the mixing
        product's ``parts`` (..., (G + 1) D: gates, output gate g, candidate c) and the state
        ``h`` (..., D) before the step (not changed); one stream's vectors or B rows alike."""
        D, G = self.width, self.gates
        if self.mingru:  # halved: k / 2, g / 2, c / 2 (k: the update gate's input)
            t = np.tanh(parts[..., : 2 * D])  # (..., 2D): tanh(k / 2), tanh(g / 2)
            a = t[..., :D] * -0.5
            a += 0.5  # a = 1 - sigmoid(k), clamped as the scan clamps log a
            np.maximum(a, _A_MIN, out=a)
            t += 1.0
            gate = t[..., :D]
            gate *= parts[..., 2 * D :]  # (1 + tanh(k / 2)) * c / 2 = sigmoid(k) * c
            out = t[..., D:]
            out *= parts[..., D : 2 * D]  # (1 + tanh(g / 2)) * g / 2 = SiLU(g)
        else:  # minLSTM
            diff = _softplus(-parts[..., :D]) - _softplus(-parts[..., D : 2 * D])  # log i - log f
            a, gate = np.exp(np.maximum(-_softplus(diff), scan.LOG_A_MIN)), _sigmoid(diff)
            gate *= parts[..., G * D :]  # gate * c
            g = parts[..., (G - 1) * D : G * D]
            out = _sigmoid(g.copy())
            out *= g  # SiLU(g)
        a *= h
        a += gate  # a * h + gate * c
        out *= a
        return a, out

    def _activation(self, m: Array) -> Array:
        """The MLP's activation of ``m``, in place."""
        if self.gelu:  # tanh form; its 1/2 is in down's weights
            inner = m * m  # (no m**3: NumPy's float power is far slower than two products)
            inner *= 0.044715 * _GELU_SCALE
            inner += _GELU_SCALE  # Python floats: the arrays stay float32
            inner *= m
            np.tanh(inner, out=inner)
            inner += 1.0
            m *= inner
        else:  # squared ReLU
            np.maximum(m, 0.0, out=m)
            m *= m
        return m

    def __call__(self, x: Array, state: Array) -> tuple[Array, Array]:
        """The stream (B, D) after the block and the new state (B, K * D), from ``x`` (B, D)."""
        D, K = self.width, scan.KERNEL
        rows = x.shape[0]
        u = _rms_norm(x, self.norm)  # (B, D)
        # the inputs of the last K steps, oldest first: the state's K - 1 and this one. Its tail is
        # the next state's, and h goes into its head below.
        window = np.concatenate([state[:, D:], u], 1)  # (B, K * D)
        conv = np.add.reduce(window.reshape(rows, K, D) * self.conv, 1)  # (B, D)
        if self.conv_bias is not None:  # (a minGRU's is in the mixing product)
            conv += self.conv_bias
        parts = self.mix(conv)  # (B, (G + 1) * D): gates, output gate g, candidate c
        h, sig_g = self._recurrence(parts, state[:, :D])  # (B, D), (B, D)
        x = x + self.out(sig_g)
        m = self.up(_rms_norm(x))  # (B, 4D)
        x += self.down(self._activation(m))
        window[:, :D] = h
        return x, window


class Stepper:
    """The recurrence of ``model`` for one time step of B streams (inference, CPU, float32).

    State is a list, one entry per layer: (h, c) pairs of (B, H) arrays for LSTM, (B, S) arrays
    otherwise (h, or a scan cell's packed state).
    """

    @torch.no_grad()
    def __init__(self, model: RNNLM) -> None:
        config = model.config
        self.residual = config.residual
        self.cell, self.layers, self.hidden = config.cell, config.layers, config.hidden
        self.state_size = model.state_size
        self.model = model
        self.full = model.decoder is not None  # else the adaptive softmax: through the module
        # a scan model's final norm weight: folded into the decoder, W (n(x) * w) = (W * w) n(x)
        self.final_norm: Array | None = _numpy(model.rnn.norm.weight) if config.cell.scan else None
        if model.decoder is not None:
            weight = _numpy(model.decoder.weight)  # (V, H)
            if self.final_norm is not None:
                weight = weight * self.final_norm
            self.output = Linear(weight, _numpy(model.decoder.bias))
            self.final_norm = None
        if config.cell.scan:
            self.table = _numpy(model.embedding.weight)  # (V, D)
            self.blocks = [_ScanBlock(block) for block in model.rnn.blocks]
            return

        def weights(name: str) -> list[Array]:
            return [model.recurrent(name, i).detach().float().cpu().numpy() for i in range(self.layers)]

        w_ih, w_hh = weights("weight_ih"), weights("weight_hh")  # (G, in), (G, H)
        b_ih, b_hh = weights("bias_ih"), weights("bias_hh")  # (G,)
        embedding = model.embedding.weight.detach().float().cpu().numpy()  # (V, E)
        # (V, G): the first layer's input gates for every token, bias included
        self.table = embedding @ w_ih[0].T + b_ih[0]
        # A layer above the first takes [x, h] against [W_ih | W_hh] in one product (LSTM, RNN);
        # GRU keeps them apart, since its reset gate multiplies the recurrent half alone.
        self.fused = self.cell is not Cell.gru
        # layer 0's input is the table; above it, x (and h where fused) against W_ih (| W_hh)
        self.input = [None] + [
            Linear(np.concatenate([w_ih[i], w_hh[i]], 1), b_ih[i] + b_hh[i]) if self.fused
            else Linear(w_ih[i], b_ih[i])
            for i in range(1, self.layers)
        ]  # fmt: skip
        # the recurrent half alone: layer 0 of a fused cell, every layer of a GRU
        self.recurrent = [
            Linear(w_hh[i], b_hh[i]) if i == 0 or not self.fused else None for i in range(self.layers)
        ]

    def state_from(self, hidden: Hidden) -> list:
        """Convert ``nn.LSTM``-style hidden state ((layers, B, H), or a pair) to a Stepper state."""

        def arr(t: torch.Tensor) -> Array:
            return t.detach().float().cpu().numpy().copy()

        if self.cell is Cell.lstm:
            h, c = hidden  # type: ignore[misc]
            return [(arr(h[i]), arr(c[i])) for i in range(self.layers)]
        return [arr(hidden[i]) for i in range(self.layers)]  # type: ignore[index]

    def zero_state(self, rows: int) -> list:
        """The state of ``rows`` streams that have read nothing: zeros, as ``nn.LSTM`` starts."""
        shape = (rows, self.state_size)
        if self.cell is Cell.lstm:
            return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.layers)]
        return [np.zeros(shape, np.float32) for _ in range(self.layers)]

    def step(self, tokens: Array, state: list) -> tuple[Array, list]:
        """Logits (B, V) for the token after ``tokens`` (B,) of ids, and the new state."""
        if self.cell.scan:
            return self._scan_step(tokens, state)
        H = self.hidden
        x = self.table  # replaced by each layer's output
        new_state = []
        for i in range(self.layers):
            h_prev = state[i][0] if self.cell is Cell.lstm else state[i]  # (B, H)
            if i == 0:
                gi = self.table[tokens]  # (B, G), a copy
                if self.fused:
                    gi += self.recurrent[0](h_prev)
            elif self.fused:
                gi = self.input[i](np.concatenate([x, h_prev], 1))  # (B, G): all gates
            else:
                gi = self.input[i](x)  # (B, 3H): the input half of the gates
            if self.cell is Cell.lstm:  # PyTorch's gate order: input, forget, cell, output
                cand = np.tanh(gi[:, 2 * H : 3 * H])
                _sigmoid(gi)  # all four; the cell slice is not used
                c = gi[:, H : 2 * H] * state[i][1] + gi[:, :H] * cand
                h = gi[:, 3 * H :] * np.tanh(c)
                new_state.append((h, c))
            elif self.cell is Cell.gru:  # order: reset, update, new
                gh = self.recurrent[i](h_prev)  # (B, 3H)
                gates = _sigmoid(gi[:, : 2 * H] + gh[:, : 2 * H])  # reset, update
                cand = np.tanh(gi[:, 2 * H :] + gates[:, :H] * gh[:, 2 * H :])
                update = gates[:, H:]
                h = (1.0 - update) * cand + update * h_prev
                new_state.append(h)
            elif self.cell is Cell.irnn:
                h = np.maximum(gi, 0.0)  # (B, H): ReLU
                new_state.append(h)
            else:
                h = np.tanh(gi)  # (B, H)
                new_state.append(h)
            x = h + x if self.residual and i > 0 else h  # the residual connection adds the input
        return self._scores(x), new_state

    def _scan_step(self, tokens: Array, state: list) -> tuple[Array, list]:
        if tokens.shape[0] == 1 and self.full:  # one stream: vectors (see _ScanBlock.one)
            x = self.table[tokens[0]]  # (D,), a view: one() changes neither x nor state
            new_state = []
            for block, s in zip(self.blocks, state, strict=True):
                x, s = block.one(x, s[0])
                new_state.append(s[None])  # (1, K * D)
            logits = np.dot(x, self.output.weight_t)  # (V,), the final norm's weight in it
            logits *= 1.0 / math.sqrt(float(np.dot(x, x)) / x.shape[0] + scan.NORM_EPS)
            logits += self.output.bias
            return logits[None], new_state
        x = self.table[tokens]  # (B, D), a copy
        new_state = []
        for block, s in zip(self.blocks, state, strict=True):
            x, s = block(x, s)
            new_state.append(s)
        return self._scores(_rms_norm(x, self.final_norm)), new_state

    def _scores(self, x: Array) -> Array:
        """Logits (B, V) from the last layer's output ``x`` (B, H)."""
        if not self.full:
            with torch.no_grad():
                return self.model.logits(torch.from_numpy(x)).numpy()
        return self.output(x)
