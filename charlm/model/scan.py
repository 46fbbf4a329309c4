"""Gated linear recurrences computed with a parallel scan: minGRU and minLSTM (Feng et al. 2024,
"Were RNNs All We Needed?") in a pre-norm residual block.

The GRU and LSTM of the seeds feed the previous hidden state into their gates, so a window of T
tokens is T dependent small matrix products. Here the gates depend on the input alone, so every
layer is a linear recurrence per channel, ``h_t = a_t * h_{t-1} + b_t``, whose coefficients come
from the whole window in one large product; the recurrence itself is a scan (:func:`linear_scan`).
Sampling runs the same recurrence one token at a time (:meth:`ScanLayer.step`), with a state of a
few kilobytes per stream and O(1) work per token, as for the LSTM.

The block around the recurrence (what makes such models competitive; cf. Hawk, De et al. 2024)::

    x ─┬─ RMSNorm ─ causal depthwise conv ─ Linear ─┬─ gates ── scan ─┐
       │                                            └─ g ─ SiLU ───── * ─ Linear ─┐
       └───────────────────────────────────────────────────────────────────────── + ─> y
    y ─┬─ RMSNorm ─ MLP (4x, squared ReLU) ─┐
       └─────────────────────────────────── + ─>

The state a layer carries from window to window (truncated BPTT) is its recurrence ``h`` and the
convolution's last ``kernel - 1`` inputs, packed into one vector per stream: (B, kernel * width).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from charlm.config import Activation

# The smallest log decay a step may have: a_t >= exp(-5) = 0.0067 (a channel forgets all but 0.7%
# of its past in one step). It bounds the chunked scan's exp(-cumsum) to exp(5 * CHUNK) = exp(80),
# inside float32, so the scan is exact to float rounding without logarithms of the values.
LOG_A_MIN = -5.0
CHUNK = 16
# The convolution's width: each layer sees its input's last 4 tokens before the recurrence.
KERNEL = 4
MLP_RATIO = 4
NORM_EPS = 1e-6


def _chunk_cumsum(x: torch.Tensor) -> torch.Tensor:
    """The running sum of ``x`` (n, C, ...) over its chunk dimension C, float32 in and out.

    On a CPU it is a product with a lower-triangular matrix of ones: PyTorch's CPU ``cumsum`` over
    a dimension that is not the last runs about three times slower than that product, forward and
    backward (a flipped ``cumsum``), and the default model's training step was 3% slower with it.
    On CUDA ``cumsum`` is fast, and where float32 products may be rounded (TF32, or bf16 under
    ``torch.set_float32_matmul_precision``) they are too coarse for sums of values as far apart as
    ``exp(80)``: there it stays ``cumsum``. Autocast is off: the scan stays in float32.
    """
    if x.device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return x.cumsum(1)
    n, C = x.shape[:2]
    with torch.autocast("cpu", enabled=False):
        ones = torch.ones(C, C, dtype=x.dtype, device=x.device).tril_()  # (C, C)
        return torch.matmul(ones, x.reshape(n, C, -1)).view_as(x)


def linear_scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """``h_t = exp(log_a_t) * h_{t-1} + b_t`` for every t at once, in float32.

    Within each chunk of ``CHUNK`` steps, with ``A_t`` the running sum of ``log_a`` since the
    chunk's start, ``h_t = exp(A_t) * (h_start + cumsum_s(exp(-A_s) * b_s))``: cumulative sums and
    elementwise products, no loop over time. The chunks' starting states are then carried along in
    a loop over the T / CHUNK chunks. ``log_a`` is clamped to ``LOG_A_MIN``, so ``exp(-A)`` stays
    finite (the step-by-step recurrence clamps the same way).

    Args:
        log_a: (T, B, D) log of each step's decay, at most 0.
        b: (T, B, D) each step's input.
        h0: (B, D) the state before the window.

    Returns:
        (T, B, D) the state after every step.
    """
    T = b.size(0)
    log_a = log_a.float().clamp(min=LOG_A_MIN)
    b = b.float()
    if T == 1:  # one step (sampling on a GPU, diagnose): the recurrence itself
        return (torch.exp(log_a[0]) * h0.float() + b[0]).unsqueeze(0)
    pad = -T % CHUNK
    if pad:  # padded steps come after the window: their value never reaches a real step
        log_a = F.pad(log_a, (0, 0, 0, 0, 0, pad))
        b = F.pad(b, (0, 0, 0, 0, 0, pad))
    n = log_a.size(0) // CHUNK
    A = _chunk_cumsum(log_a.view(n, CHUNK, *b.shape[1:]))  # (n, C, B, D), in [5 * -C, 0]
    decay = torch.exp(A)  # (n, C, B, D): how much of the chunk's starting state is left
    local = decay * _chunk_cumsum(torch.exp(-A) * b.view_as(A))  # (n, C, B, D) from h = 0
    starts, h = [], h0.float()
    for i in range(n):  # the chunks' starting states, one after the other
        starts.append(h)
        h = decay[i, -1] * h + local[i, -1]
    out = local + decay * torch.stack(starts).unsqueeze(1)  # (n, C, B, D)
    return out.view(n * CHUNK, *b.shape[1:])[:T]


class ScanLayer(nn.Module):
    """One residual block: a gated linear recurrence (``mingru`` or ``minlstm``), then an MLP
    whose nonlinearity is ``mlp``: ``relu2`` (squared ReLU) or ``gelu`` (tanh form).

    minGRU: ``z = sigmoid(k)``, ``h_t = (1 - z) * h_{t-1} + z * c``; minLSTM: ``f, i = sigmoid``,
    normalised to sum to one, ``h_t = f' * h_{t-1} + i' * c``; ``c`` a linear candidate. The
    gradient through time of channel d is the product of its decays ``a_t``: no repeated matrix.
    """

    def __init__(self, width: int, cell: str, mlp: str = "relu2") -> None:
        super().__init__()
        self.width, self.cell, self.mlp = width, cell, Activation(mlp).value  # an unknown one: ValueError
        self.gate_count = 2 if cell == "mingru" else 3  # (z, c) or (f, i, c)
        self.norm = nn.RMSNorm(width, eps=NORM_EPS)
        self.conv_weight = nn.Parameter(torch.zeros(KERNEL, width))  # (K, D): depthwise, causal
        self.conv_bias = nn.Parameter(torch.zeros(width))
        # gates and candidate, and the output gate g: one product
        self.mix = nn.Linear(width, (self.gate_count + 1) * width)
        self.out = nn.Linear(width, width, bias=False)
        self.norm2 = nn.RMSNorm(width, eps=NORM_EPS)
        self.up = nn.Linear(width, MLP_RATIO * width)
        self.down = nn.Linear(MLP_RATIO * width, width)
        self._init()

    def _init(self) -> None:
        with torch.no_grad():
            # the convolution starts as the identity on the current token
            self.conv_weight[-1].fill_(1.0)
            self.conv_weight[:-1].normal_(0, 0.1)
            # decays spread over timescales of 1 to 100 tokens (retention exp(-1/tau) at the start),
            # so some channels remember from the first step, as the LSTM's forget bias does
            D = self.width
            tau = torch.logspace(0, 2, D)[torch.randperm(D)]
            a = torch.exp(-1.0 / tau).clamp(max=0.999)
            bias = self.mix.bias
            bias.zero_()
            if self.cell == "mingru":  # a = 1 - sigmoid(k): k = logit(1 - a)
                bias[:D] = torch.log(1 - a) - torch.log(a)
            else:  # f = sigmoid(logit a), i = 1 - f: f / (f + i) = a
                bias[:D] = torch.log(a) - torch.log(1 - a)
                bias[D : 2 * D] = -bias[:D]
            nn.init.zeros_(self.down.bias)
            # residual branches start small, as GPT-2 scales its projections into the stream
            self.out.weight.mul_(0.5)
            self.down.weight.mul_(0.5)

    @property
    def state_size(self) -> int:
        """Floats per stream this layer carries: h (D) and the convolution's last K - 1 inputs."""
        return KERNEL * self.width

    def coefficients(self, k: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log a, b) of the recurrence from the gate pre-activations ``k`` (..., G - 1, D) and the
        candidate ``c`` (..., D), in float32."""
        k, c = k.float(), c.float()
        if self.cell == "mingru":
            kz = k[..., 0, :]
            return -F.softplus(kz), torch.sigmoid(kz) * c  # log(1 - z), z * c
        diff = F.softplus(-k[..., 0, :]) - F.softplus(-k[..., 1, :])  # log i - log f
        return -F.softplus(diff), torch.sigmoid(diff) * c  # log f', i' * c

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block over a window.

        Args:
            x: (T, B, D) the residual stream.
            state: (B, K * D) the state after the previous window.

        Returns:
            (T, B, D) the stream after the block, and the state after the window (B, K * D).
        """
        D, T = self.width, x.size(0)
        h0, past = state[:, :D], state[:, D:].view(-1, KERNEL - 1, D).transpose(0, 1)  # (B, D), (K-1, B, D)
        u = torch.cat([past.to(x.dtype), self.norm(x)])  # (K - 1 + T, B, D)
        conv = self.conv_bias + sum(self.conv_weight[j] * u[j : j + T] for j in range(KERNEL))  # (T, B, D)
        parts = self.mix(conv).view(T, -1, self.gate_count + 1, D)  # (T, B, G + 1, D)
        log_a, b = self.coefficients(parts[:, :, : self.gate_count - 1], parts[:, :, self.gate_count - 1])
        h = linear_scan(log_a, b, h0)  # (T, B, D) float32
        y = h.to(x.dtype) * F.silu(parts[:, :, self.gate_count])
        x = x + self.out(y)
        m = self.up(self.norm2(x))  # (T, B, 4D)
        x = x + self.down(F.relu(m).square() if self.mlp == "relu2" else F.gelu(m, approximate="tanh"))
        new_past = u[-(KERNEL - 1) :].transpose(0, 1).reshape(-1, (KERNEL - 1) * D)  # (B, (K-1) * D)
        return x, torch.cat([h[-1], new_past.float()], 1)


class ScanStack(nn.Module):
    """``layers`` :class:`ScanLayer` blocks and a final RMSNorm; its state is (layers, B, K * D)."""

    def __init__(self, width: int, layers: int, cell: str, mlp: str = "relu2") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ScanLayer(width, cell, mlp) for _ in range(layers))
        self.norm = nn.RMSNorm(width, eps=NORM_EPS)
        self.state_size = self.blocks[0].state_size

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, B, D) -> (T, B, D), with the state (layers, B, K * D) in and out."""
        states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, state[i])
            states.append(s)
        return self.norm(x), torch.stack(states)
