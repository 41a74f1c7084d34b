"""Where dropspy meets torch's dropout: ATen kernels for ``aten::dropout`` and
``aten::feature_dropout`` (and their in-place forms), and thin wrappers of the few Python
entry points that draw masks any other way.

Why kernels, not a function mode: every dropout in torch, whether called from Python
(``F.dropout``, ``nn.Dropout``, ``F.dropout2d``) or from inside a C++ composite (the RNN layer
stack's between-layer dropout, the math path of ``scaled_dot_product_attention``,
``F.multi_head_attention_forward``), goes through one dispatcher op, ``aten::dropout`` (or
``aten::feature_dropout``). While a recording is open, dropspy registers its own
``CompositeImplicitAutograd`` kernel for those ops. The kernel does the framework's own
arithmetic, op for op as ATen's ``Dropout.cpp`` does it (``empty_like(input).bernoulli_(1 - p)``,
``div_(1 - p)``, ``input * noise``; ``native_dropout`` on CUDA and the other fused devices),
so the random stream, the output and its autograd graph are the ones torch makes, and it keeps
the noise it drew: the mask, with no copy through a dispatch mode. A function mode would see
every torch call of the forward (measured: +0.6-1.2 ms per forward on a 2-layer transformer)
and turn off fast paths (``has_torch_function``); a dispatch mode around a composite sends
each of its ~60 ATen ops through Python. The exactness and zero-perturbation tests hold this
kernel to ATen's own results.

Entry points that do not reach those ops are wrapped in Python (no cost to any other call):
``Tensor.bernoulli_``/``bernoulli`` and ``torch.bernoulli`` (hand-made masks), the other
random draws (``torch.rand_like``, ``Tensor.uniform_``, ...: a dropout-looking module that
makes its mask from one is said to be untracked),
``F.alpha_dropout``/``F.feature_alpha_dropout`` (their mask is copied by a short
:class:`~dropspy.frameworks.torch.grab.Grabber` around the one op), and
``F.scaled_dot_product_attention`` (to say when a fused kernel applied dropout out of sight, and
to record an eval call that draws nothing).

Everything a kernel does for dropspy after the framework's result exists runs under
:func:`_observe`'s guard: an error there is counted (``capture_error``) and warned once, and
the user's call returns the framework's result unchanged.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dropspy.frameworks.torch.grab import Grabber

if TYPE_CHECKING:
    from dropspy.frameworks.torch.capture import Capture

__all__ = ["install", "uninstall", "ORIGINAL"]

# The captures of open recordings (almost always one). Kernels look here; an empty list means
# the kernels are not installed.
ACTIVE: list[Capture] = []
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"lib": None, "patches": []}
_SDPA_DEPTH = threading.local()

_TensorBase = torch._C.TensorBase
# The unwrapped callables (dropspy's own draws must never be seen as the user's).
ORIGINAL: dict[str, Callable] = {
    "bernoulli_": _TensorBase.bernoulli_,
    "bernoulli": _TensorBase.bernoulli,
    "torch.bernoulli": torch.bernoulli,
    "alpha_dropout": F.alpha_dropout,
    "feature_alpha_dropout": F.feature_alpha_dropout,
    "sdpa": F.scaled_dot_product_attention,
    "F.dropout": F.dropout,
}
_FUSED_DEVICES = ("cuda", "xpu", "lazy", "privateuseone")
#: A mask value that stands for "every element dropped" (p == 1 draws nothing).
ALL_DROPPED = object()
_KERNELS: dict[bool, Callable] = {}  # F.dropout's kernels by ``inplace``
#: A mask value that stands for "every element kept" (p == 0 while training draws nothing).
ALL_KEPT = object()


def _noise_like(input: torch.Tensor, feature: bool) -> torch.Tensor:
    """ATen's ``empty_like(input)`` / ``make_feature_noise(input)`` (Dropout.cpp)."""
    if not feature:
        return torch.empty_like(input)
    if input.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    return input.new_empty(tuple(input.shape[:2]) + (1,) * (input.dim() - 2))


