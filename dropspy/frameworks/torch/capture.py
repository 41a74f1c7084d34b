"""Exact mask capture for torch: a function mode at the dropout entry points, and a short-lived
dispatch mode inside them that copies the mask ATen itself draws.

Why this shape:

- Forward hooks see module boundaries only, and a mask guessed from ``output == 0`` is wrong
  wherever the input was 0. So the mask is taken from the Bernoulli draw itself.
- ATen draws the mask as ``noise.bernoulli_(1 - p)`` and then scales ``noise`` in place; the
  draw is copied (as bool) the moment ``bernoulli_`` returns. On CUDA ``native_dropout``
  returns the mask. Nothing is recomputed and no random number is drawn by dropspy, so the
  random stream and every output stay bit-identical.
- A ``TorchDispatchMode`` left on all the time would send every ATen op through Python; it is
  entered only inside a dropout entry point or a composite that draws dropout inside
  (``nn.LSTM``'s layer stack, ``F.multi_head_attention_forward``,
  ``F.scaled_dot_product_attention``).
  The function mode is disabled inside its own handler, so those composites must be watched
  at dispatch level.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dropspy.frameworks.torch.composite import RNN_FUNCS, CompositeHandlers
from dropspy.frameworks.torch.grab import Draw, Grabber, caller
from dropspy.frameworks.torch.pack import pack_early
from dropspy.frameworks.torch.sites import (
    ALPHA,
    FEATURE,
    SiteFacts,
    SiteKey,
    SiteRegistry,
    alpha_coefficients,
    dropout_scale,
)

_VF = torch._C._VariableFunctions


# Past this many bytes of bool masks held in one step, the held masks are bit-packed at once
# (8x smaller) instead of at the step's end: a long step (big attention masks, gradient
# accumulation) must not double the activation memory dropout already keeps.
PACK_EARLY_BYTES = 256 << 20
_UNSET = object()


class Entry:
    """One call at one site, held until its step ends (the mask stays a torch bool tensor).

    A step that holds too many mask bytes packs them early: ``noise`` becomes a uint8 tensor
    of packed bits and ``noise_shape`` keeps the shape.
    """

    __slots__ = ("key", "training", "shape", "noise", "noise_shape")

    def __init__(self, key: SiteKey, training: bool, shape: tuple[int, ...],
                 noise: torch.Tensor | None) -> None:
        self.key = key
        self.training = training
        self.shape = shape
        self.noise = noise
        self.noise_shape = None if noise is None else tuple(noise.shape)

    def pack_early(self) -> int:
        """Pack the mask in place; returns the bool bytes freed."""
        noise = self.noise
        if noise is None or noise.dtype != torch.bool:
            return 0
        self.noise = pack_early(noise)
        return noise.numel()


class Frame:
    """A module of the recorded model whose ``forward`` is running."""

    __slots__ = ("path", "module", "drew", "bypass", "pushed")

    def __init__(self, path: str, module: torch.nn.Module) -> None:
        self.path = path
        self.module = module
        self.drew = False  # drew a mask during this call
        self.bypass = False  # the function mode stepped aside for this call (eval fast path)
        self.pushed = False  # this top-level call put the function mode on the stack


def _looks_like_dropout(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.dropout._DropoutNd) or (
        "drop" in type(module).__name__.lower())


class _DropoutSpec:
    """How to read one dropout entry point's arguments."""

    __slots__ = ("kind", "train_default", "unbatched_rank")

    def __init__(self, kind: str, train_default: bool | None, unbatched_rank: int | None = None):
        self.kind = kind
        self.train_default = train_default  # None: positional and required (torch.dropout)
        self.unbatched_rank = unbatched_rank  # F.dropout1d/3d add a batch dim of 1 to this rank

    def parse(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, float, bool]:
        x = args[0] if args else kwargs["input"]
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        if len(args) > 2:
            train = args[2]
        else:
            train = kwargs.get("training", kwargs.get("train", self.train_default))
        return x, float(p), bool(train)


