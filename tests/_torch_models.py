"""Real-code torch models shared by the tests and ``benchmarks/bench_torch_models.py``.

Each is a small copy of a model shape people train: an ``nn.TransformerEncoder`` language
model, GPT-2 and BERT built from a transformers config (random weights, nothing downloaded),
and an AWD-LSTM language model with its locked, embedding and weight dropout written as the
AWD-LSTM code writes them (``Variable(m, requires_grad=False) / (1 - dropout)``), plus the
other ways real code derives a locked mask from its Bernoulli draw.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Variable

VOCAB = 1000
BATCH = 16
SEQ = 32


# -- nn.TransformerEncoder language model -----------------------------------------------------


class TransformerLM(nn.Module):
    """Embedding + positional dropout + 2-layer ``nn.TransformerEncoder`` (d=64) + head."""

    def __init__(self, d: int = 64, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(self.embed(tokens) + self.pos[: tokens.shape[1]])
        h = self.encoder(h, src_key_padding_mask=padding)
        return self.head(h)


def transformer_lm(seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM().train()


# -- transformers --------------------------------------------------------------------------


def gpt2(attn: str = "eager", seed: int = 0) -> nn.Module:
    """GPT-2 LM head model, 2 layers, n_embd=64, from a config (random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    cfg._attn_implementation = attn
    model = GPT2LMHeadModel(cfg)
    model.config._attn_implementation = attn
    return model.train()


def bert(attn: str = "eager", seed: int = 0) -> nn.Module:
    """BERT masked-LM model, 2 layers, hidden 64, from a config (random weights)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    cfg._attn_implementation = attn
    model = BertForMaskedLM(cfg)
    model.config._attn_implementation = attn
    return model.train()


class HFLogits(nn.Module):
    """Calls a transformers model and returns its logits (the training loops take a tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


# -- AWD-LSTM ------------------------------------------------------------------------------


class LockedDropout(nn.Module):
    """AWD-LSTM's locked dropout, as its code writes it (one mask for every time step)."""

    def forward(self, x: torch.Tensor, dropout: float = 0.5) -> torch.Tensor:
        if not self.training or not dropout:
            return x
        m = x.data.new(1, x.size(1), x.size(2)).bernoulli_(1 - dropout)
        mask = Variable(m, requires_grad=False) / (1 - dropout)
        mask = mask.expand_as(x)
        return mask * x


def _locked_styles() -> dict[str, Any]:
    """The other ways real code derives the applied locked mask from its draw."""

    def data(x: torch.Tensor, p: float) -> torch.Tensor:
        m = torch.empty(1, x.size(1), x.size(2)).bernoulli_(1 - p)
        return x * (m.data / (1 - p))

    def detach(x: torch.Tensor, p: float) -> torch.Tensor:
        m = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p).detach()
        return m.div(1 - p) * x

    def tensor_ctor(x: torch.Tensor, p: float) -> torch.Tensor:
        m = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p)
        return x * torch.Tensor(m) / (1 - p)

    def clone(x: torch.Tensor, p: float) -> torch.Tensor:
        m = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p).clone()
        return x * m / (1 - p)

    def expand_as(x: torch.Tensor, p: float) -> torch.Tensor:
        m = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p)
        return m.expand_as(x) * x / (1 - p)

    def to_dtype(x: torch.Tensor, p: float) -> torch.Tensor:
        m = torch.bernoulli(torch.full((1, x.size(1), x.size(2)), 1 - p, dtype=torch.float64))
        return x * m.to(x.dtype) / (1 - p)

    return {"data": data, "detach": detach, "tensor_ctor": tensor_ctor, "clone": clone,
            "expand_as": expand_as, "to_dtype": to_dtype}


LOCKED_STYLES = _locked_styles()


class StyledLockedDropout(nn.Module):
    """Locked dropout over time-major ``(time, batch, feature)`` in one of LOCKED_STYLES."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def forward(self, x: torch.Tensor, dropout: float = 0.5) -> torch.Tensor:
        if not self.training or not dropout:
            return x
        return LOCKED_STYLES[self.style](x, dropout)


def embedded_dropout(embed: nn.Embedding, words: torch.Tensor, dropout: float = 0.1) -> Any:
    """AWD-LSTM's embedding dropout: drops whole words (rows of the embedding matrix)."""
    if dropout:
        mask = embed.weight.data.new().resize_((embed.weight.size(0), 1)).bernoulli_(
            1 - dropout).expand_as(embed.weight) / (1 - dropout)
        masked_embed_weight = mask * embed.weight
    else:
        masked_embed_weight = embed.weight
    padding_idx = embed.padding_idx
    if padding_idx is None:
        padding_idx = -1
    return F.embedding(words, masked_embed_weight, padding_idx, embed.max_norm,
                       embed.norm_type, embed.scale_grad_by_freq, embed.sparse)


