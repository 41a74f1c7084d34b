"""What every Keras 3 backend capture shares: the trace of one step and the backend patch.

A capture (``capture_tf``, ``capture_jax``, ``capture_torch``) is a :class:`BackendCapture`:
it replaces its backend's ``random.dropout`` while recording by an op-for-op identical version
that also hands back the keep-mask (:meth:`BackendCapture.exact_dropout`), and it provides the
few tensor operations the step payload needs (shape vectors, concatenation, stacking), so that
the adapter, the draw router and the payload never name a backend. Python code of a traced
step runs once per trace (TF graph, JAX jit) or once per step (eager, torch): a
:class:`Trace` collects the :class:`Draw` objects of that run, whose tensors become outputs of
the step and whose metadata stays on the host under a trace id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dropspy.frameworks.keras_base import SharedPatch, TraceStack

__all__ = ["Frame", "Draw", "Trace", "BackendCapture"]

_OTHER_RANDOM = ("normal", "uniform", "truncated_normal", "categorical", "randint", "gamma",
                 "binomial", "beta", "shuffle")


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
    """One mask drawn while tracing a step.

    ``keep`` is the boolean keep-noise at its noise shape; ``noise_shape`` / ``applied_shape``
    are int32 shape vectors of the backend; ``expand_time`` says the noise gets a size-1 time
    axis at position 1 on the host (RNN masks: one mask at every timestep).
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
    """The capture state of one step trace (or one eager step).

    ``graph`` is the backend's scope of the step (TF graph, JAX trace, None when eager): a
    mask made in another scope (a loop body, a branch) cannot leave the step.
    """

    owner: Any
    graph: Any
    eager: bool
    stack: list[Frame] = field(default_factory=list)
    draws: list[Draw] = field(default_factory=list)
    # Draws of this step that cannot be recorded, by cause: counted as dropped at every run.
    lost: dict[str, int] = field(default_factory=dict)


class BackendCapture:
    """One backend's capture (subclassed per backend; one instance per process and backend).

    Args:
        random_module: The backend's ``keras.src.backend.<name>.random`` module.
    """

    name = "?"
    Frame = Frame
    Draw = Draw
    Trace = Trace

    def __init__(self, random_module: Any) -> None:
        self.random = random_module
        self.original_dropout = random_module.dropout
        self._originals: dict[str, Any] = {}
        self._traces = TraceStack()
        self.current_trace = self._traces.current
        self.push_trace = self._traces.push
        self.pop_trace = self._traces.pop
        # Reference counted, one patch per process: the first install applies it, the last
        # uninstall restores the originals.
        self._patch = SharedPatch(self._apply, self._restore)
        self.attached = self._patch.attached   # told about draws outside a recorded step
        self.install = self._patch.install
        self.uninstall = self._patch.uninstall
        self._patched = self._make_patched_dropout()

    # -- the patch ---------------------------------------------------------------------------

    def _make_patched_dropout(self) -> Any:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope

        original = self.original_dropout

        def dropout(inputs: Any, rate: Any, noise_shape: Any = None, seed: Any = None) -> Any:
            trace = self.current_trace()
            # Shape inference (compute_output_spec, e.g. a lazy build) draws nothing that
            # runs: leave it alone.
            if trace is None or in_symbolic_scope():
                if trace is None and self.attached and not in_symbolic_scope():
                    for owner in list(self.attached):
                        owner.on_untraced_dropout()
                return original(inputs, rate, noise_shape=noise_shape, seed=seed)
            return trace.owner.on_dropout(trace, inputs, rate, noise_shape, seed)

        dropout.__wrapped__ = original  # type: ignore[attr-defined]
        return dropout

    def _guard(self, name: str, original: Any) -> Any:
        from keras.src.backend.common.symbolic_scope import in_symbolic_scope

        def guarded(*args: Any, **kwargs: Any) -> Any:
            trace = self.current_trace()
            if trace is not None and not in_symbolic_scope():
                trace.owner.on_other_random(trace, name)
            return original(*args, **kwargs)

        guarded.__wrapped__ = original  # type: ignore[attr-defined]
        guarded.__name__ = name
        return guarded

    def _apply(self) -> None:
        self.random.dropout = self._patched
        for name in _OTHER_RANDOM:
            fn = getattr(self.random, name, None)
            if fn is not None:
                self._originals[name] = fn
                setattr(self.random, name, self._guard(name, fn))

    def _restore(self) -> None:
        self.random.dropout = self.original_dropout
        for name, fn in self._originals.items():
            setattr(self.random, name, fn)
        self._originals.clear()

    def installed(self) -> bool:
        """Whether the patch is in place (for tests)."""
        return self.random.dropout is self._patched

    # -- per backend -------------------------------------------------------------------------

    def exact_dropout(self, inputs: Any, rate: Any, noise_shape: Any = None,
                      seed: Any = None) -> tuple[Any, Any, Any]:  # pragma: no cover - abstract
        """The backend's dropout, op for op: ``(outputs, keep-mask at noise shape, shape)``."""
        raise NotImplementedError

    def eager(self) -> bool:  # pragma: no cover - abstract
        """Whether Python runs once per step here (no graph or jit trace being built)."""
        raise NotImplementedError

    def scope(self) -> Any:
        """The backend's current trace scope (graph, JAX trace), None when eager."""
        return None

    def in_inner_scope(self, trace: Any, keep: Any) -> bool:
        """Whether ``keep`` was made in a scope that cannot leave the step (loop, branch)."""
        return False

    def rank(self, x: Any) -> int | None:
        """The static rank of ``x``, or None when unknown."""
        return len(x.shape)

    def static_bool(self, value: Any) -> bool:
        """A training flag as a Python bool (True when only known at run time)."""
        if value is None:
            return False
        try:
            return bool(value)
        except Exception:   # a symbolic value: the layer may train
            return True

    def shape_vector(self, x: Any) -> Any:
        """The shape of ``x`` as an int32 vector of the backend."""
        return self.int_vector(list(x.shape))

    def int_vector(self, values: list[int]) -> Any:
        """A constant int32 vector."""
        from keras import ops

        return ops.convert_to_tensor(list(values), dtype="int32")

    def concat(self, parts: list[Any]) -> Any:
        """Vectors joined end to end."""
        from keras import ops

        return ops.concatenate(parts, axis=0)

    def stack(self, parts: list[Any], axis: int) -> Any:
        """Tensors of one shape stacked along a new ``axis``."""
        from keras import ops

        return ops.stack(parts, axis=axis)

    def flatten(self, x: Any) -> Any:
        """``x`` as a vector."""
        from keras import ops

        return ops.reshape(x, [-1])

    def empty_bits(self) -> Any:
        """An empty bool vector (a step without applied draws)."""
        from keras import ops

        return ops.zeros([0], dtype="bool")

    def to_numpy(self, x: Any) -> Any:
        """A host numpy copy of a payload tensor."""
        from keras import ops

        return ops.convert_to_numpy(x)