def apply_dropout(input: torch.Tensor, p: float, train: bool, feature: bool,
                  inplace: bool) -> tuple[torch.Tensor, Any]:
    """ATen's ``dropout`` / ``feature_dropout`` (and ``_``), op for op; returns (out, mask).

    The mask is None when no dropout applies (eval, no elements), ALL_KEPT for p == 0 while
    training, ALL_DROPPED for p == 1, else the noise (float, kept = nonzero) or
    ``native_dropout``'s bool mask.
    """
    if not 0.0 <= p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0 or not train or input.numel() == 0:
        return input, (ALL_KEPT if train and p == 0 and input.numel() else None)
    if p == 1:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return (input.mul_(zero) if inplace else input.mul(zero)), ALL_DROPPED
    if not feature and not inplace and input.device.type in _FUSED_DEVICES:
        out, mask = torch.native_dropout(input, p, True)
        return out, mask
    noise = _noise_like(input, feature)
    ORIGINAL["bernoulli_"](noise, 1 - p)
    noise.div_(1 - p)
    return (input.mul_(noise) if inplace else input.mul(noise)), noise


def _kernel(kind: str, feature: bool, inplace: bool) -> Callable:
    def kernel(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        if ACTIVE and torch._C._current_graph_task_id() != -1:
            # A forward re-run during backward (activation checkpointing); said before the
            # call, because checkpointing may stop the re-run inside it.
            _observe(lambda cap: cap.maybe_rerun())
        out, mask = apply_dropout(input, p, train, feature, inplace)
        if ACTIVE:
            in_sdpa = getattr(_SDPA_DEPTH, "n", 0) > 0
            _observe(lambda cap: cap.on_dropout(kind, input, float(p), bool(train), mask,
                                                in_sdpa))
        return out
    kernel.__name__ = f"dropspy_{kind}{'_' if inplace else ''}"
    return kernel


_KERNELS.update({False: _kernel("dropout", False, False), True: _kernel("dropout", False, True)})


def _observe(fn: Callable[[Capture], None]) -> None:
    """Run ``fn`` for every open recording; an error in it never reaches the user's call."""
    for cap in list(ACTIVE):
        try:
            fn(cap)
        except Exception as exc:  # dropspy's own failure: counted and said, never raised
            cap.failed("dropout capture", exc)


# -- Python entry points ----------------------------------------------------------------------


class _Reentry(threading.local):
    on = False


# A wrapped entry point called again from inside itself: a function mode (dropspy's or the
# user's) hands the call back to ``torch.Tensor.bernoulli_``, which is the wrapper. Only the
# outermost call observes.
_REENTRY = _Reentry()


def _guarded(original: Callable, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
    """Call ``original``; also say whether this is the outermost wrapped call."""
    if _REENTRY.on:
        return original(*args, **kwargs), False
    _REENTRY.on = True
    try:
        return original(*args, **kwargs), True
    finally:
        _REENTRY.on = False


def _bernoulli_(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if _STATE["lib"] is None:  # no open recording samples this step
        return ORIGINAL["bernoulli_"](self, *args, **kwargs)
    out, outer = _guarded(ORIGINAL["bernoulli_"], self, *args, **kwargs)
    if outer:
        p = args[0] if args else kwargs.get("p", 0.5)
        _observe(lambda cap: cap.on_bernoulli("bernoulli_", out, p))
    return out


def _bernoulli_method(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if _STATE["lib"] is None:
        return ORIGINAL["bernoulli"](self, *args, **kwargs)
    out, outer = _guarded(ORIGINAL["bernoulli"], self, *args, **kwargs)
    if outer:
        p = args[0] if args and not isinstance(args[0], torch.Generator) else kwargs.get(
            "p", self)
        _observe(lambda cap: cap.on_bernoulli("bernoulli", out, p))
    return out


def _bernoulli_fn(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if _STATE["lib"] is None:
        return ORIGINAL["torch.bernoulli"](input, *args, **kwargs)
    out, outer = _guarded(ORIGINAL["torch.bernoulli"], input, *args, **kwargs)
    if outer:
        p = args[0] if args and not isinstance(args[0], torch.Generator) else kwargs.get(
            "p", input)
        _observe(lambda cap: cap.on_bernoulli("bernoulli", out, p))
    return out


def _alpha(kind: str) -> Callable:
    original = ORIGINAL[kind]

    def wrapper(input: torch.Tensor, p: float = 0.5, training: bool = False,
                inplace: bool = False) -> torch.Tensor:
        if not ACTIVE or _REENTRY.on or not isinstance(input, torch.Tensor):
            return original(input, p, training, inplace)
        if training and 0.0 < p < 1.0 and input.numel() > 0:
            with Grabber() as g:
                out, _ = _guarded(original, input, p, training, inplace)
            draws = g.draws
            mask: Any = draws[0].mask if len(draws) == 1 else g
        else:
            out, _ = _guarded(original, input, p, training, inplace)
            mask = ((ALL_DROPPED if p == 1.0 else ALL_KEPT) if training and input.numel()
                    else None)
        _observe(lambda cap: cap.on_dropout(kind, input, float(p), bool(training), mask, False))
        return out
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def _f_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
               inplace: bool = False) -> torch.Tensor:
    """``F.dropout`` straight into dropspy's kernel, skipping the dispatcher's round trip.

    The same kernel the dispatcher would call, with the same arguments, so the same ops and
    autograd graph; called from Python it saves ~25 us of boxing per call. Anything unusual
    (a tensor subclass or function mode, functorch transforms, a bad ``p``) takes
    ``F.dropout`` itself, which reaches the kernel through the dispatcher.
    """
    if (_STATE["lib"] is None or type(input) not in _PLAIN or not 0.0 <= p <= 1.0
            or torch.overrides.has_torch_function_unary(input)
            or torch._C._are_functorch_transforms_active()):
        return ORIGINAL["F.dropout"](input, p, training, inplace)
    return _KERNELS[inplace](input, p, training)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _torch_alpha(name: str, kind: str) -> Callable:
    """``torch.alpha_dropout(input, p, train)`` and its in-place and feature forms."""
    original = getattr(torch, name)
    ORIGINAL[f"torch.{name}"] = original

    def wrapper(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        if not ACTIVE or _REENTRY.on or not isinstance(input, torch.Tensor):
            return original(input, p, train)
        snapshot = input.clone() if name.endswith("_") else input  # shape and Parameter-ness
        if train and 0.0 < p < 1.0 and input.numel() > 0:
            with Grabber() as g:
                out, _ = _guarded(original, input, p, train)
            mask: Any = g.draws[0].mask if len(g.draws) == 1 else g
        else:
            out, _ = _guarded(original, input, p, train)
            mask = (ALL_DROPPED if p == 1.0 else ALL_KEPT) if train and input.numel() else None
        _observe(lambda cap: cap.on_dropout(kind, snapshot, float(p), bool(train), mask, False))
        return out
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapper


def _sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
    original = ORIGINAL["sdpa"]
    if not ACTIVE or _REENTRY.on:
        return original(*args, **kwargs)
    p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
    depth = getattr(_SDPA_DEPTH, "n", 0)
    _SDPA_DEPTH.n = depth + 1
    seen = [cap.draws_seen for cap in ACTIVE]
    try:
        out, _ = _guarded(original, *args, **kwargs)
    finally:
        _SDPA_DEPTH.n = depth
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    quiet = {id(cap) for cap, before in zip(list(ACTIVE), seen) if cap.draws_seen != before}
    # No dropout kernel ran for a recording: eval, p == 0, or a fused kernel drew inside.
    _observe(lambda c: None if id(c) in quiet else c.on_attention_without_draw(q, k, float(p)))
    return out


def _random(owner: Any, name: str) -> Callable:
    """A random draw that is no Bernoulli mask: said when a dropout-looking module makes it."""
    original = getattr(owner, name)
    ORIGINAL[f"random.{name}"] = original

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if _STATE["lib"] is not None and not _REENTRY.on:
            _observe(lambda cap: cap.on_random(name))
        return out
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__name__ = name
    return wrapper


# Random draws a dropout-looking module could make a mask of without a Bernoulli draw (they
# make an "untracked" site). Wrapped, not watched by a function mode: a mode on the stack for
# every call of such a module cost ~5 us per torch call inside it (AWD-LSTM: 0.3 ms a step).
_RANDOM_FUNCTIONS = ("rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
                     "normal", "multinomial", "poisson", "randperm")
_RANDOM_METHODS = ("uniform_", "normal_", "random_", "exponential_", "geometric_", "cauchy_",
                   "log_normal_", "multinomial")

_PATCHES: list[tuple[Any, str, Callable]] = [
    (torch.Tensor, "bernoulli_", _bernoulli_),
    (torch.Tensor, "bernoulli", _bernoulli_method),
    (torch, "bernoulli", _bernoulli_fn),
    (F, "alpha_dropout", _alpha("alpha_dropout")),
    (F, "feature_alpha_dropout", _alpha("feature_alpha_dropout")),
    (F, "scaled_dot_product_attention", _sdpa),
    (F, "dropout", _f_dropout),
    (torch, "alpha_dropout", _torch_alpha("alpha_dropout", "alpha_dropout")),
    (torch, "alpha_dropout_", _torch_alpha("alpha_dropout_", "alpha_dropout")),
    (torch, "feature_alpha_dropout", _torch_alpha("feature_alpha_dropout",
                                                  "feature_alpha_dropout")),
    (torch, "feature_alpha_dropout_", _torch_alpha("feature_alpha_dropout_",
                                                   "feature_alpha_dropout")),
    *[(torch, name, _random(torch, name)) for name in _RANDOM_FUNCTIONS],
    *[(torch.Tensor, name, _random(torch.Tensor, name)) for name in _RANDOM_METHODS],
]


def _script_as_original(wrapper: Callable, original: Any) -> None:
    """Make TorchScript compile a call of ``wrapper`` as a call of ``original``.

    While a recording is open, ``torch.jit.script`` of code calling a wrapped name (an
    ``nn.Dropout`` module, ``F.dropout``, ``torch.rand_like``, ...) would find dropspy's Python
    wrapper and fail to compile it. A wrapped ATen builtin is registered as that same builtin;
    a wrapped Python function carries the marks ``torch.jit.script`` follows to the function
    it should compile instead (the ones ``torch.jit._script_if_tracing`` sets).
    """
    from torch.jit import _builtins

    op = _builtins._find_builtin(original)
    if op is not None:
        _builtins._register_builtin(wrapper, op)
    elif inspect.isfunction(original):
        setattr(wrapper, "__script_if_tracing_wrapper", True)
        setattr(wrapper, "__original_fn", original)
        # TorchScript names the compiled function after the wrapper and checks that name
        # against the definition it compiles: the original's.
        wrapper.__name__ = original.__name__


def install(cap: Capture) -> None:
    """Put the wrappers in place (once for every open recording), the kernels when sampling."""
    with _LOCK:
        if not ACTIVE:
            saved = []
            for owner, name, fn in _PATCHES:
                original = owner.__dict__.get(name, _MISSING)
                saved.append((owner, name, original))
                if owner is not torch.Tensor and original is not _MISSING:
                    _script_as_original(fn, original)
                setattr(owner, name, fn)
            _STATE["patches"] = saved
        ACTIVE.append(cap)
    sync()


def sync() -> None:
    """The kernels are in place exactly while some open recording samples its current step.

    A step the sampling policy leaves out runs torch's own C++ kernels: the Python kernel
    costs ~25 us per call in the dispatcher's boxing alone, and ``record(steps=[])`` must cost
    nothing. Registering and removing the four kernels takes ~0.35 ms, at step ends only.
    """
    with _LOCK:
        want = any(cap.capturing for cap in ACTIVE)
        if want and _STATE["lib"] is None:
            lib = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():
                # torch warns once that an existing kernel is overridden: that is the point.
                warnings.simplefilter("ignore")
                for op, kind, feature, inplace in (
                        ("dropout", "dropout", False, False),
                        ("dropout_", "dropout", False, True),
                        ("feature_dropout", "feature_dropout", True, False),
                        ("feature_dropout_", "feature_dropout", True, True)):
                    lib.impl(op, _kernel(kind, feature, inplace), "CompositeImplicitAutograd")
            _STATE["lib"] = lib
        elif not want and _STATE["lib"] is not None:
            lib, _STATE["lib"] = _STATE["lib"], None
            lib._destroy()


_MISSING = object()


def uninstall(cap: Capture) -> None:
    """Take ``cap`` off; the last one out restores torch's own kernels and functions."""
    with _LOCK:
        if cap in ACTIVE:
            ACTIVE.remove(cap)
        if not ACTIVE:
            for owner, name, original in reversed(_STATE["patches"]):
                if original is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            _STATE["patches"] = []
    sync()


def installed() -> bool:
    """Whether dropspy's wrappers are in place (tests)."""
    return bool(_STATE["patches"])


def kernels_in_place() -> bool:
    """Whether dropspy's dropout kernels are registered now (tests)."""
    return _STATE["lib"] is not None
