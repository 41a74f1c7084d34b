"""Trace-time capture of the keep-masks Keras 3 draws on the TensorFlow backend.

Every Keras dropout goes through ``keras.src.backend.tensorflow.random.dropout``. While a
recorded step runs (or is traced), that function is replaced by one that builds the very same
TensorFlow ops (``_dropout`` in TF's ``nn_ops`` with the stateless uniform sampler Keras uses,
the seed drawn once from the same generator) and also hands back the boolean keep-mask that the
final ``SelectV2`` uses. Nothing random is added and the output is computed by TF's own code, so
training is unchanged bit for bit. The shared parts (trace, frames, the patch) are in
:mod:`dropspy.frameworks.keras.tracing`.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from keras.src.backend.tensorflow import random as _tf_random
from keras.src.random.seed_generator import draw_seed

from dropspy.frameworks.keras.tracing import BackendCapture, Draw, Frame, Trace

__all__ = ["Frame", "Draw", "Trace", "TFCapture", "InnerStepBuffer", "CAPTURE", "current_trace",
           "push_trace", "pop_trace", "install", "uninstall", "installed", "exact_dropout"]


class TFCapture(BackendCapture):
    """The TensorFlow backend's capture (graph, XLA and eager steps)."""

    name = "tensorflow"

    def __init__(self, random_module: Any) -> None:
        super().__init__(random_module)
        self._trainer = _TrainerPatch()

    def _apply(self) -> None:
        super()._apply()
        self._trainer.apply()

    def _restore(self) -> None:
        super()._restore()
        self._trainer.restore()

    def exact_dropout(self, inputs: Any, rate: Any, noise_shape: Any = None,
                      seed: Any = None) -> tuple[Any, Any, Any]:
        return exact_dropout(inputs, rate, noise_shape, seed)

    def eager(self) -> bool:
        return bool(tf.executing_eagerly())

    def scope(self) -> Any:
        return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()

    def in_inner_scope(self, trace: Trace, keep: Any) -> bool:
        return not trace.eager and keep.graph is not trace.graph

    def rank(self, x: Any) -> int | None:
        r = x.shape.rank
        return None if r is None else int(r)

    def static_bool(self, value: Any) -> bool:
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        static = tf.get_static_value(value)
        return bool(static) if static is not None else True

    def shape_vector(self, x: Any) -> Any:
        return tf.shape(x, out_type=tf.int32)

    def int_vector(self, values: list[int]) -> Any:
        return tf.constant(list(values), tf.int32)

    def concat(self, parts: list[Any]) -> Any:
        return tf.concat(parts, 0)

    def stack(self, parts: list[Any], axis: int) -> Any:
        return tf.stack(parts, axis=axis)

    def flatten(self, x: Any) -> Any:
        return tf.reshape(x, [-1])

    def empty_bits(self) -> Any:
        return tf.zeros([0], tf.bool)

    def to_numpy(self, x: Any) -> Any:
        import numpy as np

        return np.asarray(x)


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


def _replica_payloads(payload: Any, strategy: Any) -> Any:
    """One step's payload as a list, one ``{"bits", "dims"}`` per replica, in replica order."""
    bits = strategy.experimental_local_results(payload["bits"])
    dims = strategy.experimental_local_results(payload["dims"])
    return {"replicas": tuple({"bits": b, "dims": d} for b, d in zip(bits, dims))}


def _make_reduce(original: Any) -> Any:
    """Keras' ``reduce_per_replica``, leaving the masks per replica.

    Keras averages every step output across replicas (``reduction="auto"`` is a mean off TPU):
    masks must not be averaged, so the payload is taken out, the rest reduced as Keras does,
    and each replica's own payload put back beside it.
    """
    from dropspy.frameworks.keras_base import OUTPUT_KEY

    def reduce_per_replica(values: Any, strategy: Any, reduction: Any) -> Any:
        if not isinstance(values, dict) or OUTPUT_KEY not in values \
                or getattr(strategy, "num_replicas_in_sync", 1) <= 1:
            return original(values, strategy, reduction)
        rest = dict(values)
        payload = rest.pop(OUTPUT_KEY)
        out = dict(original(rest, strategy, reduction))
        out[OUTPUT_KEY] = _replica_payloads(payload, strategy)
        return out

    reduce_per_replica.__wrapped__ = original  # type: ignore[attr-defined]
    return reduce_per_replica


class _TrainerPatch:
    """Puts the per-replica ``reduce_per_replica`` into Keras' TF trainer while recording."""

    def __init__(self) -> None:
        from keras.src.backend.tensorflow import trainer as _trainer

        self.module = _trainer
        self.original = _trainer.reduce_per_replica
        self.patched = _make_reduce(self.original)

    def apply(self) -> None:
        self.module.reduce_per_replica = self.patched

    def restore(self) -> None:
        self.module.reduce_per_replica = self.original


class InnerStepBuffer:
    """Where the masks of every inner step of one execution wait for the host
    (``steps_per_execution > 1``).

    Keras' TF loop keeps only the last step's outputs, so each step also appends its payload to
    two dropspy-owned variables (never model variables: nothing the model saves or trains):
    ``bits`` and ``dims``, the latter prefixed per step by ``[n_bits, n_dims]``. The host
    drains them after each execution. Appending rather than writing row ``counter % spe`` of
    a fixed buffer: the variables take any length, so no step can draw more than fits and no
    rebuild is needed; an execution holds at most ``steps_per_execution`` payloads.
    """

    def __init__(self) -> None:
        with tf.init_scope():
            self.bits = tf.Variable(tf.zeros([0], tf.bool), shape=tf.TensorShape([None]),
                                    trainable=False, name="dropspy_inner_bits")
            self.dims = tf.Variable(tf.zeros([0], tf.int32), shape=tf.TensorShape([None]),
                                    trainable=False, name="dropspy_inner_dims")

    def write(self, payload: dict[str, Any]) -> None:
        """Append one step's payload (inside the traced step)."""
        bits, dims = payload["bits"], payload["dims"]
        head = tf.stack([tf.size(bits, out_type=tf.int32), tf.size(dims, out_type=tf.int32)])
        self.bits.assign(tf.concat([self.bits, bits], 0), read_value=False)
        self.dims.assign(tf.concat([self.dims, head, dims], 0), read_value=False)

    def drain(self) -> list[dict[str, Any]]:
        """The payloads appended since the last drain, in step order (on the host)."""
        import numpy as np

        bits, dims = self.bits.numpy(), self.dims.numpy()
        self.bits.assign(tf.zeros([0], tf.bool))
        self.dims.assign(tf.zeros([0], tf.int32))
        out, b, d = [], 0, 0
        while d < len(dims):
            nb, nd = int(dims[d]), int(dims[d + 1])
            out.append({"bits": bits[b:b + nb], "dims": np.asarray(dims[d + 2:d + 2 + nd])})
            b, d = b + nb, d + 2 + nd
        return out


CAPTURE = TFCapture(_tf_random)
_ORIGINAL_DROPOUT = CAPTURE.original_dropout
current_trace = CAPTURE.current_trace
push_trace = CAPTURE.push_trace
pop_trace = CAPTURE.pop_trace
install = CAPTURE.install
uninstall = CAPTURE.uninstall
installed = CAPTURE.installed
