"""``torch.compile`` (inductor): masks copied out of the compiled graph, exactly.

Inductor decomposes ``native_dropout`` into ``inductor_random(...) > p`` on its own Philox
stream (and feature dropout into ``bernoulli``), so no eager hook sees the mask. dropspy adds
a post-grad FX pass (``torch._inductor.config.post_grad_custom_post_pass``) that inserts,
after each mask node, a call of the side-effecting custom op ``dropspy::mask_tap`` (kept by
inductor's dead-code elimination through ``torch.fx.node.has_side_effect``) which hands the
mask to the recording. The pass adds no random op and changes no value: the compiled step
computes ``(x * mask) * (1 / (1 - p))`` as before, from the same seeds.

The site travels inside the graph as a JSON string (module path from
``node.meta["nn_module_stack"]``, class, rate, kind), not as an index into a table of this
process: a graph that inductor's FX cache hands back compiled in an earlier process carries
its sites with it.

A model compiled before ``record()`` keeps its compiled code; while recording, its compiled
call is swapped for a compile of the same module with the same options whose backend carries
the pass (a new backend, so Dynamo compiles once more under its own guard), and the original
is put back on exit. Where dropspy cannot instrument the compile (a backend other than
inductor, CUDA graphs under ``mode="reduce-overhead"``, a cache already at its limit), the
model's dropout sites are opaque with the reason and the compile is left untouched.
"""

from __future__ import annotations

import copy
import json
import operator
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["CompiledTarget", "CompiledRecording", "compiled_target", "add_listener",
           "remove_listener", "TapPass", "PASS_VERSION"]

#: Bumped whenever the pass inserts something else: part of inductor's cache key (uuid).
PASS_VERSION = 3
_OP_NAME = "dropspy::mask_tap"
_op: Any = None
# The open compiled recordings' tap handlers. Each ignores a tap made outside its own
# model's forward, so two compiled models recorded at once keep their masks apart.
_Listener = Callable[[torch.Tensor, Sequence[int], str], None]
_listeners: list[_Listener] = []


def add_listener(fn: _Listener) -> None:
    """Hand tapped masks to ``fn`` too (until :func:`remove_listener`)."""
    _listeners.append(fn)


def remove_listener(fn: _Listener) -> None:
    """Stop handing tapped masks to ``fn``."""
    if fn in _listeners:
        _listeners.remove(fn)


def tap_op() -> Any:
    """``torch.ops.dropspy.mask_tap.default``, registered on first use."""
    global _op
    if _op is None:
        @torch.library.custom_op(_OP_NAME, mutates_args=())
        def mask_tap(mask: torch.Tensor, shape: Sequence[int], site: str) -> None:
            for fn in tuple(_listeners):
                fn(mask, shape, site)

        @mask_tap.register_fake
        def _(mask: torch.Tensor, shape: Sequence[int], site: str) -> None:
            return None

        _op = torch.ops.dropspy.mask_tap.default
        torch.fx.node.has_side_effect(_op)
    return _op


def _custom_pass_base() -> type:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