def _dropout_specs() -> dict[Callable, _DropoutSpec]:
    specs = {
        F.dropout: _DropoutSpec("dropout", True),
        F.alpha_dropout: _DropoutSpec("alpha_dropout", False),
        F.dropout1d: _DropoutSpec("dropout1d", True, unbatched_rank=2),
        F.dropout2d: _DropoutSpec("dropout2d", True),
        F.dropout3d: _DropoutSpec("dropout3d", True, unbatched_rank=4),
        F.feature_alpha_dropout: _DropoutSpec("feature_alpha_dropout", False),
    }
    for name, kind in (("dropout", "dropout"), ("alpha_dropout", "alpha_dropout"),
                       ("feature_dropout", "feature_dropout"),
                       ("feature_alpha_dropout", "feature_alpha_dropout")):
        for suffix in ("", "_"):
            fn = getattr(_VF, name + suffix, None)
            if fn is not None:
                specs[fn] = _DropoutSpec(kind, None)
    return specs


_DROPOUT_SPECS = _dropout_specs()
_BERNOULLI: set[Callable[..., Any]] = {_VF.bernoulli, torch.Tensor.bernoulli,
                                      torch.Tensor.bernoulli_}
_RANDOM: set[Callable[..., Any]] = {
    _VF.rand, _VF.rand_like, _VF.randn, _VF.randn_like, _VF.randint, _VF.randint_like,
    _VF.normal, _VF.multinomial, _VF.poisson, _VF.randperm,
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_,
    torch.Tensor.log_normal_, torch.Tensor.multinomial,
}
_MUL = {torch.Tensor.mul, torch.Tensor.mul_, _VF.mul, torch.Tensor.multiply,
        torch.Tensor.multiply_, _VF.multiply, torch.Tensor.__mul__, torch.Tensor.__rmul__,
        torch.Tensor.__imul__, torch.Tensor.where, _VF.where, torch.Tensor.masked_fill,
        torch.Tensor.masked_fill_, _VF.masked_fill}
_MODULE_KINDS: dict[type[torch.nn.Module], str] = {
    torch.nn.Dropout: "dropout", torch.nn.Dropout1d: "dropout1d", torch.nn.Dropout2d: "dropout2d",
    torch.nn.Dropout3d: "dropout3d", torch.nn.AlphaDropout: "alpha_dropout",
    torch.nn.FeatureAlphaDropout: "feature_alpha_dropout",
}
# Modules with an inference fast path that a function mode disables (has_torch_function):
# in eval the mode steps aside during their forward, so outputs stay bit-identical.
FAST_PATH_MODULES = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                     torch.nn.TransformerEncoder)
_EXPAND = {torch.Tensor.expand, torch.Tensor.expand_as, _VF.broadcast_to, torch.Tensor.broadcast_to}


