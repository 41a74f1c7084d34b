"""Trace-time capture of the keep-masks Keras 3 draws on the JAX backend.

Keras' JAX ``random.dropout`` draws a seed from the layer's ``SeedGenerator``, samples
``jax.random.bernoulli(seed, keep_prob, noise_shape)``, broadcasts it and returns
``lax.select(mask, inputs / keep_prob, 0)``. While a recorded step is traced, the same ops are
built here in the same order (the division stays a division: XLA turns it into the multiply it
would have made anyway), and the Bernoulli sample is kept: it leaves the jitted step as an
extra log entry and is taken out on the host before any callback sees it. Nothing random is
added, so the seed-generator states and every output stay bit-identical.

Under ``keras.distribution.DataParallel`` the step is one SPMD program over global arrays:
the seed is replicated, ``jax.random.bernoulli`` draws one global mask (threefry is
partitionable: the bits do not depend on the sharding) and each device computes the rows of
its own batch shard. So a record is the global mask, bit for bit the one a single device
draws for the same seed; its rows were applied on the device holding those batch rows (the
``distribution`` root attribute says which). Each mask leaves the step at its own shape and
sharding (:meth:`JaxCapture.keeps_apart`), so no collective is added to the step.

``jax.debug.callback`` would also work but cost 2-2.5x per step and delivers masks out of order
(measured on the reference model): not used.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax._src import core as _jax_core
from jax._src.interpreters.partial_eval import DynamicJaxprTrace
from keras.src.backend.jax import random as _jax_random

from dropspy.frameworks.keras.tracing import BackendCapture, Draw, Frame, Trace

__all__ = ["Frame", "Draw", "Trace", "JaxCapture", "CAPTURE"]


def _current_jax_trace() -> Any:
    return _jax_core.trace_ctx.trace


class JaxCapture(BackendCapture):
    """The JAX backend's capture (jitted and eager steps)."""

    name = "jax"

    def exact_dropout(self, inputs: Any, rate: Any, noise_shape: Any = None,
                      seed: Any = None) -> tuple[Any, Any, Any]:
        jnp = jax.numpy
        # The same tests, in the same order, as keras' JAX dropout.
        if rate == 1.0:
            shape = _jax_random._get_concrete_noise_shape(inputs, noise_shape)
            return jnp.zeros_like(inputs), jnp.zeros(shape, bool), self.int_vector(shape)
        if rate == 0.0:
            shape = _jax_random._get_concrete_noise_shape(inputs, noise_shape)
            return inputs, jnp.ones(shape, bool), self.int_vector(shape)
        seed = _jax_random.jax_draw_seed(seed)
        keep_prob = 1.0 - rate
        shape = _jax_random._get_concrete_noise_shape(inputs, noise_shape)
        keep = jax.random.bernoulli(seed, p=keep_prob, shape=shape)
        mask = jnp.broadcast_to(keep, inputs.shape)
        out = jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
        return out, keep, self.int_vector(shape)

    def eager(self) -> bool:
        return self.scope() is None

    def scope(self) -> Any:
        # The innermost jit trace. value_and_grad inside jit runs the forward under a JVP
        # trace whose parent is jit's: look through such traces.
        t = _current_jax_trace()
        for _ in range(32):
            if t is None or isinstance(t, DynamicJaxprTrace):
                return t
            t = getattr(t, "parent_trace", None)
        return None

    def in_inner_scope(self, trace: Trace, keep: Any) -> bool:
        if trace.eager:
            return isinstance(keep, _jax_core.Tracer)
        owner = getattr(keep, "_trace", None)
        # A Bernoulli of a seed is made by jit's trace even under value_and_grad (the seed is
        # not differentiated); one made by another trace (lax.scan, cond, eval_shape) would
        # leak a tracer if it left the step.
        return owner is not trace.graph

    def shape_vector(self, x: Any) -> Any:
        return self.int_vector(list(x.shape))

    def int_vector(self, values: Any) -> Any:
        return jax.numpy.asarray(np.asarray(list(values), np.int32))

    def concat(self, parts: list[Any]) -> Any:
        return jax.numpy.concatenate(parts, 0)

    def stack(self, parts: list[Any], axis: int) -> Any:
        return jax.numpy.stack(parts, axis=axis)

    def flatten(self, x: Any) -> Any:
        return jax.numpy.reshape(x, (-1,))

    def empty_bits(self) -> Any:
        return jax.numpy.zeros((0,), bool)

    def keeps_apart(self) -> bool:
        """Whether each mask leaves the step at its own shape (a ``keras.distribution``).

        Under ``DataParallel`` the step is one SPMD program and a mask is a global array
        sharded along the batch like the rows it drops; one flat vector of all masks would
        make XLA all-gather every shard inside the step (measured: 10 all-gathers on the
        reference model). Kept apart, each stays where it was drawn and is read shard by
        shard on the host: the compiled step has the collectives it has without dropspy.
        """
        from keras import distribution

        return distribution.distribution() is not None

    def to_numpy(self, x: Any) -> Any:
        return np.asarray(x)


CAPTURE = JaxCapture(_jax_random)
