"""Trace-time capture of the keep-masks tf_keras (Keras 2) draws, inside time loops too.

Two patches, both reference counted and undone by :func:`uninstall`:

- ``tf_keras.src.backend.RandomGenerator.dropout``: every tf_keras dropout (layers and RNN cell
  masks) goes through it. In graph mode the original runs unchanged and the boolean keep-mask is
  read from the ``SelectV2`` that ends TF's ``_dropout`` (no op added, no random op added). In
  eager mode the sampler's output is held for the duration of the call and compared with the
  rate exactly as ``_dropout`` does.
- ``tf_keras.src.backend.rnn``: while a recorded step is traced, a copy of ``rnn`` runs whose
  ``tf.compat.v1.while_loop`` is :func:`_capturing_while_loop`. tf_keras RNN cells draw their
  masks inside the loop body (the cell's mask cache looks only at the current graph), so a new
  mask is applied at every timestep; those masks exist only inside the body. The loop gets one
  extra loop variable per mask, a ``(time, ...)`` bool buffer written at the loop counter
  (``tensor_scatter_nd_update``), and the buffers leave the loop with the other loop outputs.

Python code here runs once per trace; a :class:`Trace` collects :class:`Draw` objects whose
tensors become extra outputs of the train step (see ``tf_keras.py``).
"""

from __future__ import annotations

import inspect
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf
from tensorflow.python.ops import nn_ops
from tf_keras.src import backend as kbackend

from dropspy.frameworks.keras_base import SharedPatch, TraceStack

__all__ = ["Draw", "Loop", "Trace", "current_trace", "push_trace", "pop_trace", "install",
           "uninstall", "installed", "exact_dropout"]

_ORIGINAL_DROPOUT = kbackend.RandomGenerator.dropout
_ORIGINAL_RNN = kbackend.rnn
_RAW_RNN = inspect.unwrap(_ORIGINAL_RNN)
_RNN_SIGNATURE = inspect.signature(_RAW_RNN)
_eager_lock = threading.Lock()


@dataclass
class RoleFrame:
    """An RNN cell (or cuDNN-eligible layer) inside ``get_*dropout_mask_for_cell``."""

    layer: Any
    role: str
    count: int = 0


@dataclass
class Loop:
    """One ``backend.rnn`` call while a step is traced.

    ``outer``: masks drawn outside a while-loop body in this call, site name ->
    ``(spec, [keep, ...], step_shape)``: in graph mode the draw at time 0 (for shape inference
    only: never applied when the loop body draws again); in eager mode or with ``unroll=True``
    every draw, in order (RNN cells cache theirs: one draw serves every timestep).
    ``step_shape`` is the applied shape at one timestep. ``body``: masks drawn while tracing the
    loop body. ``buffers``: the per-timestep masks that left the loop, ``(time, batch, ...)`` in
    loop order.
    """

    inputs: Any
    go_backwards: bool
    time_major: bool
    unroll: bool
    outer: dict[str, tuple[Any, list[Any], Any]] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    body_graph: Any = None
    buffers: dict[str, Any] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)

    def time_steps(self) -> Any:
        """The number of timesteps, as an int32 scalar tensor."""
        first = tf.nest.flatten(self.inputs)[0]
        return tf.shape(first, out_type=tf.int32)[0 if self.time_major else 1]


@dataclass
class Draw:
    """One mask to export: keep-noise (bool, noise shape) and its int32 shape tensors."""

    spec: Any
    keep: Any
    noise_shape: Any
    applied_shape: Any
    training: bool = True
    applied: bool = True
    expand_time: bool = False


@dataclass
class Trace:
    """The capture state of one train-step trace (or one eager step)."""

    owner: Any
    graph: Any
    eager: bool
    training: bool = True        # a train step (False: an evaluate or predict step)
    roles: list[RoleFrame] = field(default_factory=list)
    loops: list[Loop] = field(default_factory=list)
    draws: list[Draw] = field(default_factory=list)
    # Draws of this step that cannot be recorded, by cause (the tf_keras adapter notes them
    # instead of counting them: it stays empty).
    lost: dict[str, int] = field(default_factory=dict)


# This module's own stack: the other Keras adapter's traces never show up in it.
_traces = TraceStack()
current_trace = _traces.current
push_trace = _traces.push
pop_trace = _traces.pop


def exact_dropout(generator: Any, inputs: Any, rate: Any, noise_shape: Any = None
                  ) -> tuple[Any, Any]:
    """``RandomGenerator.dropout`` unchanged, and the boolean keep-mask it selected with.

    Returns:
        ``(outputs, keep)``; ``keep`` is None when no keep-mask exists (rate 0).
    """
    if not tf.executing_eagerly():
        out = _ORIGINAL_DROPOUT(generator, inputs, rate, noise_shape)
        op = getattr(out, "op", None)
        if op is not None and op.type == "SelectV2":
            return out, op.inputs[0]   # the very tensor TF selected with
        return out, None
    held: list[Any] = []
    real = nn_ops._dropout
    me = threading.get_ident()

    def holding(*args: Any, **kwargs: Any) -> Any:
        sampler = kwargs.get("uniform_sampler")
        if sampler is not None and threading.get_ident() == me:   # not another thread's draw
            def keep_sample(*a: Any, **k: Any) -> Any:
                r = sampler(*a, **k)
                held.append(r)
                return r
            kwargs["uniform_sampler"] = keep_sample
        return real(*args, **kwargs)

    # Eager tensors carry no op to read the mask from: hold the uniform sample for the length
    # of this one call (the same sampler, the same draw), then compare as _dropout does.
    with _eager_lock:
        nn_ops._dropout = holding
        try:
            out = _ORIGINAL_DROPOUT(generator, inputs, rate, noise_shape)
        finally:
            nn_ops._dropout = real
    if not held:
        return out, None
    r = held[0]
    threshold = tf.cast(rate, r.dtype) if tf.is_tensor(rate) else rate
    return out, r >= threshold


