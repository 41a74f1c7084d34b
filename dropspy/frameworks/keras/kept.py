"""The recording variant of a Keras 3 model's step functions, kept across ``record()`` contexts.

Entering ``record()`` on a model whose train function exists sets that function aside and
builds a recording one; built afresh at every ``record()``, its trace (TF graph, XLA, JAX jit)
cost 0.7-3 s on small models, several times a short ``fit``. Nothing in that compiled function
depends on the session: sampling is decided on the host (``Session.want_step``), each trace's
draw metadata stays on the host under the trace id the step returns, and the step Keras
compiles is a stable one (:meth:`KeptVariant.step`) that hands every (re)trace to whichever
adapter records the model now. So the compiled functions are kept with the model, and the next
``record()`` only wraps them in a host wrapper of its own: its masks go to its own session and
file, and the trace is paid once per model.

A kept variant is used only while what it was traced for still holds (:func:`compile_key`):
the same ``compile()`` (Keras makes a new compile config at every ``compile``), optimizer,
``steps_per_execution``, ``jit_compile``, ``run_eagerly``, strategy and JAX distribution, the
same weights, and the same site selection (``sites=`` patterns: draws of unselected sites are
left out of the trace). Anything else changed: dropped and built again at the next use.

Outside ``record()`` none of it runs: on exit the model gets its own functions back exactly as
before; the kept ones hang off the model's ``_dropspy_kept`` attribute (not a tracked Keras
attribute, nothing Keras saves or trains) and go with the model. They hold no session, no
writer and no file, and the adapter only by a weak reference.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

from dropspy.records import SiteInfo

__all__ = ["ATTR", "KeptVariant", "compile_key"]

# The model attribute holding its kept variant (set with object.__setattr__: untracked).
ATTR = "_dropspy_kept"


def _distribution() -> Any:
    keras = sys.modules.get("keras")
    try:
        return keras.distribution.distribution() if keras is not None else None
    except Exception:   # a backend without keras.distribution
        return None


def compile_key(model: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """What the compiled step functions of ``model`` were built for.

    Returns:
        ``(objects, values)``: objects compared by identity (compile config, optimizer,
        strategy, JAX distribution), values by equality (steps per execution, jit_compile,
        run_eagerly).
    """
    objects = (model.__dict__.get("_compile_config"), getattr(model, "optimizer", None),
               getattr(model, "distribute_strategy", None), _distribution())
    values = (repr(getattr(model, "steps_per_execution", 1)),
              repr(getattr(model, "jit_compile", None)), repr(getattr(model, "run_eagerly", None)))
    return objects, values


def _weights(model: Any) -> dict[int, Any]:
    # By identity and as a set: a layer's trainable flag reorders model.weights but changes
    # nothing Keras would retrace for (that takes compile()). The values keep the variables
    # alive, so an id cannot be reused while it is compared.
    return {id(v): v for v in model.weights}


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    # Identity, not ==: Keras variables compare element-wise.
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class KeptVariant:
    """The recording step functions of one model, kept across ``record()`` contexts.

    ``compiled`` maps a step kind (train, test, predict) to the function Keras built from the
    stable step (TF: the whole function; JAX: the jitted step), before dropspy's host wrapper.
    ``traces`` holds each trace's draw metadata under its trace id (the adapter's ``_traces``),
    ``declared`` every site declared while tracing with whether it was selected, ``notes``
    what the traces said (both told again to each new session, since a kept function does not
    trace again), ``inner_buffers`` the TF buffers of ``steps_per_execution > 1`` (captured by
    the compiled function). ``traced`` counts traces of recorded steps (tests read it).
    """

    def __init__(self) -> None:
        self._adapter: weakref.ref[Any] | None = None
        self.key: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None
        self.weights: dict[int, Any] = {}
        self.steps: dict[str, tuple[Any, Callable[..., Any]]] = {}
        self.compiled: dict[str, Any] = {}
        self.traces: dict[int, Any] = {}
        self.declared: dict[str, tuple[SiteInfo, bool]] = {}
        self.notes: dict[str, str] = {}
        self.inner_buffers: dict[str, Any] = {}
        self.traced = 0

    @classmethod
    def of(cls, model: Any) -> KeptVariant:
        """The model's kept variant (a new, empty one the first time)."""
        kept = model.__dict__.get(ATTR)
        if not isinstance(kept, cls):
            kept = cls()
            object.__setattr__(model, ATTR, kept)
        return kept

    # -- lifecycle ---------------------------------------------------------------------------

    def adopt(self, adapter: Any) -> bool:
        """Hand the variant to ``adapter`` (entering ``record()``); False when it was dropped
        because the model changed since it was built."""
        model = adapter.model
        self._adapter = weakref.ref(adapter)
        key = compile_key(model)
        if self.key is not None and self._matches(key) \
                and self.weights.keys() == _weights(model).keys():
            return True
        # Recompiled or rebuilt: what the old traces declared and noted may no longer hold,
        # and nothing can run the dropped functions any more.
        self.reset(key, model)
        self.traces.clear()
        self.declared.clear()
        self.notes.clear()
        return False

    def release(self, adapter: Any) -> None:
        """Leaving ``record()``: forget the adapter; the variant stays valid for the weights
        the model has now (a first trace may have built some), unless it was recompiled."""
        if self.current() is adapter:
            self._adapter = None
        model = adapter.model
        if self.key is not None and self._matches(compile_key(model)):
            self.weights = _weights(model)
        for tid in [t for t, meta in self.traces.items() if getattr(meta, "eager", False)]:
            del self.traces[tid]   # an eager step's metadata, left by a step that raised
        for buffer in self.inner_buffers.values():
            try:   # an execution that raised may have left payloads: never hand them on
                buffer.drain()
            except Exception:
                pass

    def reset(self, key: tuple[tuple[Any, ...], tuple[Any, ...]], model: Any) -> None:
        """Drop the compiled functions (they are built again at their next use)."""
        self.key = key
        self.weights = _weights(model)
        self.compiled.clear()

    def current(self) -> Any:
        """The adapter recording the model now, or None."""
        adapter = self._adapter() if self._adapter is not None else None
        return adapter if adapter is not None and getattr(adapter, "_attached", False) else None

    def _matches(self, key: tuple[tuple[Any, ...], tuple[Any, ...]]) -> bool:
        assert self.key is not None
        return _same(self.key[0], key[0]) and self.key[1] == key[1]

    # -- functions ---------------------------------------------------------------------------

    def step(self, kind: str, original: Any, *, pair: bool) -> Callable[..., Any]:
        """The stable ``{kind}_step`` that compiled functions are built from.

        Each call (once per trace when compiled) runs ``original`` under the trace of the
        adapter recording now; with none (a function kept by someone past ``record()``) it is
        the model's own step.
        """
        known = self.steps.get(kind)
        if known is not None and known[0] == original:   # bound methods: same self and func
            return known[1]
        self.compiled.pop(kind, None)   # built from another step

        if pair:   # JAX: (state, data) -> (logs, state)
            def step_fn(state: Any, data: Any) -> Any:
                adapter = self.current()
                if adapter is None:
                    return original(state, data)
                return adapter._traced_step(lambda d: original(state, d), data, kind,
                                            pair=True)
        else:
            def step_fn(data: Any) -> Any:  # type: ignore[misc]
                adapter = self.current()
                if adapter is None:
                    return original(data)
                return adapter._traced_step(original, data, kind)

        step_fn.__wrapped__ = original  # type: ignore[attr-defined]
        self.steps[kind] = (original, step_fn)
        return step_fn

    def function(self, kind: str, model: Any, build: Callable[[], Any]) -> Any:
        """The kept compiled ``kind`` function if still valid, else the one ``build`` makes
        (kept from now on)."""
        key = compile_key(model)
        if self.key is None or not self._matches(key):
            self.reset(key, model)
        fn = self.compiled.get(kind)
        if fn is None:
            fn = self.compiled[kind] = build()
        return fn

    def declare(self, info: SiteInfo, selected: bool) -> None:
        """Remember a site a trace declared (told again to each later session)."""
        self.declared[info.name] = (info, selected)