class WeightDrop(nn.Module):
    """DropConnect on an LSTM's hidden-to-hidden weights (AWD-LSTM's WeightDrop)."""

    def __init__(self, module: nn.LSTM, dropout: float) -> None:
        super().__init__()
        self.module = module
        self.dropout = dropout
        w = module.weight_hh_l0
        del module._parameters["weight_hh_l0"]
        self.weight_hh_l0_raw = nn.Parameter(w.data)
        module.weight_hh_l0 = w.data

    def forward(self, x: torch.Tensor, h: Any = None) -> Any:
        w = F.dropout(self.weight_hh_l0_raw, p=self.dropout, training=self.training)
        self.module.weight_hh_l0 = w
        return self.module(x, h)


class AWDLSTM(nn.Module):
    """AWD-LSTM's language model: 3 LSTMs, one LockedDropout module used at four places."""

    def __init__(self, emb: int = 32, hidden: int = 64, layers: int = 3, dropout: float = 0.4,
                 dropouth: float = 0.3, dropouti: float = 0.65, dropoute: float = 0.1,
                 wdrop: float = 0.5, lockdrop: nn.Module | None = None) -> None:
        super().__init__()
        self.lockdrop = lockdrop if lockdrop is not None else LockedDropout()
        self.encoder = nn.Embedding(VOCAB, emb)
        self.rnns = nn.ModuleList([
            WeightDrop(nn.LSTM(emb if i == 0 else hidden, hidden if i < layers - 1 else emb, 1),
                       wdrop)
            for i in range(layers)])
        self.decoder = nn.Linear(emb, VOCAB)
        self.dropout, self.dropouth, self.dropouti, self.dropoute = (dropout, dropouth,
                                                                     dropouti, dropoute)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: (batch, time); AWD's layers are time-major inside."""
        tokens = tokens.t()
        emb = embedded_dropout(self.encoder, tokens,
                               dropout=self.dropoute if self.training else 0)
        emb = self.lockdrop(emb, self.dropouti)
        raw_output = emb
        for i, rnn in enumerate(self.rnns):
            raw_output, _ = rnn(raw_output)
            if i != len(self.rnns) - 1:
                raw_output = self.lockdrop(raw_output, self.dropouth)
        output = self.lockdrop(raw_output, self.dropout)
        return self.decoder(output).transpose(0, 1)


def awd_lstm(seed: int = 0, lockdrop: nn.Module | None = None) -> AWDLSTM:
    torch.manual_seed(seed)
    return AWDLSTM(lockdrop=lockdrop).train()


# -- data and a training step -------------------------------------------------------------


def lm_data(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of (tokens, next tokens), (BATCH, SEQ) each."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, VOCAB, (steps, BATCH, SEQ + 1), generator=g)
    return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seqs]


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor,
            targets: torch.Tensor) -> float:
    """One plain training step: forward, next-token cross entropy, backward, optimizer step."""
    opt.zero_grad(set_to_none=True)
    logits = model(tokens)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()
    opt.step()
    return float(loss.detach())


WORKLOADS = {
    "transformer_encoder": transformer_lm,
    "gpt2_eager": lambda seed=0: HFLogits(gpt2("eager", seed)),
    "gpt2_sdpa": lambda seed=0: HFLogits(gpt2("sdpa", seed)),
    "awd_lstm": awd_lstm,
}


def train_state(model: nn.Module, loop: Any, path: Any = None) -> tuple[list[torch.Tensor],
                                                                         torch.Tensor]:
    """Run ``loop()`` (plain, or inside ``dropspy.record(model, path)`` when a path is given);
    return the model's weights and the global RNG state after it (zero-perturbation tests)."""
    import dropspy

    if path is None:
        loop()
    else:
        with dropspy.record(model, path):
            loop()
    return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()


def count_params(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