def _patched_dropout(self: Any, inputs: Any, rate: Any, noise_shape: Any = None) -> Any:
    trace = current_trace()
    if trace is None:
        if _attached:
            for owner in list(_attached):
                owner.on_untraced_dropout(self)
        return _ORIGINAL_DROPOUT(self, inputs, rate, noise_shape)
    return trace.owner.on_dropout(trace, self, inputs, rate, noise_shape)


class _Forward:
    """A module stand-in: one attribute replaced, everything else read from ``real``."""

    def __init__(self, real: Any, **replaced: Any) -> None:
        self._real = real
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _capturing_while_loop(cond: Any, body: Any, loop_vars: Any, **kwargs: Any) -> Any:
    real = tf.compat.v1.while_loop
    trace = current_trace()
    loop = trace.loops[-1] if trace is not None and trace.loops else None
    if loop is None or trace.eager or tf.executing_eagerly() or not loop.outer \
            or not isinstance(loop_vars, (tuple, list)):
        return real(cond, body, loop_vars, **kwargs)
    names = list(loop.outer)
    t = loop.time_steps()
    buffers = tuple(
        tf.zeros(tf.concat([tf.reshape(t, [1]), tf.shape(keep, out_type=tf.int32)], 0), tf.bool)
        for _, keeps, _ in (loop.outer[n] for n in names) for keep in keeps[-1:])
    n_vars = len(loop_vars)

    def cond2(*args: Any) -> Any:
        return cond(*args[:n_vars])

    def body2(*args: Any) -> Any:
        loop.body_graph = tf.compat.v1.get_default_graph()
        out = body(*args[:n_vars])
        time = args[0]   # backend.rnn's loop counter: the first loop variable
        index = tf.reshape(tf.cast(time, tf.int32), [1, 1])
        new = []
        for name, buf in zip(names, args[n_vars:]):
            keep = loop.body.get(name)
            if keep is None:
                loop.missing.add(name)
                new.append(buf)
            else:
                new.append(tf.tensor_scatter_nd_update(buf, index, keep[None]))
        return tuple(out) + tuple(new)

    result = real(cond2, body2, tuple(loop_vars) + buffers, **kwargs)
    for i, name in enumerate(names):
        if name not in loop.missing and name in loop.body:
            loop.buffers[name] = result[n_vars + i]
    head = result[:n_vars]
    return list(head) if isinstance(loop_vars, list) else tuple(head)


_TF_PROXY = _Forward(kbackend.tf, compat=_Forward(
    kbackend.tf.compat, v1=_Forward(kbackend.tf.compat.v1, while_loop=_capturing_while_loop)))
_RNN_COPY = types.FunctionType(_RAW_RNN.__code__, {**_RAW_RNN.__globals__, "tf": _TF_PROXY},
                               _RAW_RNN.__name__, _RAW_RNN.__defaults__, _RAW_RNN.__closure__)
_RNN_COPY.__kwdefaults__ = _RAW_RNN.__kwdefaults__


def _patched_rnn(*args: Any, **kwargs: Any) -> Any:
    trace = current_trace()
    if trace is None:
        return _ORIGINAL_RNN(*args, **kwargs)
    bound = _RNN_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    loop = Loop(inputs=a["inputs"], go_backwards=bool(a["go_backwards"]),
                time_major=bool(a["time_major"]), unroll=bool(a["unroll"]))
    trace.loops.append(loop)
    try:
        result = _RNN_COPY(*args, **kwargs)
    finally:
        trace.loops.pop()
    trace.owner.on_loop_done(trace, loop)
    return result


_patched_rnn.__wrapped__ = _ORIGINAL_RNN  # type: ignore[attr-defined]


def _apply() -> None:
    kbackend.RandomGenerator.dropout = _patched_dropout
    kbackend.rnn = _patched_rnn


def _restore() -> None:
    kbackend.RandomGenerator.dropout = _ORIGINAL_DROPOUT
    kbackend.rnn = _ORIGINAL_RNN


# Reference counted, one patch per process: the first install applies it, the last uninstall
# restores the originals.
_patch = SharedPatch(_apply, _restore)
_attached = _patch.attached   # adapters recording now: told about draws outside a recorded step
install = _patch.install
uninstall = _patch.uninstall


def installed() -> bool:
    """Whether the patches are in place (for tests)."""
    return kbackend.RandomGenerator.dropout is _patched_dropout or kbackend.rnn is _patched_rnn
