"""The recurrent language model: embedding -> stacked LSTM/GRU/RNN, or residual blocks of a
scan cell (:mod:`charlm.model.scan`) -> dropout -> output layer: a (tied) decoder and full softmax,
or an adaptive softmax over frequency-sorted tokens."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from charlm.config import Cell, ModelConfig, Softmax
from charlm.model.scan import ScanStack

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""(layers, B, H) for GRU and RNN; the pair (h, c) of such tensors for LSTM; (layers, B, S) for a
scan cell, S = :attr:`RNNLM.state_size` (its recurrence and its convolution's last inputs)."""

_CELLS: dict[Cell, type[nn.RNNBase]] = {
    Cell.lstm: nn.LSTM,
    Cell.gru: nn.GRU,
    Cell.rnn: nn.RNN,
    Cell.irnn: nn.RNN,
}
# One layer of each cell with weights given as arguments: the op the modules call themselves, so
# a layer with dropped-out recurrent weights runs the same fused kernel (and autocast) as nn.LSTM.
_STEP = {
    Cell.lstm: torch._VF.lstm,
    Cell.gru: torch._VF.gru,
    Cell.rnn: torch._VF.rnn_tanh,
    Cell.irnn: torch._VF.rnn_relu,
}


class RNNLM(nn.Module):
    """A stacked recurrent language model over token ids, time-major like ``nn.LSTM``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        # The stack runs layer by layer while training (see :meth:`_layers`), which applies the
        # dropout between layers itself, so the fused module gets none.
        extra = {"nonlinearity": "relu"} if config.cell is Cell.irnn else {}
        self.rnn: nn.Module
        if config.cell.scan:
            self.rnn = ScanStack(config.hidden, config.layers, config.cell.value, config.mlp.value)
        elif config.residual:  # one module per layer, so each layer's output can take its input
            sizes = [config.embed] + [config.hidden] * (config.layers - 1)
            cell = _CELLS[config.cell]
            self.rnn = nn.ModuleList(cell(size, config.hidden, 1, **extra) for size in sizes)
        else:
            self.rnn = _CELLS[config.cell](config.embed, config.hidden, config.layers, **extra)
        self.decoder: nn.Linear | None = None
        self.head: nn.AdaptiveLogSoftmaxWithLoss | None = None
        if config.softmax is Softmax.adaptive:
            self.head = nn.AdaptiveLogSoftmaxWithLoss(
                config.hidden, config.vocab_size, adaptive_cutoffs(config.vocab_size), div_value=4.0
            )
            # rank[token]: its place by training frequency (the head needs frequent tokens first)
            self.register_buffer("rank", torch.arange(config.vocab_size))
        else:
            self.decoder = nn.Linear(config.hidden, config.vocab_size)
        if config.tie_weights:  # Press & Wolf 2017; ModelConfig checked embed == hidden
            self.decoder.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if self.decoder is not None:
            if not self.config.tie_weights:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)
        if self.config.cell is Cell.lstm:
            self._init_forget_bias(self.config.forget_bias)
        if self.config.cell is Cell.irnn:  # the state is carried unchanged at first: no vanishing
            with torch.no_grad():
                for layer in range(self.config.layers):
                    self.recurrent("weight_hh", layer).copy_(torch.eye(self.config.hidden))
                    self.recurrent("bias_ih", layer).zero_()
                    self.recurrent("bias_hh", layer).zero_()

    def _init_forget_bias(self, value: float) -> None:
        """Start the LSTM remembering (Gers et al. 2000; Jozefowicz et al. 2015).

        PyTorch's gate order is input, forget, cell, output, and the two biases are summed, so the
        forget slice of ``bias_ih`` is set to ``value`` and that of ``bias_hh`` to zero.
        """
        h = self.config.hidden
        with torch.no_grad():
            for layer in range(self.config.layers):
                self.recurrent("bias_ih", layer)[h : 2 * h].fill_(value)
                self.recurrent("bias_hh", layer)[h : 2 * h].zero_()

    def recurrent(self, name: str, layer: int) -> nn.Parameter:
        """The recurrent cell's parameter ``name`` (``weight_ih``, ``weight_hh``, ``bias_ih``,
        ``bias_hh``) of ``layer``, PyTorch's layout, whichever way the layers are held."""
        if isinstance(self.rnn, nn.ModuleList):
            return getattr(self.rnn[layer], f"{name}_l0")
        return getattr(self.rnn, f"{name}_l{layer}")

    @property
    def state_size(self) -> int:
        """Floats of state per layer and stream (h alone; the LSTM has c too)."""
        return self.rnn.state_size if isinstance(self.rnn, ScanStack) else self.config.hidden

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero hidden state for ``batch_size`` streams, on the model's device and dtype."""
        weight = self.embedding.weight
        shape = (self.config.layers, batch_size, self.state_size)
        if self.config.cell is Cell.lstm:
            return (weight.new_zeros(shape), weight.new_zeros(shape))
        return weight.new_zeros(shape)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.embedding.weight.device

    def sort_by_frequency(self, counts: torch.Tensor) -> None:
        """Give the adaptive softmax its token order: ``counts`` (V,) of each token in training."""
        if self.head is not None:
            order = torch.argsort(counts.to(self.rank.device), descending=True, stable=True)
            self.rank[order] = torch.arange(order.numel(), device=self.rank.device)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Locked (variational) dropout of ``x`` (T, B, D) while training: one mask per stream and
        window, the same at every time step (Gal and Ghahramani 2016), so a unit dropped from a
        stream stays dropped for the window instead of flickering step to step; on small corpora
        it regularises better than a fresh mask at each step (Merity et al. 2018)."""
        p = self.config.dropout
        if not self.training or p == 0:
            return x
        mask = x.new_empty(1, *x.shape[1:]).bernoulli_(1 - p) / (1 - p)  # (1, B, D)
        return x * mask

    def features(self, tokens: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """The last layer's output at every position, after dropout: (T, B, H), and the final state.

        Args:
            tokens: (T, B) token ids.
            hidden: state from the previous window, or None for zeros.
        """
        emb = self.drop(self.embedding(tokens))  # (T, B, E)
        if isinstance(self.rnn, ScanStack):
            if hidden is None:
                hidden = self.init_hidden(tokens.size(1))
            output, hidden = self.rnn(emb, hidden)  # (T, B, H), (layers, B, S)
        elif self.training or isinstance(self.rnn, nn.ModuleList):
            output, hidden = self._layers(emb, hidden)
        else:  # inference: the fused module, the same arithmetic without the dropout
            output, hidden = self.rnn(emb, hidden)  # (T, B, H)
        return self.drop(output), hidden

    def _layers(self, x: torch.Tensor, hidden: Hidden | None) -> tuple[torch.Tensor, Hidden]:
        """The stacked layers one by one: locked dropout between them, DropConnect on each
        hidden-to-hidden matrix while training (``weight_drop``: one mask per window, shared by
        every stream and step, as in AWD-LSTM), and with ``residual`` each layer above the first
        adding its input to its output."""
        c = self.config
        lstm = c.cell is Cell.lstm
        if hidden is None:
            hidden = self.init_hidden(x.size(1))
        h0, c0 = hidden if lstm else (hidden, None)  # type: ignore[misc]
        run = _STEP[c.cell]
        hs, cs = [], []
        for i in range(c.layers):
            w_hh = self.recurrent("weight_hh", i)
            if self.training and c.weight_drop > 0:
                w_hh = F.dropout(w_hh, c.weight_drop)  # (G, H)
            weights = [
                self.recurrent("weight_ih", i),
                w_hh,
                self.recurrent("bias_ih", i),
                self.recurrent("bias_hh", i),
            ]
            inputs = x if i == 0 else self.drop(x)
            state = (h0[i : i + 1], c0[i : i + 1]) if lstm else h0[i : i + 1]  # type: ignore[index]
            out, *last = run(inputs, state, weights, True, 1, 0.0, self.training, False, False)  # (T, B, H)
            x = out + inputs if c.residual and i > 0 else out
            hs.append(last[0])
            if lstm:
                cs.append(last[1])
        return x, ((torch.cat(hs), torch.cat(cs)) if lstm else torch.cat(hs))

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """Scores (..., V) of the next token from :meth:`features` output (..., H): logits of the
        full softmax, or the adaptive softmax's log-probabilities (as good as logits to sample)."""
        if self.head is None:
            assert self.decoder is not None
            return self.decoder(output)
        with torch.autocast(output.device.type, enabled=False):
            flat = self.head.log_prob(output.reshape(-1, output.size(-1)).float())  # (N, V) in rank order
        return flat[:, self.rank].view(*output.shape[:-1], -1)  # token order

    def loss(self, output: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy (nats) of ``targets`` (T, B) given :meth:`features` output (T, B, H);
        ``reduction``: "mean" (training), or "sum", which ignores targets of -100 (evaluation
        padding; the adaptive softmax drops them without a device sync only in this case)."""
        flat, targets = output.reshape(-1, output.size(-1)), targets.reshape(-1)  # (N, H), (N,)
        if self.head is None:
            logits = self.logits(flat).float()  # (N, V)
            return F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
        if reduction == "sum":
            keep = targets != -100
            flat, targets = flat[keep], targets[keep]
        with torch.autocast(flat.device.type, enabled=False):  # its index_copy_ mixes dtypes under bf16
            target_logp = self.head(flat.float(), self.rank[targets]).output  # (N,)
        return -target_logp.sum() if reduction == "sum" else -target_logp.mean()

    def forward(
        self, tokens: torch.Tensor, hidden: Hidden | None = None, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Hidden]:
        """Scores for the next token at every position (see :meth:`logits`), or, given
        ``targets``, the mean training loss (through ``forward``, so DistributedDataParallel
        sees the step).

        Args:
            tokens: (T, B) token ids.
            hidden: state from the previous window, or None for zeros.
            targets: (T, B) the next tokens, or None.

        Returns:
            scores (T, B, V), or the loss (a scalar), and the final hidden state.
        """
        output, hidden = self.features(tokens, hidden)  # (T, B, H)
        if targets is not None:
            return self.loss(output, targets), hidden
        return self.logits(output), hidden  # (T, B, V)


def adaptive_cutoffs(vocab_size: int) -> list[int]:
    """Cluster bounds of the adaptive softmax: the most frequent eighth of the vocabulary in the
    head, the next three eighths in a 4x smaller cluster, the rest in a 16x smaller one."""
    return [max(1, vocab_size // 8), max(2, vocab_size // 2)]


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph at a window boundary (truncated BPTT) but keep the values, in fp32 (a bf16
    autocast step returns a bf16 state; the carried state and the checkpoints stay fp32)."""
    if isinstance(hidden, tuple):
        return (hidden[0].detach().float(), hidden[1].detach().float())
    return hidden.detach().float()


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
