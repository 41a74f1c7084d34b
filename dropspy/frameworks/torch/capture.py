"""Exact mask capture for torch: what a dropout call was, where in the model, which use.

The kernels (``kernels.py``) hand every mask torch draws to :class:`Capture`; the capture finds
where the call was made by reading the Python stack once per dropout call (never per module
call: module hooks cost a few microseconds per call and turn off ``TransformerEncoderLayer``'s
fast path), and holds an :class:`Entry` per call until the step ends.

Where a call was made: the innermost frame on the stack that runs the ``forward`` of a module of
the recorded model is the module; the first frame outside torch and dropspy below it is the
call (``where``, for a functional call in a user's ``forward``), and the first such frame
above it is the line that called the module (its **use**: one module called from several lines
is several sites, AWD-LSTM's one ``LockedDropout`` at four places).

Hand-made masks (``bernoulli_`` in a user's code) are followed to the multiplication that
applies them, which gives the applied shape (a locked mask ``(1, B, H)`` applied to
``(T, B, H)``). Real code derives the applied mask in ways no function call shows
(``Variable(m)``, ``m.data``, ``torch.Tensor(m)``), so the mask is followed by its memory
(``data_ptr``), held alive until the forward ends so the address cannot be reused, through a
function mode that is on the stack only from the draw to the end of that forward.

Why this module is over 600 lines: :class:`Capture` is one state machine (entries of the
step, the stack walk, following hand-made masks, the per-use site names) whose parts read and
write the same per-step state; the kernels and the site registry live apart.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from dropspy.errors import DropspyWarning
from dropspy.frameworks.torch import kernels
from dropspy.frameworks.torch.grab import Draw, Grabber, user_code, where_of
from dropspy.frameworks.torch.pack import pack_early
from dropspy.frameworks.torch.sites import (
    ALPHA,
    FEATURE,
    SiteFacts,
    SiteKey,
    SiteRegistry,
    alpha_coefficients,
    dropout_scale,
    rate_of_keep,
)

_VF = torch._C._VariableFunctions
# Past this many bytes of bool masks held in one step, the held masks are bit-packed at once
# (8x smaller) instead of at the step's end: a long step (big attention masks, gradient
# accumulation) must not double the activation memory dropout already keeps.
PACK_EARLY_BYTES = 256 << 20

# Random draws seen by the function mode during a dropout-looking module's first call (the
# wrappers in kernels.py see those made through ``torch.<name>``; this also catches a name
# imported before recording started, ``from torch import rand_like``).
_RANDOM = {
    _VF.rand: "rand", _VF.rand_like: "rand_like", _VF.randn: "randn",
    _VF.randn_like: "randn_like", _VF.randint: "randint", _VF.randint_like: "randint_like",
    _VF.normal: "normal", _VF.multinomial: "multinomial", _VF.poisson: "poisson",
    _VF.randperm: "randperm", torch.Tensor.uniform_: "uniform_", torch.Tensor.normal_: "normal_",
    torch.Tensor.random_: "random_", torch.Tensor.exponential_: "exponential_",
    torch.Tensor.geometric_: "geometric_", torch.Tensor.cauchy_: "cauchy_",
    torch.Tensor.log_normal_: "log_normal_", torch.Tensor.multinomial: "multinomial",
}
_MUL = {torch.Tensor.mul, torch.Tensor.mul_, _VF.mul, torch.Tensor.multiply,
        torch.Tensor.multiply_, _VF.multiply, torch.Tensor.__mul__, torch.Tensor.__rmul__,
        torch.Tensor.__imul__, torch.Tensor.where, _VF.where, torch.Tensor.masked_fill,
        torch.Tensor.masked_fill_, _VF.masked_fill}
_EXPAND = {torch.Tensor.expand, torch.Tensor.expand_as, _VF.broadcast_to,
           torch.Tensor.broadcast_to}
_MODULE_KINDS: dict[type, str] = {
    torch.nn.Dropout: "dropout", torch.nn.Dropout1d: "dropout1d", torch.nn.Dropout2d: "dropout2d",
    torch.nn.Dropout3d: "dropout3d", torch.nn.AlphaDropout: "alpha_dropout",
    torch.nn.FeatureAlphaDropout: "feature_alpha_dropout",
}
_ATTENTION_WORDS = ("attn", "attention")


class Entry:
    """One call at one site, held until its step ends (the mask stays a torch bool tensor).

    A step that holds too many mask bytes packs them early: ``noise`` becomes a uint8 tensor
    of packed bits and ``noise_shape`` keeps the shape.
    """

    __slots__ = ("key", "training", "shape", "noise", "noise_shape", "rate")

    def __init__(self, key: SiteKey, training: bool, shape: tuple[int, ...],
                 noise: torch.Tensor | None, rate: float | None = None) -> None:
        self.key = key
        self.training = training
        self.shape = shape
        self.noise = noise
        self.noise_shape = None if noise is None else tuple(noise.shape)
        self.rate = rate

    def pack_early(self) -> int:
        """Pack the mask in place; returns the mask bytes freed (counted one per element)."""
        noise = self.noise
        if noise is None or noise.dtype == torch.uint8:
            return 0
        self.noise = pack_early(noise)
        return noise.numel()


class Loc:
    """Where a call was made: the innermost module of the model, the call, the module's use."""

    __slots__ = ("path", "module", "where", "use", "function")

    def __init__(self, path: str, module: torch.nn.Module, where: str | None, use: str | None,
                 function: str | None) -> None:
        self.path = path
        self.module = module
        self.where = where  # the call's line, when made in user code inside the module
        self.use = use  # the line that called the module
        self.function = function  # the user function that made the call (where's function)


