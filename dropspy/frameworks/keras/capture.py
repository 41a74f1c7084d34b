"""Trace-time capture of the keep-masks Keras 3 (TensorFlow backend) draws.

Every Keras dropout goes through ``keras.src.backend.tensorflow.random.dropout``. While a
recorded train step runs (or is traced), that function is replaced by :func:`_patched_dropout`,
which builds the very same TensorFlow ops (``_dropout`` in TF's ``nn_ops`` with the stateless
uniform sampler Keras uses, the seed drawn once from the same generator) and also hands back the
boolean keep-mask that the final ``SelectV2`` uses. Nothing random is added and the output is
computed by TF's own code, so training is unchanged bit for bit.

The masks leave the compiled step as extra outputs of the train step (see ``keras.py``): Python
code here runs once per trace, so a trace collects :class:`Draw` objects whose tensors become
outputs, and whose metadata is kept on the host under a trace id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf
from keras.src.backend.common.symbolic_scope import in_symbolic_scope
from keras.src.backend.tensorflow import random as _tf_random
from keras.src.random.seed_generator import draw_seed

from dropspy.frameworks.keras_base import SharedPatch, TraceStack

__all__ = ["Frame", "Draw", "Trace", "current_trace", "push_trace", "pop_trace", "install",
           "uninstall", "exact_dropout"]

_ORIGINAL_DROPOUT = _tf_random.dropout
_OTHER_RANDOM = ("normal", "uniform", "truncated_normal", "categorical", "randint", "gamma",
                 "binomial", "beta", "shuffle")
_ORIGINALS: dict[str, Any] = {}


@dataclass
class Frame:
    """One active call on the layer stack of a trace.

    ``kind`` is ``"layer"`` (a layer's ``call``), ``"rnn"`` (an RNN layer's call: carries the
    training flag and the sequence), ``"td"`` (a ``TimeDistributed`` call) or ``"mask"`` (an RNN
    cell drawing its input or recurrent masks; ``role`` says which).
    """

    kind: str
    layer: Any
    training: Any = None
    sequence: Any = None
    role: str | None = None
    count: int = 0              # masks drawn so far in this frame (gate index, custom ordinal)
    start: int = 0              # len(trace.draws) when the frame was pushed (TimeDistributed)


@dataclass
class Draw:
    """One mask drawn while tracing a train step.

    ``keep`` is the boolean keep-noise at its noise shape; ``noise_shape`` / ``applied_shape``
    are int32 shape tensors; ``expand_time`` says the noise gets a size-1 time axis at position
    1 on the host (RNN masks: one mask at every timestep).
    """

    spec: Any
    keep: Any
    noise_shape: Any
    applied_shape: Any
    training: bool
    applied: bool
    expand_time: bool = False
    td_frame: Frame | None = None


@dataclass
class Trace:
    """The capture state of one train-step trace (or one eager step)."""

    owner: Any
    graph: Any
    eager: bool
    stack: list[Frame] = field(default_factory=list)
    draws: list[Draw] = field(default_factory=list)
    # Draws of this step that cannot be recorded, by cause: counted as dropped at every run.
    lost: dict[str, int] = field(default_factory=dict)


# This module's own stack: the other Keras adapter's traces never show up in it.
_traces = TraceStack()
current_trace = _traces.current
push_trace = _traces.push
pop_trace = _traces.pop


def exact_dropout(inputs: Any, rate: Any, noise_shape: Any = None,
                  seed: Any = None) -> tuple[Any, Any, Any]:
    """Keras' TF-backend dropout, op for op, returning the keep-mask too.

    Args:
        inputs: The tensor to drop from.
        rate: Drop rate (float or scalar tensor).
        noise_shape: Keras noise shape (None entries follow ``inputs``), or None.
        seed: Seed or ``SeedGenerator``, as Keras takes it (drawn from exactly once).

    Returns:
        ``(outputs, keep, noise_shape)``: the dropout output (the same bits Keras computes), the
        boolean keep-mask at the noise shape, and the noise shape as an int32 tensor.
    """
    # The same tests, in the same order, as keras' backend dropout (numpy scalars included).
    if rate == 1.0:
        out = tf.zeros_like(inputs)
        shape = _noise_shape_tensor(inputs, noise_shape)
        return out, tf.zeros(shape, tf.bool), shape
    if rate == 0.0:
        shape = _noise_shape_tensor(inputs, noise_shape)
        return inputs, tf.ones(shape, tf.bool), shape
    seed = _tf_random._cast_seed(draw_seed(seed))
    concrete = _tf_random._get_concrete_noise_shape(inputs, noise_shape)
    held: list[Any] = []

    def sampler(shape: Any, dtype: Any) -> Any:
        # The sampler tf.nn.experimental.stateless_dropout builds (alg=None: auto-select).
        r = tf.random.stateless_uniform(shape=shape, seed=seed, dtype=dtype, alg=None)
        held.append(r)
        return r

    out = tf.nn.experimental.general_dropout(inputs, rate=rate, uniform_sampler=sampler,
                                             noise_shape=concrete)
    keep = None
    if not tf.executing_eagerly() and getattr(out, "op", None) is not None \
            and out.op.type == "SelectV2":
        # The very tensor TF selected with: no recomputation.
        keep = out.op.inputs[0]
    if keep is None:
        r = held[0]
        thresh = rate if not tf.is_tensor(rate) else tf.cast(rate, r.dtype)
        keep = r >= thresh   # the comparison TF's _dropout makes, on the same samples
    return out, keep, tf.shape(keep, out_type=tf.int32)


def _noise_shape_tensor(inputs: Any, noise_shape: Any) -> Any:
    concrete = _tf_random._get_concrete_noise_shape(inputs, noise_shape)
    return tf.cast(tf.stack(concrete) if isinstance(concrete, list) else concrete, tf.int32)


def _patched_dropout(inputs: Any, rate: Any, noise_shape: Any = None, seed: Any = None) -> Any:
    trace = current_trace()
    # Shape inference (compute_output_spec in a scratch graph, e.g. a lazy build) draws
    # nothing that runs: leave it alone.
    if trace is None or in_symbolic_scope():
        if trace is None and _attached and not in_symbolic_scope():
            for owner in list(_attached):
                owner.on_untraced_dropout()
        return _ORIGINAL_DROPOUT(inputs, rate, noise_shape=noise_shape, seed=seed)
    return trace.owner.on_dropout(trace, inputs, rate, noise_shape, seed)


def _make_random_guard(name: str, original: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        trace = current_trace()
        if trace is not None and not in_symbolic_scope():
            trace.owner.on_other_random(trace, name)
        return original(*args, **kwargs)

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    guarded.__name__ = name
    return guarded


def _apply() -> None:
    _tf_random.dropout = _patched_dropout
    for name in _OTHER_RANDOM:
        fn = getattr(_tf_random, name, None)
        if fn is not None:
            _ORIGINALS[name] = fn
            setattr(_tf_random, name, _make_random_guard(name, fn))


def _restore() -> None:
    _tf_random.dropout = _ORIGINAL_DROPOUT
    for name, fn in _ORIGINALS.items():
        setattr(_tf_random, name, fn)
    _ORIGINALS.clear()


# Reference counted, one patch per process: the first install applies it, the last uninstall
# restores the originals.
_patch = SharedPatch(_apply, _restore)
_attached = _patch.attached   # adapters recording now: told about draws outside a recorded step
install = _patch.install
uninstall = _patch.uninstall


def installed() -> bool:
    """Whether the patch is in place (for tests)."""
    return _tf_random.dropout is _patched_dropout
