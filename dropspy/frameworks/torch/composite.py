"""Capture inside composites: the RNN layer stack and attention.

These calls draw dropout inside ATen (``nn.LSTM``'s between-layer dropout, the attention
weights' dropout in ``F.multi_head_attention_forward`` / ``F.scaled_dot_product_attention``),
where the function mode cannot see it (it is disabled inside its own handler). The whole call
runs under a :class:`~dropspy.frameworks.torch.grab.Grabber`, and each mask it copies becomes
one entry of its site. Where a fused kernel (cuDNN RNN, flash / memory-efficient attention)
draws the mask itself, the site is declared opaque with the reason.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dropspy.frameworks.torch.grab import Grabber, caller
from dropspy.frameworks.torch.sites import SiteFacts, SiteKey, dropout_scale

if TYPE_CHECKING:
    from dropspy.frameworks.torch.capture import Capture, Frame

_VF = torch._C._VariableFunctions
RNN_FUNCS: dict[Callable[..., Any], str] = {_VF.lstm: "LSTM", _VF.gru: "GRU",
                                             _VF.rnn_tanh: "RNN", _VF.rnn_relu: "RNN"}
_MHA_SIG = inspect.signature(F.multi_head_attention_forward)
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p")


class CompositeHandlers:
    """Handlers for the composites, sharing one :class:`Capture`'s state."""

    def __init__(self, cap: Capture) -> None:
        self.cap = cap

    def mha_while_bypassed(self, frame: Frame, args: tuple) -> None:
        """Record an eval call of ``nn.MultiheadAttention`` taking its fast path."""
        mha: Any = frame.module  # nn.MultiheadAttention, or a module calling its function
        if not mha.dropout or len(args) < 2:
            return
        q, k = args[0], args[1]
        if q.dim() == 3:
            batch, tgt, src = ((q.shape[0], q.shape[1], k.shape[1]) if mha.batch_first
                               else (q.shape[1], q.shape[0], k.shape[0]))
        else:
            batch, tgt, src = 1, q.shape[0], k.shape[0]
        src += (mha.bias_k is not None) + bool(mha.add_zero_attn)
        key = SiteKey(frame.path, "attention", None)
        p = float(mha.dropout)
        self.cap.sites.learn(key, lambda: SiteFacts(
            layer_class=type(mha).__name__, role="attention", rate=p,
            scale=dropout_scale("dropout", p), extra={"layout": "(batch, head, target, source)"}))
        self.cap.add(key, mha.training, (batch, mha.num_heads, tgt, src), None)

    def on_rnn(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``_VF.lstm`` / ``gru`` / ``rnn_*``: one site per gap between stacked layers."""
        frame = self.cap.frame()
        if frame is None:
            return self.cap.call(func, args, kwargs)
        packed = len(args) > 3 and isinstance(args[3], (list, tuple))
        off = 1 if packed else 0
        num_layers, p, train = int(args[4 + off]), float(args[5 + off]), bool(args[6 + off])
        if p == 0.0:
            return self.cap.call(func, args, kwargs)
        x = args[0]
        module = frame.module
        gaps = max(num_layers - 1, 1)
        keys = [SiteKey(frame.path, "between_layers" if gaps == 1 else f"between_layers/{g}",
                        None if isinstance(module, torch.nn.RNNBase) else caller())
                for g in range(gaps)]
        cls = RNN_FUNCS[func]
        opaque = None
        cudnn = x.is_cuda and torch.backends.cudnn.enabled and torch.backends.cudnn.is_acceptable(x)
        if cudnn and num_layers > 1 and self.cap.cudnn_rnn != "exact":
            opaque = ("cuDNN applies the between-layer dropout inside its fused RNN kernel with "
                      "its own random state; the mask cannot be observed")
        for g, key in enumerate(keys):
            extra: dict[str, Any] = {"after_layer": g, "num_layers": num_layers}
            if num_layers == 1:
                extra["never_applied"] = ("num_layers=1: torch applies RNN dropout only between "
                                          "stacked layers")

            def facts(extra: dict[str, Any] = extra) -> SiteFacts:
                return SiteFacts(
                    layer_class=(type(module).__name__ if isinstance(module, torch.nn.RNNBase)
                                 else cls),
                    role="between_layers", rate=p, scale=dropout_scale("dropout", p),
                    opaque=opaque, extra=extra)

            self.cap.sites.learn(key, facts)
        if opaque is not None:
            for key in keys:
                self.cap.sites.resolve(key, 3)  # declared, with the reason; never a record
            return self.cap.call(func, args, kwargs)
        apply = train and num_layers > 1
        if apply and 0.0 < p < 1.0 and x.numel() > 0:
            with Grabber() as g:
                if cudnn:
                    with torch.backends.cudnn.flags(enabled=False):
                        out = self.cap.call(func, args, kwargs)
                else:
                    out = self.cap.call(func, args, kwargs)
            self.cap.log(g.draws)
            if len(g.draws) != len(keys):
                self.cap.unexpected(keys[0], f"{len(g.draws)} masks drawn for {len(keys)} gaps", g)
                return out
            for key, d in zip(keys, g.draws):
                self.cap.add(key, module.training, tuple(d.mask.shape), d.mask)
            frame.drew = True
            return out
        out = self.cap.call(func, args, kwargs)
        shape = _layer_output_shape(out[0], packed, args)
        for key in keys:
            if apply:  # p == 1 zeroes every layer output without drawing
                noise = torch.full(shape, p < 1.0, dtype=torch.bool, device=x.device)
                self.cap.add(key, module.training, shape, noise)
            else:
                self.cap.add(key, module.training, shape, None)
        return out

    def on_mha(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``F.multi_head_attention_forward``: the attention weights' dropout."""
        frame = self.cap.frame()
        if frame is None:
            return self.cap.call(func, args, kwargs)
        bound = _MHA_SIG.bind(*args, **kwargs)
        a = bound.arguments
        p = float(a["dropout_p"])
        if p == 0.0:
            return self.cap.call(func, args, kwargs)
        training = a.get("training", True)
        heads = int(a["num_heads"])
        q, k = a["query"], a["key"]
        batch = q.shape[1] if q.dim() == 3 else 1
        src = k.shape[0] + (a.get("bias_k") is not None) + bool(a.get("add_zero_attn", False))
        shape = (batch, heads, q.shape[0], src)
        return self._attention(frame, func, args, kwargs, p, training, shape, heads)

    def on_sdpa(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``F.scaled_dot_product_attention``: exact on the math path, opaque when fused."""
        frame = self.cap.frame()
        if frame is None:
            return self.cap.call(func, args, kwargs)
        a = dict(zip(_SDPA_NAMES, args))
        a.update(kwargs)
        p = float(a.get("dropout_p", 0.0))
        q, k = a["query"], a["key"]
        try:
            batch = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
        except RuntimeError:  # grouped-query attention: fewer key heads than query heads
            batch = tuple(q.shape[:-2])
        shape = batch + (q.shape[-2], k.shape[-2])
        if p == 0.0:
            key = SiteKey(frame.path, "attention", self._attention_where(frame))
            if self.cap.sites.facts(key) is not None:
                self.cap.add(key, frame.module.training, shape, None)
            return self.cap.call(func, args, kwargs)
        return self._attention(frame, func, args, kwargs, p, True, shape, None)

    def _attention_where(self, frame: Frame) -> str | None:
        own = isinstance(frame.module, torch.nn.MultiheadAttention)
        return None if own else caller()

    def _attention(self, frame: Frame, func: Callable, args: tuple, kwargs: dict, p: float,
                   training: bool, shape: tuple[int, ...], heads: int | None) -> Any:
        module = frame.module
        key = SiteKey(frame.path, "attention", self._attention_where(frame))
        self.cap.sites.learn(key, lambda: SiteFacts(
            layer_class=type(module).__name__, role="attention", rate=p,
            scale=dropout_scale("dropout", p),
            extra={"layout": "(batch, head, target, source)"}))
        if not training:
            out = self.cap.call(func, args, kwargs)
            self.cap.add(key, module.training, shape, None)
            return out
        with Grabber() as g:
            out = self.cap.call(func, args, kwargs)
        self.cap.log(g.draws)
        if not g.draws and g.other_random:
            self._opaque_attention(key, module, p, g.other_random)
            return out
        if len(g.draws) != 1:
            self.cap.unexpected(key, f"{len(g.draws)} masks drawn, expected 1", g)
            return out
        mask = g.draws[0].mask
        if mask.dim() == 3 and heads and mask.shape[0] % heads == 0:
            # The need_weights path drops on (batch * heads, target, source): same elements,
            # same order, recorded with heads split out so every call has one layout.
            mask = mask.reshape(mask.shape[0] // heads, heads, *mask.shape[1:])
        frame.drew = True
        self.cap.add(key, module.training, tuple(mask.shape), mask)
        return out

    def _opaque_attention(self, key: SiteKey, module: torch.nn.Module, p: float,
                          ops: list[str]) -> None:
        okey = SiteKey(key.path, "attention_fused", key.where)
        reason = (f"a fused attention kernel ({', '.join(sorted(set(ops)))}) applies dropout "
                  "inside the kernel; the mask cannot be observed")
        self.cap.sites.learn(okey, lambda: SiteFacts(layer_class=type(module).__name__,
                                                 role="attention", rate=p, opaque=reason))
        self.cap.sites.resolve(okey, 4)


def _layer_output_shape(output: torch.Tensor, packed: bool, args: tuple) -> tuple[int, ...]:
    """Shape of an RNN layer's output as the layer stack sees it (time-major or packed)."""
    if packed:
        return tuple(output.shape)
    batch_first = bool(args[8]) if len(args) > 8 else False
    if output.dim() == 3 and batch_first:
        return (output.shape[1], output.shape[0], output.shape[2])
    if output.dim() == 2:  # unbatched input: ATen adds a batch dim of 1
        return (output.shape[0], 1, output.shape[1])
    return tuple(output.shape)