class Frame:
    """A hooked module's running call (dropout-looking user modules and stacked RNNs)."""

    __slots__ = ("path", "module", "drew", "probe", "cudnn")

    def __init__(self, path: str, module: torch.nn.Module) -> None:
        self.path = path
        self.module = module
        self.drew = False
        self.probe = False  # this call runs under the mode to see its random draws
        self.cudnn: Any = None  # cudnn.flags(enabled=False) held for this call


def looks_like_dropout(module: torch.nn.Module) -> bool:
    """A dropout module of torch's, or a user's class whose name says dropout."""
    cls = type(module)
    like = _DROPOUT_LIKE.get(cls)
    if like is None:
        like = _DROPOUT_LIKE[cls] = issubclass(cls, torch.nn.modules.dropout._DropoutNd) or (
            "drop" in cls.__name__.lower())
    return like


# By class (asked at every hand-made draw); weak keys: classes made at run time can go.
_DROPOUT_LIKE: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def forward_codes(named: Iterable[tuple[str, torch.nn.Module]]
                  ) -> tuple[dict[int, tuple[str, torch.nn.Module] | None],
                             dict[int, tuple[str, torch.nn.Module]], list[Any]]:
    """The model's ``forward`` code objects by ``id``, (path, module) by module ``id``, and
    the code objects themselves (held, so their ids stay theirs).

    Keyed by ``id``: hashing a code object hashes its bytecode and constants at every lookup,
    and the capture looks up every frame of the stack at every dropout call. A code maps to
    None when the module is found from the frame's ``self``; an instance's own ``forward``
    (a lambda, a function set on the instance) maps to its module.
    """
    codes: dict[int, tuple[str, torch.nn.Module] | None] = {}
    paths: dict[int, tuple[str, torch.nn.Module]] = {}
    held: list[Any] = []
    for name, module in named:
        paths[id(module)] = (name, module)
        own = module.__dict__.get("forward")
        fns = [own] if own is not None else [type(module).forward]
        while fns:
            fn = fns.pop()
            fn = getattr(fn, "__func__", fn)
            code = getattr(fn, "__code__", None)
            if code is not None and id(code) not in codes:
                codes[id(code)] = (name, module) if own is not None else None
                held.append(code)
            inner = getattr(fn, "__wrapped__", None)
            if inner is not None:
                fns.append(inner)
    return codes, paths, held