class KeepsVariant:
    """What the Keras 3 adapter does to keep its step functions (mixin, before the base).

    The host class provides ``model``, ``session``, ``_sites``, ``_cap``, ``_traces``,
    ``_inner_buffers`` and the base's ``_declare``, ``_note_once``, ``_traced_step``,
    ``detach``.
    """

    model: Any
    session: Any
    _sites: Any
    _cap: Any
    _traces: dict[int, Any]
    _inner_buffers: dict[str, Any]
    _noted: set[str]
    _kept: KeptVariant | None = None
    _tracing = 0

    def _adopt_kept(self) -> None:
        """Take the model's kept variant (entering ``record()``), before sites are declared.

        The sites its traces declared are declared to this session too (in their order, with
        the opaque reasons they found), and what they noted is said again. A session that
        selects other sites than the traces did gets a fresh variant: the traces left the
        unselected sites' draws out.
        """
        kept = self._kept = KeptVariant.of(self.model)
        if kept.current() is not None:   # recorded now by another adapter (refused earlier)
            self._kept = kept = KeptVariant()
        kept.adopt(self)
        self._traces = kept.traces
        self._inner_buffers = kept.inner_buffers
        specs = {s.name: s for s in self._sites.all_specs()}
        declared, same = dict(kept.declared), True
        for name, (info, selected) in declared.items():
            spec = specs.get(name)
            if spec is not None and not spec.declared:
                spec.opaque = spec.opaque or info.opaque
                now = self._declare(spec, len(info.axes))
            else:   # made by a trace (custom or opaque site): declared as it was
                now = self.session.declare_site(info)
            kept.declared[name] = (info, now)
            same = same and now == selected
        for key, message in kept.notes.items():
            self._note_once(key, message)
        if not same and kept.key is not None:
            kept.reset(kept.key, self.model)
            kept.traces.clear()

    def _kept_step(self, kind: str, original: Any, *, pair: bool) -> Callable[..., Any]:
        """The model's stable ``{kind}_step`` (see :meth:`KeptVariant.step`)."""
        kept = self._kept if self._kept is not None else KeptVariant.of(self.model)
        return kept.step(kind, original, pair=pair)

    def _kept_function(self, kind: str, build: Callable[[], Any]) -> Any:
        """The kept compiled ``kind`` function, or the one ``build`` makes (kept from now)."""
        if self._kept is None:   # not recording: nothing to keep
            return build()
        return self._kept.function(kind, self.model, build)

    def _declare(self, spec: Any, rank: int) -> bool:
        fresh = not spec.declared
        selected: bool = super()._declare(spec, rank)  # type: ignore[misc]
        if fresh and self._kept is not None:
            self._kept.declare(spec.info(rank), selected)
        return selected

    def _note_once(self, key: str, message: str) -> None:
        if self._tracing and self._kept is not None and key not in self._noted:
            self._kept.notes[key] = message
        super()._note_once(key, message)  # type: ignore[misc]

    def _traced_step(self, original_step: Callable[..., Any], data: Any,
                     kind: str = "train", *, pair: bool = False) -> Any:
        if self._cap.eager():
            return super()._traced_step(  # type: ignore[misc]
                original_step, data, kind, pair=pair)
        if self._kept is not None:
            self._kept.traced += 1
        self._tracing += 1
        try:
            return super()._traced_step(  # type: ignore[misc]
                original_step, data, kind, pair=pair)
        finally:
            self._tracing -= 1

    def detach(self) -> None:
        """Restore the model; the kept variant stays with it, its trace metadata too."""
        kept, self._kept = self._kept, None
        self._traces = {}
        self._inner_buffers = {}
        try:
            super().detach()  # type: ignore[misc]
        finally:
            if kept is not None:
                kept.release(self)