class Capture:
    """The capture state one adapter owns: module stack, site registry, entries of a step.

    Args:
        sites: Names and declares sites.
        note: ``Session.note``.
        count_dropped: ``Session.count_dropped``: calls dropspy failed to record are counted
            (cause ``capture_error``), never silently lost.
        cudnn_rnn: ``"opaque"`` (default: cuDNN RNN dropout reported as opaque, training
            untouched) or ``"exact"`` (run those RNN calls without cuDNN so the masks can be
            recorded; this changes the random stream and is announced as a perturbation).
    """

    def __init__(self, sites: SiteRegistry, note: Callable[[str], None],
                 cudnn_rnn: str = "opaque",
                 count_dropped: Callable[[str, int], None] | None = None) -> None:
        self.sites = sites
        self.note = note
        self.count_dropped = count_dropped or (lambda cause, n: None)
        self.cudnn_rnn = cudnn_rnn
        self.stack: list[Frame] = []
        self.capturing = True
        self.entries: list[Entry] = []
        self.applied_in_group = False
        self.draw_log: list[Draw] | None = None  # the RNG audit's view, off by default
        self.taint: dict[int, tuple[weakref.ref, Entry]] = {}
        # Dropout-like modules that make their own masks: path -> {key: last entry}, so a
        # call that draws nothing (eval) is recorded as not applied.
        self.handmade: dict[str, dict[SiteKey, Entry]] = {}
        self.bypassed = 0
        self.bool_bytes = 0  # bytes of bool masks held, unpacked
        self._unpacked: list[Entry] = []
        self._noted: set[str] = set()
        self._called = False
        self._out: Any = _UNSET
        self.handlers: dict[Callable, Callable] = {}
        for fn, spec in _DROPOUT_SPECS.items():
            self.handlers[fn] = self._dropout_handler(spec)
        self.handlers[_VF.native_dropout] = self._on_native_dropout
        for fn in _BERNOULLI:
            self.handlers[fn] = self._on_bernoulli
        self.composites = composites = CompositeHandlers(self)
        for fn in RNN_FUNCS:
            self.handlers[fn] = composites.on_rnn
        self.handlers[F.multi_head_attention_forward] = composites.on_mha
        self.handlers[F.scaled_dot_product_attention] = composites.on_sdpa
        for fn in _RANDOM:
            self.handlers[fn] = self._on_random
        self.handlers = {fn: self.safe(h) for fn, h in self.handlers.items()}

    # -- helpers -----------------------------------------------------------------------------

    def frame(self) -> Frame | None:
        """The innermost running module of the recorded model, if recording applies now."""
        if not self.capturing or not self.stack:
            return None
        if torch._C._current_graph_task_id() != -1:
            return None  # a forward re-run during backward (activation checkpointing)
        return self.stack[-1]

    def note_once(self, tag: str, message: str) -> None:
        """Tell the user ``message`` once per recording."""
        if tag not in self._noted:
            self._noted.add(tag)
            self.note(message)

    def add(self, key: SiteKey, training: bool, shape: tuple[int, ...],
            noise: torch.Tensor | None) -> Entry:
        entry = Entry(key, training, shape, noise)
        self.entries.append(entry)
        if noise is not None:
            self.applied_in_group = True
            self.bool_bytes += noise.numel()
            if key.kind != "bernoulli":  # a hand-made mask may still be reshaped (taint)
                self._unpacked.append(entry)
            if self.bool_bytes > PACK_EARLY_BYTES:
                for e in self._unpacked:
                    self.bool_bytes -= e.pack_early()
                self._unpacked.clear()
        return entry

    def step_done(self) -> None:
        """The held entries were handed over (or dropped): reset the early-packing budget."""
        self.bool_bytes = 0
        self._unpacked.clear()

    def call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Run the framework's own call; marks that it ran and keeps its output."""
        self._called = True
        out = func(*args, **kwargs)
        self._out = out
        return out

    def safe(self, handler: Callable) -> Callable:
        """Wrap a handler so that a dropspy bug never breaks or repeats the user's call.

        If the handler fails before the framework call ran, the call runs untouched; after
        it ran, its output is returned. Either way the user is told, once per handler. An
        exception raised by the framework call itself propagates unchanged.
        """
        def run(func: Callable, args: tuple, kwargs: dict) -> Any:
            self._called, self._out = False, _UNSET
            try:
                return handler(func, args, kwargs)
            except Exception as exc:
                called, out = self._called, self._out
                if called and out is _UNSET:
                    raise  # the framework's own error: not ours to hide
                name = getattr(func, "__name__", str(func))
                self.count_dropped("capture_error", 1)
                self.note_once(f"error:{name}", f"internal error while recording {name} "
                               f"({type(exc).__name__}: {exc}); such calls are not recorded "
                               f"(counted as dropped: capture_error)")
                return out if called else func(*args, **kwargs)
        return run

    def log(self, draws: list[Draw]) -> None:
        if self.draw_log is not None:
            self.draw_log.extend(draws)

    # -- the dropout family ------------------------------------------------------------------

    def _dropout_handler(self, spec: _DropoutSpec) -> Callable:
        def handler(func: Callable, args: tuple, kwargs: dict) -> Any:
            frame = self.frame()
            if frame is None:
                return self.call(func, args, kwargs)
            return self._on_dropout(spec, frame, func, args, kwargs)
        return handler

    def _on_dropout(self, spec: _DropoutSpec, frame: Frame, func: Callable, args: tuple,
                    kwargs: dict) -> Any:
        x, p, train = spec.parse(args, kwargs)
        shape = tuple(x.shape)
        if spec.unbatched_rank is not None and len(shape) == spec.unbatched_rank:
            shape = (1,) + shape  # F.dropout1d/3d unsqueeze unbatched input; ATen sees this
        module = frame.module
        own = isinstance(module, torch.nn.modules.dropout._DropoutNd)
        key = SiteKey(frame.path, spec.kind, None if own else caller())
        self.sites.learn(key, lambda: self._dropout_facts(spec.kind, module, p, own))
        facts = self.sites.known(key)
        if facts.rate != p:
            # A site's description is fixed at first use; a scheduled rate is said, not hidden.
            self.note_once(f"rate:{key}", f"{frame.path or type(module).__name__}: dropout rate "
                           f"changed from {facts.rate} to {p} while recording; the site's "
                           f"configured rate is the first one, the masks are the real ones")
        if isinstance(x, torch.nn.Parameter):
            _mark_parameter(self.sites.facts(key), x.dim())
        if not train:
            out = self.call(func, args, kwargs)
            self.add(key, module.training, shape, None)
            return out
        if 0.0 < p < 1.0 and x.numel() > 0:
            with Grabber() as g:
                out = self.call(func, args, kwargs)
            self.log(g.draws)
            if len(g.draws) != 1:
                self.unexpected(key, f"{len(g.draws)} masks drawn, expected 1", g)
                return out
            noise = g.draws[0].mask
        else:
            # p == 0 keeps everything and p == 1 drops everything without any draw.
            out = self.call(func, args, kwargs)
            nshape = shape if spec.kind not in FEATURE else shape[:2] + (1,) * (len(shape) - 2)
            noise = torch.full(nshape, p < 1.0, dtype=torch.bool, device=x.device)
        if noise.dim() < len(shape):
            noise = noise.reshape((1,) * (len(shape) - noise.dim()) + tuple(noise.shape))
        frame.drew = True
        self.add(key, module.training, shape, noise)
        return out

    def _dropout_facts(self, kind: str, module: torch.nn.Module, p: float, own: bool) -> SiteFacts:
        extra: dict[str, Any] = {}
        if kind in ALPHA:
            extra["alpha_dropout"] = alpha_coefficients(p)
        return SiteFacts(layer_class=type(module).__name__, role="output", rate=p, own=own,
                         scale=dropout_scale(kind, p), extra=extra)

    def _on_native_dropout(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        frame = self.frame()
        out = self.call(func, args, kwargs)
        if frame is None:
            return out
        x = args[0] if args else kwargs["input"]
        p = float(args[1] if len(args) > 1 else kwargs["p"])
        train = args[2] if len(args) > 2 else kwargs.get("train")
        key = SiteKey(frame.path, "native_dropout", caller())
        self.sites.learn(key, lambda: self._dropout_facts("dropout", frame.module, p, False))
        noise = out[1].clone() if train is not False else None
        self.add(key, frame.module.training, tuple(x.shape), noise)
        return out

    def unexpected(self, key: SiteKey, what: str, grabber: Grabber | None = None) -> None:
        if grabber is not None and grabber.error:
            what += f" (copying the mask failed: {grabber.error})"
        self.count_dropped("capture_error", 1)
        self.note_once(f"unexpected:{key}", f"site {key.path or '<root>'} ({key.kind}): {what}; "
                       "this call is not recorded (counted as dropped: capture_error)")

    # -- hand-made masks -----------------------------------------------------------------------

    def _on_bernoulli(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        frame = self.frame()
        out = self.call(func, args, kwargs)
        if frame is None:
            return out
        mask = out != 0
        if func is torch.Tensor.bernoulli_:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        else:
            p = args[1] if len(args) > 1 else kwargs.get("p", args[0] if args else kwargs["input"])
        module = frame.module
        key = SiteKey(frame.path, "bernoulli", caller())
        self.sites.learn(key, lambda: SiteFacts(
            layer_class=type(module).__name__, role="custom", rate=_rate_of(p),
            own=_looks_like_dropout(module),
            extra={"mask_source": "bernoulli draw, 1 = kept; applied shape from the first "
                   "multiplication by the mask"}))
        self.log([Draw(func.__name__, mask, p, out.dtype)])
        frame.drew = True
        entry = self.add(key, module.training, tuple(mask.shape), mask)
        self.taint[id(out)] = (weakref.ref(out), entry)
        if self.sites.known(key).own:
            self.handmade.setdefault(frame.path, {})[key] = entry
        return out

    def propagate(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        """Follow a hand-made mask to the multiplication that applies it (its applied shape)."""
        tainted: Entry | None = None
        source: torch.Tensor | None = None
        others: list[torch.Tensor] = []
        for a in args:
            if isinstance(a, torch.Tensor):
                hit = self.taint.get(id(a))
                if hit is not None and hit[0]() is a:
                    tainted, source = hit[1], a
                else:
                    others.append(a)
        if tainted is None or tainted.noise is None or source is None:
            return  # a tainted tensor always has its hand-made mask and source
        noise = tainted.noise
        if func in _MUL and any(o.numel() > 1 for o in others):
            # Multiplying by data (not by a scale held in a tensor) applies the mask.
            shape = torch.broadcast_shapes(tainted.shape, *(o.shape for o in others))
            shape = tuple(shape)
            if len(shape) > noise.dim():
                tainted.noise = noise.reshape(
                    (1,) * (len(shape) - noise.dim()) + tuple(noise.shape))
                tainted.noise_shape = tuple(tainted.noise.shape)
            tainted.shape = shape
            if any(isinstance(o, torch.nn.Parameter) for o in others):
                _mark_parameter(self.sites.facts(tainted.key), len(shape))
            for k in [k for k, (_, e) in self.taint.items() if e is tainted]:
                del self.taint[k]
            return
        if isinstance(out, torch.Tensor):
            # Elementwise ops, views and expand keep the mask's values; anything else that
            # changes the element count (indexing, reductions) is not the mask any more.
            if out.numel() == source.numel() or func in _EXPAND:
                self.taint[id(out)] = (weakref.ref(out), tainted)

    def end_module(self, frame: Frame) -> None:
        """Close one module call: eval calls of hand-made dropout, taint of finished forwards."""
        if self.handmade and not frame.drew and self.capturing:
            known = self.handmade.get(frame.path)
            if known:
                for key, last in known.items():
                    self.add(key, frame.module.training, last.shape, None)
        if self.taint and not self.stack:
            self.taint.clear()

    def module_while_bypassed(self, frame: Frame, args: tuple) -> None:
        """Record an eval call of a dropout module that the mode cannot see (fast path)."""
        module = frame.module
        kind = _MODULE_KINDS.get(type(module))
        if kind is None or not args or not isinstance(args[0], torch.Tensor):
            return
        shape = tuple(args[0].shape)
        if kind in ("dropout1d", "dropout3d") and len(shape) == (2 if kind == "dropout1d" else 4):
            shape = (1,) + shape
        key = SiteKey(frame.path, kind, None)
        p = float(cast("torch.nn.modules.dropout._DropoutNd", module).p)  # a _MODULE_KINDS class
        self.sites.learn(key, lambda: self._dropout_facts(kind, module, p, True))
        self.add(key, module.training, shape, None)

    # -- random draws that are not masks -------------------------------------------------------

    def _on_random(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        frame = self.frame()
        if frame is not None and _looks_like_dropout(frame.module):
            module = frame.module
            name = getattr(func, "__name__", str(func))
            key = SiteKey(frame.path, "untracked", caller())
            if self.sites.facts(key) is None:
                reason = (f"{type(module).__name__} draws random numbers with {name}, which "
                          "dropspy cannot turn into a mask (only Bernoulli draws and torch's "
                          "dropout calls are recorded)")
                self.sites.learn(key, lambda: SiteFacts(
                    layer_class=type(module).__name__, role="custom", rate=None, opaque=reason))
                name_ = self.sites.resolve(key, 1)
                self.note(f"untracked random draw at {name_ or frame.path}: {reason}")
        return self.call(func, args, kwargs)


def _mark_parameter(facts: SiteFacts | None, rank: int) -> None:
    """A mask applied to a parameter (weight dropout, DropConnect, embedding dropout).

    Its axes are the weight's, not (batch, feature): they are left unnamed. Takes effect
    if the site is not declared yet (a site's description is fixed at first use).
    """
    if facts is None or facts.extra.get("applied_to") == "parameter":
        return
    facts.role = "custom"
    facts.layout = tuple(f"axis{i}" for i in range(rank))
    facts.extra["applied_to"] = "parameter"


def _rate_of(p: Any) -> float | None:
    """Drop rate from a Bernoulli keep-probability (a float, or a constant tensor)."""
    if isinstance(p, (int, float)):
        return 1.0 - float(p)
    if isinstance(p, torch.Tensor) and p.numel() > 0:
        flat = p.reshape(-1)
        if bool((flat == flat[0]).all()):
            return 1.0 - float(flat[0])
    return None


class FunctionMode(TorchFunctionMode):
    """Routes the dropout entry points to :class:`Capture`; every other call passes through."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture
        self.handlers = capture.handlers
        self.dead = False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if kwargs is None:
            kwargs = {}
        if self.dead:
            return func(*args, **kwargs)
        handler = self.handlers.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        out = func(*args, **kwargs)
        if self.capture.taint:
            self.capture.propagate(func, args, kwargs, out)
        return out