class Capture:
    """The capture state one adapter owns: site registry, entries of a step, taint.

    Args:
        sites: Names and declares sites.
        note: ``Session.note``.
        model: The recorded module (its ``forward`` codes and module paths are read once).
        count_dropped: ``Session.count_dropped``: calls dropspy failed to record are counted
            (cause ``capture_error``), never silently lost.
        cudnn_rnn: ``"opaque"`` or ``"exact"`` (see the adapter).
    """

    def __init__(self, sites: SiteRegistry, note: Callable[[str], None],
                 model: torch.nn.Module | None = None, cudnn_rnn: str = "opaque",
                 count_dropped: Callable[[str, int], None] | None = None) -> None:
        self.sites = sites
        self.note = note
        self.count_dropped = count_dropped or (lambda cause, n: None)
        self.cudnn_rnn = cudnn_rnn
        if model is not None:
            from dropspy.frameworks.torch.distributed import named_modules

            self.codes, self.paths, self._code_refs = forward_codes(named_modules(model))
        else:
            self.codes, self.paths, self._code_refs = {}, {}, []
        self.root: torch.nn.Module | None = model
        self.thread: int | None = None
        self.depth = 0  # top-level forwards of the model running (re-entrant calls count)
        self._capturing = True
        self.entries: list[Entry] = []
        self.applied_in_group = False
        self.draws_seen = 0
        self.draw_log: list[Draw] | None = None  # the RNG audit's view, off by default
        self.taint: dict[int, tuple[torch.Tensor, Entry]] = {}  # by data_ptr
        self.mode: FunctionMode | None = None
        self.mode_pushed = False
        # Dropout-like modules that make their own masks: path -> {key: last entry}, so a
        # call that draws nothing (eval) is recorded as not applied.
        self.handmade: dict[str, dict[SiteKey, Entry]] = {}
        # Dropout-looking modules whose first sampled call ran under the mode (it sees random
        # draws the wrappers cannot); later calls run without it.
        self.probed: set[str] = set()
        self.stack: list[Frame] = []  # running hooked modules (not every module)
        self.bool_bytes = 0  # bytes of bool masks held, unpacked
        self._unpacked: list[Entry] = []
        self._noted: set[str] = set()
        self._rnn_gap: tuple[Any, int] = (None, 0)  # (an RNN module's frame, gaps drawn)

    @property
    def capturing(self) -> bool:
        """Whether the current step is sampled (its masks are taken)."""
        return self._capturing

    @capturing.setter
    def capturing(self, value: bool) -> None:
        if value != self._capturing:
            self._capturing = value
            kernels.sync()  # torch's own kernels run the steps nobody samples

    # -- helpers -----------------------------------------------------------------------------

    def active(self) -> bool:
        """Whether a call made now belongs to a recorded forward of the model."""
        if not self.capturing or self.depth <= 0:
            return False
        if self.thread is not None and _thread_id() != self.thread:
            return False
        return torch._C._current_graph_task_id() == -1  # not a checkpoint re-run in backward

    def locate(self) -> Loc | None:
        """The innermost module of the model whose ``forward`` runs now, the call and the use."""
        f: Any = sys._getframe(2)
        where = None
        codes, paths = self.codes, self.paths
        while f is not None:
            code = f.f_code
            if where is None and user_code(code):
                where = (code, f.f_lasti, code.co_name)
            if id(code) in codes:
                found = codes[id(code)]
                if found is None:
                    found = paths.get(id(f.f_locals.get("self")))
                if found is not None:
                    return Loc(found[0], found[1], where and where_of(*where),
                               self._use(f.f_back), where[2] if where else None)
            f = f.f_back
        if self.depth > 0 and self.root is not None:
            # Inside the model's forward, in code that is no module's forward.
            return Loc("", self.root, where and where_of(*where), None,
                       where[2] if where else None)
        return None

    def _use(self, f: Any) -> str | None:
        """The line of model code that called a module (None: called by the training loop).

        Only a call made in a ``forward`` of the model counts: the training loop calling the
        model (or a torch container) from two lines is still one use.
        """
        while f is not None:
            code = f.f_code
            if user_code(code):
                if id(code) in self.codes:
                    return where_of(code, f.f_lasti, code.co_name)
                return None
            f = f.f_back
        return None

    def note_once(self, tag: str, message: str) -> None:
        """Tell the user ``message`` once per recording."""
        if tag not in self._noted:
            self._noted.add(tag)
            self.note(message)

    def failed(self, what: str, exc: BaseException, site: str | None = None) -> None:
        """Count a call dropspy failed to record and say so once per cause."""
        self.count_dropped("capture_error", 1)
        cause = f"{type(exc).__name__}: {exc}"
        tag = f"error:{site}:{type(exc).__name__}"
        if tag in self._noted:
            return
        where = f" at {site}" if site else ""
        message = (f"internal error in {what}{where} ({cause}); the call ran as without "
                   f"dropspy and is not recorded (counted as dropped: capture_error)")
        self.note_once(tag, message)
        warnings.warn(f"dropspy: {message}", DropspyWarning, stacklevel=3)

    def add(self, key: SiteKey, training: bool, shape: tuple[int, ...],
            noise: torch.Tensor | None, rate: float | None = None) -> Entry:
        entry = Entry(key, training, shape, noise, rate)
        self.entries.append(entry)
        if noise is not None:
            self.applied_in_group = True
            self.bool_bytes += noise.numel()
            if key.kind != "bernoulli" and key.kind != "hand":  # may still be reshaped
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

    def forward_done(self) -> None:
        """A top-level forward ended: forget taint and the RNN gap counter."""
        if self.taint:
            self.taint.clear()
        if self.mode is not None:
            self.mode.probing = 0  # a probed call that raised never reached its post-hook
        self._rnn_gap = (None, 0)

    def log(self, draws: Iterable[Draw]) -> None:
        if self.draw_log is not None:
            self.draw_log.extend(draws)

    # -- dropout calls (from the kernels) ------------------------------------------------------

    def on_dropout(self, kind: str, x: torch.Tensor, p: float, train: bool, mask: Any,
                   in_sdpa: bool) -> None:
        """One dropout call: ``mask`` is the noise drawn, None, ALL_DROPPED or a Grabber."""
        if not self.active():
            return
        loc = self.locate()
        if loc is None:
            return
        self.draws_seen += 1
        module = loc.module
        shape = tuple(x.shape)
        own = isinstance(module, torch.nn.modules.dropout._DropoutNd)
        heads = None
        if own:
            kind = _MODULE_KINDS.get(type(module), kind)
            key = SiteKey(loc.path, kind, None, loc.use)
            facts = lambda: self._dropout_facts(kind, module, p, True)
        elif isinstance(module, torch.nn.RNNBase) and kind == "dropout":
            self._on_rnn_gap(loc, module, shape, p, train, mask)
            return
        elif kind == "dropout" and (in_sdpa or isinstance(module, torch.nn.MultiheadAttention)
                                    or (len(shape) == 4 and _attention_like(loc))):
            if isinstance(module, torch.nn.MultiheadAttention):
                heads = int(module.num_heads)
            where = None if heads else loc.where
            key = SiteKey(loc.path, "attention", where, loc.use)
            cls = type(module).__name__
            facts = lambda: SiteFacts(
                layer_class=cls, role="attention", rate=p, scale=dropout_scale("dropout", p),
                extra={"layout": "(batch, head, query, key)"})
        else:
            key = SiteKey(loc.path, kind, loc.where, loc.use)
            facts = lambda: self._dropout_facts(kind, module, p, False)
        self.sites.learn(key, facts)
        known = self.sites.facts(key)
        if known is not None and known.rate is not None and known.rate != p:
            self.note_once(f"rate:{key}", f"{loc.path or type(module).__name__}: dropout rate "
                           f"changed from {known.rate} to {p} while recording; each record "
                           f"keeps the rate it was drawn with")
        if _is_parameter(x):
            _mark_parameter(self.sites.facts(key), x.dim())
        if isinstance(mask, Grabber):
            self.log(mask.draws)
            self.unexpected(key, f"{len(mask.draws)} masks drawn, expected 1", mask)
            return
        noise = self._noise(mask, kind, shape, p, x)
        if noise is not None:
            if self.draw_log is not None:
                self.log([Draw(kind, noise != 0, 1 - p, x.dtype)])
            if heads and noise.dim() == 3 and noise.shape[0] % heads == 0:
                # The need_weights path drops on (batch * heads, query, key): same elements,
                # same order, recorded with heads split out so every call has one layout.
                noise = noise.reshape(noise.shape[0] // heads, heads, *noise.shape[1:])
                shape = tuple(noise.shape)
            if noise.dim() < len(shape):
                noise = noise.reshape((1,) * (len(shape) - noise.dim()) + tuple(noise.shape))
        elif heads and len(shape) == 3 and shape[0] % heads == 0:
            shape = (shape[0] // heads, heads) + shape[1:]
        self.add(key, module.training, shape, noise, p)

    def maybe_rerun(self) -> None:
        """A dropout call during backward in this model: an activation checkpoint re-run."""
        if (self.depth == 0 and self.capturing and "checkpoint" not in self._noted
                and torch._C._current_graph_task_id() != -1 and self.locate_any()):
            # The RNG state is restored for the re-run: the same masks again, already
            # recorded in the forward.
            self.note_once("checkpoint", "activation checkpointing re-runs forward during "
                           "backward with the same masks; the re-runs are not recorded again")

    def locate_any(self) -> bool:
        """Whether a ``forward`` of the model runs on this thread now (any depth)."""
        f: Any = sys._getframe(1)
        while f is not None:
            code = f.f_code
            if id(code) in self.codes:
                if self.codes[id(code)] is not None or id(f.f_locals.get("self")) in self.paths:
                    return True
            f = f.f_back
        return False

    def _noise(self, mask: Any, kind: str, shape: tuple[int, ...], p: float,
               x: torch.Tensor) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask is kernels.ALL_DROPPED or mask is kernels.ALL_KEPT:
            nshape = shape if kind not in FEATURE else shape[:2] + (1,) * (len(shape) - 2)
            return torch.full(nshape, mask is kernels.ALL_KEPT, dtype=torch.bool,
                              device=x.device)
        # The noise ATen drew and scaled (kept: 1/(1-p), dropped: 0), held as it is: nothing
        # touches it after the multiplication, and it is compared and packed off the
        # training thread (see the adapter's _flush).
        return mask

    def _on_rnn_gap(self, loc: Loc, module: torch.nn.RNNBase, shape: tuple[int, ...], p: float,
                    train: bool, mask: Any) -> None:
        """A between-layer dropout inside an RNN layer stack: gap g is its g-th call."""
        frame = _module_frame(module)
        last, count = self._rnn_gap
        g = count if last is frame else 0
        self._rnn_gap = (frame, g + 1)
        gaps = max(module.num_layers - 1, 1)
        key = _gap_key(loc.path, g, gaps, loc.use)
        self.sites.learn(key, lambda: _gap_facts(module, p, g))
        noise = self._noise(mask, "dropout", shape, p, torch.empty(0))
        if noise is not None:
            if self.draw_log is not None:
                self.log([Draw("dropout", noise != 0, 1 - p, torch.float32)])
            for f in self.stack:
                if f.module is module:
                    f.drew = True
        self.add(key, module.training, shape, noise, p)

    def rnn_done(self, frame: Frame, output: Any) -> None:
        """An RNN call that drew no gap mask (eval, or p == 1): its gaps, not applied."""
        module: Any = frame.module
        if frame.drew or not module.dropout or not self.active():
            return
        gaps = max(module.num_layers - 1, 1)
        shape = _layer_output_shape(output, module)
        if shape is None:
            return
        use = self._use(sys._getframe(3))
        rate = float(module.dropout)
        for g in range(gaps):
            key = _gap_key(frame.path, g, gaps, use)
            self.sites.learn(key, _GapFacts(module, rate, g))
            self.add(key, module.training, shape, None, float(module.dropout))

    def on_attention_without_draw(self, q: torch.Tensor, k: torch.Tensor, p: float) -> None:
        """An SDPA call with no dropout kernel run: eval (p == 0, known site) or a fused one."""
        if not self.active():
            return
        loc = self.locate()
        if loc is None:
            return
        key = SiteKey(loc.path, "attention", None if isinstance(
            loc.module, torch.nn.MultiheadAttention) else loc.where, loc.use)
        try:
            batch = broadcast_shapes(q.shape[:-2], k.shape[:-2])
        except RuntimeError:  # grouped-query attention: fewer key heads than query heads
            batch = tuple(q.shape[:-2])
        shape = batch + (q.shape[-2], k.shape[-2])
        if p == 0.0:
            module = loc.module
            if isinstance(module, torch.nn.MultiheadAttention) and module.dropout:
                rate = float(module.dropout)  # its eval call passes dropout_p=0 on
                self.sites.learn(key, lambda: SiteFacts(
                    layer_class=type(module).__name__, role="attention", rate=rate,
                    scale=dropout_scale("dropout", rate),
                    extra={"layout": "(batch, head, query, key)"}))
            facts = self.sites.facts(key)
            if facts is not None:
                self.add(key, module.training, shape, None, facts.rate)
            return
        okey = SiteKey(key.path, "attention_fused", key.where, key.use)
        reason = ("a fused attention kernel applies dropout inside the kernel; the mask cannot "
                  "be observed")
        cls = type(loc.module).__name__
        self.sites.learn(okey, lambda: SiteFacts(layer_class=cls, role="attention", rate=p,
                                                 opaque=reason))
        self.sites.resolve(okey, 4)

    def _dropout_facts(self, kind: str, module: torch.nn.Module, p: float,
                       own: bool) -> SiteFacts:
        extra: dict[str, Any] = {}
        if kind in ALPHA:
            extra["alpha_dropout"] = alpha_coefficients(p)
        return SiteFacts(layer_class=type(module).__name__, role="output", rate=p, own=own,
                         scale=dropout_scale(kind, p), extra=extra)

    def unexpected(self, key: SiteKey, what: str, grabber: Grabber | None = None) -> None:
        if grabber is not None and grabber.error:
            what += f" (copying the mask failed: {grabber.error})"
        self.count_dropped("capture_error", 1)
        self.note_once(f"unexpected:{key}", f"site {key.path or '<root>'} ({key.kind}): {what}; "
                       "this call is not recorded (counted as dropped: capture_error)")

    # -- hand-made masks -----------------------------------------------------------------------

    def on_bernoulli(self, op: str, out: torch.Tensor, p: Any) -> None:
        """A Bernoulli draw in the user's code: a mask, followed to where it is applied."""
        if not self.active():
            return
        loc = self.locate()
        if loc is None:
            return
        self.draws_seen += 1
        module = loc.module
        mask = out != 0
        dropout_like = looks_like_dropout(module)
        if not dropout_like and loc.function not in (None, "forward", "<lambda>"):
            # A mask drawn by a helper function (AWD-LSTM's embedded_dropout), not by a
            # module's own forward: the site is named after the function.
            kind = loc.function
        else:
            kind = "bernoulli"
        key = SiteKey(loc.path, kind, loc.where, loc.use)
        rate = rate_of_keep(p)
        self.sites.learn(key, lambda: SiteFacts(
            layer_class=type(module).__name__, role="custom", rate=rate,
            own=dropout_like,
            extra={"mask_source": f"bernoulli draw in {loc.function or 'forward'}, 1 = kept; "
                   "applied shape from the first multiplication by the mask"}))
        if self.draw_log is not None:
            self.draw_log.append(Draw(op, mask, p, out.dtype))
        for f in self.stack:
            if f.module is module:
                f.drew = True
        entry = self.add(key, module.training, tuple(mask.shape), mask, rate)
        self.taint_tensor(out, entry)
        if dropout_like:
            self.handmade.setdefault(loc.path, {})[key] = entry
        self.push_mode()

    def taint_tensor(self, t: torch.Tensor, entry: Entry) -> None:
        if t.numel() > 0:
            self.taint[t.data_ptr()] = (t, entry)

    def propagate(self, func: Callable, args: tuple, out: Any) -> None:
        """Follow a hand-made mask to the multiplication that applies it (its applied shape).

        Tensors that share the mask's memory (``Variable(m)``, ``m.data``, ``m.detach()``,
        ``torch.Tensor(m)``, views and ``expand``) are the mask by address; results of
        elementwise calls on it (``m / (1 - p)``, ``m.clone()``, ``m.to(dtype)``) inherit it.
        Runs for every torch call while the mode is on the stack: kept lean.
        """
        taint = self.taint
        tainted: Entry | None = None
        source: torch.Tensor | None = None
        others: list[torch.Tensor] = []
        for a in args:
            if not isinstance(a, torch.Tensor):
                continue
            try:
                hit = taint.get(a.data_ptr())
            except RuntimeError:  # tensors without storage (sparse, nested, functional)
                hit = None
            if hit is not None and a.numel() > 0 and a.device == hit[0].device:
                tainted, source = hit[1], a
            else:
                others.append(a)
        if tainted is None or source is None:
            return
        if func in _MUL and any(o.numel() > 1 for o in others):
            # Multiplying by data (not by a scale held in a tensor) applies the mask.
            shape = broadcast_shapes(source.shape, *(o.shape for o in others))
            noise = tainted.noise
            if noise is not None and noise.dtype == torch.bool and len(shape) > noise.dim():
                tainted.noise = noise.reshape((1,) * (len(shape) - noise.dim())
                                              + tuple(noise.shape))
                tainted.noise_shape = tuple(tainted.noise.shape)
            tainted.shape = shape
            if any(_is_parameter(o) for o in others):
                _mark_parameter(self.sites.facts(tainted.key), len(shape))
            for k in [k for k, (_, e) in taint.items() if e is tainted]:
                del taint[k]
            return
        if isinstance(out, torch.Tensor) and (func in _EXPAND or out.numel() == source.numel()):
            # Elementwise ops, copies, dtype casts and expand keep the mask's values;
            # anything else that changes the element count (indexing, reductions) does not.
            self.taint_tensor(out, tainted)

    def push_mode(self) -> None:
        """Put the function mode on the stack until the forward ends (follows taint)."""
        if self.mode is not None and not self.mode_pushed:
            torch._C._push_on_torch_function_stack(self.mode)
            self.mode_pushed = True

    def end_module(self, frame: Frame) -> None:
        """Close a hooked module call: eval calls of hand-made dropout are not applied."""
        if self.handmade and not frame.drew and self.active():
            known = self.handmade.get(frame.path)
            if known:
                for key, last in known.items():
                    self.add(key, frame.module.training, last.shape, None, last.rate)

    # -- random draws that are not masks -------------------------------------------------------

    def on_random(self, name: str) -> None:
        """A random draw that is no Bernoulli mask, inside a dropout-looking module."""
        if not self.active() or not self.stack:
            return
        frame = self.stack[-1]
        module = frame.module
        if not looks_like_dropout(module):
            return
        loc = self.locate()
        key = SiteKey(frame.path, "untracked", loc.where if loc else None)
        if self.sites.facts(key) is None:
            reason = (f"{type(module).__name__} draws random numbers with {name}, which "
                      "dropspy cannot turn into a mask (only Bernoulli draws and torch's "
                      "dropout calls are recorded)")
            self.sites.learn(key, lambda: SiteFacts(
                layer_class=type(module).__name__, role="custom", rate=None, opaque=reason))
            name_ = self.sites.resolve(key, 1)
            self.note(f"untracked random draw at {name_ or frame.path}: {reason}")


def _attention_like(loc: Loc) -> bool:
    """A rank-4 functional dropout on attention probabilities (transformers' eager path)."""
    names = (loc.function or "", type(loc.module).__name__, loc.path.rsplit(".", 1)[-1])
    return any(w in n.lower() for n in names for w in _ATTENTION_WORDS)


def _module_frame(module: torch.nn.Module) -> Any:
    f: Any = sys._getframe(2)
    while f is not None:
        if f.f_code is type(module).forward.__code__:
            return f
        f = f.f_back
    return None


def _gap_key(path: str, g: int, gaps: int, use: str | None) -> SiteKey:
    return SiteKey(path, "between_layers" if gaps == 1 else f"between_layers/{g}", None, use)


def _gap_facts(module: torch.nn.RNNBase, p: float, g: int) -> SiteFacts:
    extra: dict[str, Any] = {"after_layer": g, "num_layers": module.num_layers}
    if module.num_layers == 1:
        extra["never_applied"] = "num_layers=1: torch applies RNN dropout only between " \
                                 "stacked layers"
    return SiteFacts(layer_class=type(module).__name__, role="between_layers", rate=p,
                     scale=dropout_scale("dropout", p), extra=extra)


class _GapFacts:
    """The facts of one RNN gap, made when first needed."""

    def __init__(self, module: torch.nn.RNNBase, p: float, g: int) -> None:
        self.args = (module, p, g)

    def __call__(self) -> SiteFacts:
        return _gap_facts(*self.args)


def _layer_output_shape(output: Any, module: torch.nn.RNNBase) -> tuple[int, ...] | None:
    """Shape of an RNN layer's output as the layer stack sees it (time-major or packed)."""
    out = output[0] if isinstance(output, tuple) else output
    data = getattr(out, "data", None)
    if isinstance(out, tuple) and isinstance(data, torch.Tensor):  # PackedSequence
        return tuple(data.shape)
    if not isinstance(out, torch.Tensor):
        return None
    if out.dim() == 3 and module.batch_first:
        return (out.shape[1], out.shape[0], out.shape[2])
    if out.dim() == 2:  # unbatched input: ATen adds a batch dim of 1
        return (out.shape[0], 1, out.shape[1])
    return tuple(out.shape)


def _is_parameter(t: torch.Tensor) -> bool:
    """``isinstance(t, nn.Parameter)`` without the Parameter metaclass's Python check."""
    return issubclass(type(t), torch.nn.Parameter) or bool(getattr(t, "_is_param", False))


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


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` without its cost (~28 us per call: it runs torch's Python
    reference implementation); raises RuntimeError where torch's does."""
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for s in shapes:
        for i, n in enumerate(s, rank - len(s)):
            m = out[i]
            if n == m or n == 1:
                continue
            if m == 1:
                out[i] = n
            else:
                raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
    return tuple(int(n) for n in out)


_thread_id = threading.get_ident


class FunctionMode(TorchFunctionMode):
    """Follows hand-made masks to their multiplication; on the stack only where needed.

    It is pushed by a Bernoulli draw in a recorded forward and taken off at the first module
    hook after every such mask met its multiplication (or when the forward ends), and for the
    first sampled call of each dropout-looking module (to see random draws the wrappers in
    ``kernels`` cannot), never for the whole model: every torch call under a function mode
    pays a Python round trip, and fast paths that check ``has_torch_function`` would turn off.
    """

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture
        self.dead = False
        self.inside = 0  # calls of this mode running now (torch takes it off the stack then)
        self.probing = 0  # dropout-looking modules on their first call (see Capture.probed)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if kwargs is None:
            kwargs = {}
        self.inside += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.inside -= 1
        if self.dead:
            return out
        cap = self.capture
        try:
            if cap.taint:
                cap.propagate(func, args, out)
            if self.probing:
                name = _RANDOM.get(func)
                if name is not None:
                    cap.on_random(name)
        except Exception as exc:  # never into the user's call
            cap.failed("following a hand-made mask", exc)
        return out