class TapPass(_custom_pass_base()):  # type: ignore[misc]
    """The post-grad pass: a ``mask_tap`` after every dropout mask node of the graph."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        op = tap_op()
        try:
            found = list(_mask_nodes(graph))
        except Exception:  # a graph the pass does not understand is compiled as it is
            return
        for node, site, applied in found:
            if node.target is torch.ops.aten.native_dropout.default:
                # fallback_random: eager's kernel in the graph; its mask is output 1.
                mask = next((u for u in node.users if u.target is operator.getitem
                             and u.args[1] == 1), None)
                if mask is None:
                    with graph.inserting_after(node):
                        mask = graph.call_function(operator.getitem, (node, 1))
                node = mask
            shape: list[Any] = []
            cursor = node
            if applied is not None:
                # The shape the noise is applied to, read at run time: under dynamic shapes
                # it is symbolic, and int() of it would specialize the graph (a guard, a
                # recompile). sym_size reads a size, never the data: nothing is materialized.
                cursor = applied
                for i, size in enumerate(applied.meta["val"].shape):
                    if type(size) is int:
                        shape.append(size)
                        continue
                    with graph.inserting_after(cursor):
                        cursor = graph.call_function(torch.ops.aten.sym_size.int, (applied, i))
                    cursor.meta["val"] = size
                    shape.append(cursor)
            with graph.inserting_after(cursor):
                graph.call_function(op, (node, shape, site))

    def uuid(self) -> str:
        # Inductor caches compiled graphs keyed on this: the pass's own source is in it, so
        # a changed pass never meets a graph an older one made.
        from torch._inductor.custom_graph_pass import get_hash_for_files

        digest = get_hash_for_files((os.path.abspath(__file__),)).hex()[:16]
        return f"dropspy-mask-tap-v{PASS_VERSION}-{digest}"


def _mask_nodes(graph: torch.fx.Graph) -> Any:
    aten, prims = torch.ops.aten, torch.ops.prims
    rand = {prims.inductor_random.default, aten.rand_like.default, aten.rand.default}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.native_dropout.default:
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            if isinstance(p, (int, float)) and train is not False:
                yield node, _site(node, float(p), "dropout", "x * mask * (1 / (1 - p))"), None
        elif node.target is aten.gt.Scalar:
            src, p = node.args[0], node.args[1]
            if (isinstance(src, torch.fx.Node) and src.target in rand
                    and isinstance(p, (int, float))):
                yield node, _site(node, float(p), "dropout", _INDUCTOR), None
        elif node.target is aten.bernoulli.p:
            q = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
            applied = _applied(node)
            if isinstance(q, (int, float)) and applied is not None:
                yield (node, _site(node, 1.0 - float(q), "feature_dropout",
                                   "x * (noise / (1 - p))"), applied)


def _applied(node: torch.fx.Node) -> torch.fx.Node | None:
    """The product ``x * (noise / q)`` of a feature-dropout noise: it has the applied shape."""
    for scaled in node.users:
        for use in scaled.users:
            if use.target is torch.ops.aten.mul.Tensor and use.meta.get("val") is not None:
                return use
    return None


_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]")
_PART = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]|\[['\"]([^'\"]+)['\"]\]|\[(\d+)\]"
                   r"|getattr\([^,]+,\s*['\"]([^'\"]+)['\"]\)")


def module_path(fqn: str) -> str:
    """``"L['self'].encoder.layers[0]._modules['drop']"`` -> ``"encoder.layers.0.drop"``."""
    rest = _ROOT.sub("", fqn)
    rest = _PART.sub(lambda m: "." + next(g for g in m.groups() if g is not None), rest)
    return rest.lstrip(".")


_INDUCTOR = "(x * mask) * (1 / (1 - p))"


def _site(node: torch.fx.Node, p: float, kind: str, formula: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path, cls, qual = "", "", ""
    if stack:
        fqn, typ = list(stack.values())[-1]
        path = module_path(str(fqn))
        cls = getattr(typ, "__name__", str(typ).rsplit(".", 1)[-1].rstrip("'>"))
        qual = getattr(typ, "__module__", "")
    where = None
    trace = node.meta.get("stack_trace") or ""
    hits = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if hits:
        where = f"{os.path.basename(hits[-1][0])}:{hits[-1][1]}"
    return json.dumps({"path": path, "cls": cls, "module": qual, "p": p, "kind": kind,
                       "where": where, "formula": formula}, sort_keys=True)


class CompiledTarget:
    """A compiled model: the module it runs, and its compiled call, swappable.

    Args:
        holder: The object whose attribute holds the compiled call.
        attr: ``"forward"`` (an ``OptimizedModule``) or ``"_compiled_call_impl"``
            (``module.compile()``).
        inner: The eager module being compiled (sites are named after its modules).
        ctx: Dynamo's context of the compile (backend, fullgraph, dynamic).
    """

    def __init__(self, holder: torch.nn.Module, attr: str, inner: torch.nn.Module,
                 ctx: Any) -> None:
        self.holder = holder
        self.attr = attr
        self.inner = inner
        self.ctx = ctx
        self._saved: Any = None
        self.kind = "OptimizedModule" if attr == "forward" else "module.compile()"

    def why_not(self) -> str | None:
        """Why this compile cannot carry the pass, or None when it can."""
        backend = self._backend()
        if backend is None:
            return "dropspy could not read the compile's backend from torch's Dynamo context"
        if type(backend).__name__ != "_TorchCompileInductorWrapper":
            name = getattr(backend, "compiler_name", None) or getattr(
                backend, "__name__", type(backend).__name__)
            return (f"the model is compiled with backend {name!r}; dropspy copies masks out "
                    f"of inductor graphs only")
        if backend.config.get("triton.cudagraphs"):
            return ("CUDA graphs (mode='reduce-overhead') replay the compiled step without "
                    "running Python between kernels; the mask cannot be copied out")
        used, limit = self._cache_entries(), int(torch._dynamo.config.recompile_limit)
        if id(backend) not in _TAPPED and used is not None and used + 1 >= limit:
            return (f"the compiled forward already holds {used} of Dynamo's {limit} cache "
                    f"entries (torch._dynamo.config.recompile_limit); one more compile with "
                    f"dropspy's pass could make Dynamo fall back to eager")
        return None

    def _cache_entries(self) -> int | None:
        """Dynamo cache entries of the compiled forward's code (None when unknown)."""
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list

            forward = getattr(type(self.inner), "forward", None)
            return len(_debug_get_cache_entry_list(forward.__code__))  # type: ignore[union-attr]
        except Exception:
            return None

    def _backend(self) -> Any:
        from torch._dynamo.eval_frame import innermost_backend

        callback = getattr(self.ctx, "callback", None)
        return None if callback is None else innermost_backend(callback)

    def swap(self, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Install ``wrap(compiled call carrying the pass)`` in place of the compiled call."""
        backend = _tapped_backend(self._backend())
        tap_op()
        options = {"backend": backend, "fullgraph": bool(getattr(self.ctx, "fullgraph", False)),
                   "dynamic": getattr(self.ctx, "_dynamic", None)}
        if self.attr == "forward":
            fn = torch.compile(self.inner, **options).forward  # type: ignore[attr-defined]
        else:
            fn = torch.compile(self.inner._call_impl, **options)
        self._saved = self.holder.__dict__.get(self.attr)
        self.holder.__dict__[self.attr] = wrap(fn)

    def restore(self) -> None:
        """Put the user's compiled call back."""
        if self._saved is not None:
            self.holder.__dict__[self.attr] = self._saved
            self._saved = None


# The user's backend -> its copy carrying the pass. One copy per backend, kept for the
# process: Dynamo guards on the backend's identity, so a second recording of the same model
# finds its compiled code instead of spending another of the limited cache entries.
_TAPPED: dict[int, tuple[Any, Any]] = {}


def _tapped_backend(backend: Any) -> Any:
    hit = _TAPPED.get(id(backend))
    if hit is not None and hit[0] is backend:
        return hit[1]
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    tapped = copy.copy(backend)
    base = backend.config.get("post_grad_custom_post_pass",
                              inductor_config.post_grad_custom_post_pass)
    tapped.config = {**backend.config, "post_grad_custom_post_pass":
                     [*get_custom_graph_passes(base), TapPass()]}
    _TAPPED[id(backend)] = (backend, tapped)
    return tapped


def compiled_target(model: torch.nn.Module) -> CompiledTarget | None:
    """The compile of ``model`` (``torch.compile(model)`` or ``model.compile()``), if any."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        return CompiledTarget(model, "forward", model._orig_mod, model.dynamo_ctx)
    fn = model.__dict__.get("_compiled_call_impl")
    if fn is None:
        return None
    ctx = None
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if hasattr(value, "callback") and hasattr(value, "fullgraph"):
            ctx = value
    return CompiledTarget(model, "_compiled_call_impl", model, ctx)


_KIND_RANK = {"dropout1d": 3, "dropout2d": 4, "dropout3d": 5, "feature_dropout": 4}
_EAGER_RNN = ("runs outside the compiled graph (Dynamo does not trace nn.LSTM/GRU/RNN unless "
              "torch._dynamo.config.allow_rnn=True), and dropspy's eager capture would change "
              "what Dynamo compiles around it; record the eager module to see these masks")


class CompiledRecording:
    """The compiled half of a torch adapter: swap, tap listener, opaque sites.

    Args:
        adapter: The :class:`~dropspy.frameworks.torch.adapter.TorchAdapter` (its capture,
            step clock and top-level forward hooks are reused: the swapped-in call runs them
            eagerly around the compiled call, where Dynamo never traces them).
        target: The model's compile.
    """

    def __init__(self, adapter: Any, target: CompiledTarget) -> None:
        self.adapter = adapter
        self.target = target
        self.reason: str | None = None
        self._specs: dict[str, dict[str, Any]] = {}
        self._listening = False
        # Masks of one traced RNN's gaps share one site string (same module, same source
        # line): the n-th of a forward is gap n.
        self._rnn_calls: dict[str, int] = {}
        self._tapped = False
        self._warned_untapped = False

    def attach(self) -> None:
        """Declare what cannot be recorded, then swap in the compile that carries the pass."""
        model = self.adapter.model
        self._declare_rnn_sites(model)
        self.reason = self.target.why_not()
        if self.reason is not None:
            self._declare_opaque(model, self.reason)
            self._warn(f"dropspy records this torch.compile'd model's dropout sites as "
                       f"opaque: {self.reason}. Training runs untouched.")
            return
        pre, post = self.adapter._root_pre_hook, self.adapter._root_post_hook

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                self._rnn_calls.clear()
                self._tapped = False
                pre(model, args)
                try:
                    return fn(*args, **kwargs)
                finally:
                    post(model, args, None)
                    if not self._tapped:
                        self._check_untapped()
            return call

        try:
            self.target.swap(wrap)
        except Exception as exc:  # never a crash: the user's compile stays, sites say why
            self.target.restore()
            self.reason = (f"dropspy could not set up its compile pass "
                           f"({type(exc).__name__}: {exc})")
            self._declare_opaque(model, self.reason)
            self._warn(f"dropspy records this torch.compile'd model's dropout sites as "
                       f"opaque: {self.reason}. Training runs untouched.")
            return
        add_listener(self._on_tap)
        self._listening = True

    def _warn(self, msg: str) -> None:
        import warnings

        from dropspy.errors import DropspyWarning

        self.adapter.session.note(msg)
        warnings.warn(msg, DropspyWarning, stacklevel=5)

    def detach(self) -> None:
        """Put the user's compile back and stop listening."""
        try:
            self.target.restore()
        finally:
            if self._listening:
                remove_listener(self._on_tap)
                self._listening = False

    def _check_untapped(self) -> None:
        """Say it when a training forward of the compiled model copied out no mask at all.

        Then its dropout ran outside inductor's graphs, where dropspy does not look: Dynamo
        compiled nothing (e.g. ``torch.compile`` of a DDP-wrapped ``nn.Sequential``, whose
        frames are all torch's own) or fell back to eager.
        """
        cap = self.adapter._capture
        model = self.adapter.model
        if self._warned_untapped or cap is None or not cap.capturing or not model.training:
            return
        active = [n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
                  and m.training]
        if not active:
            return
        self._warned_untapped = True
        import warnings

        from dropspy.errors import DropspyWarning

        msg = (f"a training forward of the compiled model copied out no dropout mask, though "
               f"{', '.join(active)} should apply one: that dropout ran outside inductor's "
               f"graphs (Dynamo compiled nothing there or fell back to eager) and is not "
               f"recorded. Record the eager model, or compile a module whose forward is your "
               f"own code.")
        self.adapter.session.note(msg)
        warnings.warn(msg, DropspyWarning, stacklevel=3)

    def _declare_rnn_sites(self, model: torch.nn.Module) -> None:
        from dropspy.frameworks.torch.sites import SiteFacts, SiteKey, dropout_scale

        reg = self.adapter._capture.sites
        traced = bool(torch._dynamo.config.allow_rnn)
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.RNNBase) or not m.dropout or m.num_layers < 2:
                continue
            p = float(m.dropout)
            for g in range(m.num_layers - 1):
                kind = "between_layers" if m.num_layers == 2 else f"between_layers/{g}"
                extra: dict[str, Any] = {"after_layer": g, "num_layers": m.num_layers,
                                         "compiled": "inductor"}
                if traced:
                    extra["allow_rnn"] = True
                reg.learn(SiteKey(name, kind, None), lambda extra=extra, p=p, m=m: SiteFacts(
                    layer_class=type(m).__name__, role="between_layers", rate=p,
                    scale=dropout_scale("dropout", p), opaque=None if traced else _EAGER_RNN,
                    extra=extra))
                # Declared now: compiled (allow_rnn) it may apply nothing, and then the site
                # must still be in the file, configured and never applied.
                reg.resolve(SiteKey(name, kind, None), 3)

    def _declare_opaque(self, model: torch.nn.Module, reason: str) -> None:
        from dropspy.frameworks.torch.capture import _MODULE_KINDS
        from dropspy.frameworks.torch.sites import SiteFacts, SiteKey, dropout_scale

        reg = self.adapter._capture.sites
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.modules.dropout._DropoutNd) or not m.p:
                continue
            kind = _MODULE_KINDS.get(type(m), "dropout")
            key = SiteKey(name, kind, None)
            p = float(m.p)
            reg.learn(key, lambda m=m, p=p, kind=kind: SiteFacts(
                layer_class=type(m).__name__, role="output", rate=p, own=True,
                scale=dropout_scale(kind, p), opaque=reason, extra={"compiled": "inductor"}))
            reg.resolve(key, _KIND_RANK.get(kind, 2))

    def _on_tap(self, mask: torch.Tensor, applied: Sequence[int], site: str) -> None:
        """A compiled graph drew ``mask`` at ``site``; never raises into the compiled step."""
        adapter = self.adapter
        cap = adapter._capture
        try:
            import threading

            if cap is None or threading.get_ident() != adapter._thread:
                return
            if not cap.active():
                return
            spec = self._specs.get(site)
            if spec is None:
                spec = self._specs[site] = self._resolve(site)
            shape = tuple(applied) if applied else tuple(mask.shape)
            noise = mask.detach().clone() if mask.dtype == torch.bool else mask.detach() != 0
            key = spec["key"]
            if spec["gaps"]:
                g = self._rnn_calls.get(site, 0)
                self._rnn_calls[site] = g + 1
                key = spec["gaps"][g % len(spec["gaps"])]
            else:
                cap.sites.learn(key, spec["facts"])
            cap.add(key, spec["training"](), tuple(int(s) for s in shape), noise)
            self._tapped = True
        except Exception as exc:  # a tap must never break the compiled step
            if cap is not None:
                cap.count_dropped("capture_error", 1)
                cap.note_once("tap", f"internal error while copying a compiled mask "
                              f"({type(exc).__name__}: {exc}); such masks are not recorded "
                              f"(counted as dropped: capture_error)")

    def _resolve(self, site: str) -> dict[str, Any]:
        from dropspy.frameworks.torch.capture import _MODULE_KINDS
        from dropspy.frameworks.torch.sites import FEATURE, SiteFacts, SiteKey, dropout_scale

        spec = json.loads(site)
        model = self.adapter.model
        path, module = _find_module(model, spec["path"])
        own = isinstance(module, torch.nn.modules.dropout._DropoutNd)
        kind: str = (_MODULE_KINDS.get(type(module), spec["kind"])  # type: ignore[arg-type,assignment]
                     if own else spec["kind"])
        p = float(spec["p"])
        key = SiteKey(path, kind, None if own else spec.get("where"))
        cls = type(module).__name__ if module is not None else (spec.get("cls") or "?")

        def facts() -> SiteFacts:
            return SiteFacts(layer_class=cls, role="output", rate=p, own=own,
                             scale=dropout_scale(kind, p),
                             extra={"compiled": "inductor", "formula": spec["formula"]})

        gaps: list[SiteKey] = []
        if isinstance(module, torch.nn.RNNBase):  # traced under allow_rnn: declared at attach
            n = module.num_layers - 1
            gaps = [SiteKey(path, "between_layers" if n == 1 else f"between_layers/{g}", None)
                    for g in range(n)]
        return {"key": key, "facts": facts, "gaps": gaps, "feature": kind in FEATURE,
                "training": (lambda: bool(module.training)) if module is not None else (
                    lambda: True)}


def _find_module(model: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module | None]:
    """The recorded model's module at ``path``, dropping wrapper prefixes (``module.``)."""
    parts = path.split(".") if path else []
    for start in range(len(parts) + 1):
        sub = ".".join(parts[start:])
        try:
            return sub, model.get_submodule(sub) if sub else model
        except AttributeError:
            continue
    return path, None
