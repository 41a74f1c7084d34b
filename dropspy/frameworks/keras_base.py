"""Framework-free pieces both Keras adapters need: axis names, scales, the step payload, and
:class:`KerasAdapterBase`, the lifecycle both adapter classes share.

Nothing here imports Keras or tf_keras. The step payload is built with the adapter's capture
(each Keras 3 backend's capture brings its tensor operations; the Keras 2 capture module uses
:class:`_TFOps`, which imports TensorFlow inside its methods only), so the Keras 2 adapter can
use it without importing Keras 3 (``dropspy.frameworks.keras.sites`` imports ``keras`` at
module level). The naming rules are the Keras 3 adapter's (``dropspy.frameworks.keras.sites``),
so that both adapters name a model's sites and axes the same way and ``dropspy diff`` lines
the two runs up site by site.

Over 600 lines because it holds two things both adapters share: site naming (axes, noise
shapes, scales) and :class:`KerasAdapterBase` (the lifecycle); a split into
``keras_naming.py`` and ``keras_base.py`` is the next step when either grows.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dropspy.errors import RecordingError, UnsupportedModelError
from dropspy.frameworks.base import Session
from dropspy.records import Record, SiteInfo

__all__ = ["OUTPUT_KEY", "PREDICT_OUTPUTS_KEY", "DrawMeta", "SiteSpec", "KerasAdapterBase",
           "SharedPatch", "TraceStack", "axes_for", "dropout_shape_fns", "float32_scale",
           "decode_step"]

# Key of the extra train-step output; removed before any callback sees the logs.
OUTPUT_KEY = "_dropspy_masks"
# Key under which a predict step's own outputs travel next to the masks.
PREDICT_OUTPUTS_KEY = "_dropspy_predict_outputs"

_trace_ids = itertools.count(1)


def _spatial_names(n: int) -> tuple[str, ...]:
    return {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}.get(
        n, tuple(f"spatial{k}" for k in range(n))
    )


def axes_for(rank: int, data_format: str | None = None, *,
             sequence: bool = True) -> tuple[str, ...]:
    """Names for the axes of a tensor of ``rank`` in Keras' layout.

    The same rule as ``dropspy.frameworks.keras.sites.axes_for``.

    Args:
        rank: Number of dimensions, batch included.
        data_format: ``"channels_last"`` (Keras' default), ``"channels_first"``, or None.
        sequence: Whether a rank-3 tensor is ``(batch, time, feature)`` (True) or an image-like
            ``(batch, width, channel)``.

    Returns:
        A tuple of axis names, e.g. ``("batch", "time", "feature")``.
    """
    if rank <= 0:
        return ()
    if rank == 1:
        return ("batch",)
    if rank == 2:
        return ("batch", "feature")
    if rank == 3 and sequence:
        return ("batch", "time", "feature")
    spatial = _spatial_names(rank - 2)
    if data_format == "channels_first":
        return ("batch", "channel", *spatial)
    return ("batch", *spatial, "channel")


def dropout_shape_fns(spatial: int, data_format: str | None = None,
                      configured: Any = None) -> tuple[Callable[[int], tuple[int | None, ...]],
                                                       Callable[[int], tuple[str, ...]]]:
    """The ``(noise_fn, axes_fn)`` of a Dropout-family layer, for :class:`SiteSpec`.

    Args:
        spatial: 0 for ``Dropout`` (``configured`` noise shape), 1 for ``SpatialDropout1D``,
            2 or 3 for ``SpatialDropout2D`` / ``SpatialDropout3D``.
        data_format: The layer's ``data_format`` (spatial 2 and 3).
        configured: The layer's ``noise_shape`` (spatial 0), or None.
    """
    if spatial == 1:
        return (lambda r: (None, 1, None)), (lambda r: ("batch", "time", "feature"))
    if spatial:
        def noise_fn(r: int, df: str | None = data_format) -> tuple[int | None, ...]:
            if df == "channels_first":
                return (None, None) + (1,) * (r - 2)
            return (None,) + (1,) * (r - 2) + (None,)
        return noise_fn, (lambda r, df=data_format: axes_for(r, df or "channels_last"))
    return fixed_noise_fn(configured), (lambda r: axes_for(r))


def fixed_noise_fn(configured: Any) -> Callable[[int], tuple[int | None, ...]]:
    """The noise function of a configured ``noise_shape`` (None: follow the input); a call at
    a rank other than the configured one follows the input."""
    fixed: tuple[int | None, ...] | None = None if configured is None else tuple(configured)

    def noise(r: int) -> tuple[int | None, ...]:
        return fixed if fixed is not None and len(fixed) == r else (None,) * r

    return noise


def add_time_axis(spec: SiteSpec) -> None:
    """Make ``spec`` describe its layer inside ``TimeDistributed``: a time axis at position 1
    (a new mask at every timestep, so the noise follows the input along it)."""
    axes, noise = spec.axes_fn, spec.noise_fn

    def axes_fn(r: int) -> tuple[str, ...]:
        inner = axes(r - 1)
        return (inner[0], "time", *inner[1:])

    def noise_fn(r: int) -> tuple[int | None, ...]:
        inner = noise(r - 1) if noise is not None else None
        inner = (None,) * (r - 1) if inner is None else inner
        return (inner[0], None, *inner[1:])

    spec.axes_fn, spec.noise_fn = axes_fn, noise_fn


def float32_scale(rate: float | None) -> float | None:
    """The float32 multiplier TF applies to kept elements (``1 / (1 - rate)`` rounded)."""
    if rate is None or not 0.0 < rate < 1.0:
        return None
    return float(np.float32(1.0 / (1.0 - rate)))


@dataclass
class SiteSpec:
    """What recording knows about one site before (and after) its rank is known.

    Field for field the Keras 3 adapter's ``keras_sites.SiteSpec``, so both adapters can share
    this one.

    Args:
        name: Site name (``"dropout"``, ``"lstm/input/i"``).
        layer: Layer path.
        layer_class: Class name of the layer the site belongs to.
        role: Site role (see :class:`~dropspy.store.SiteInfo`).
        rate: Configured drop rate, or None when unknown.
        gate: Gate name for per-gate RNN masks.
        axes_fn: Maps the applied mask's rank to axis names.
        noise_fn: Maps the rank to the configured noise shape (None entries follow the input).
        rank: Applied rank when known in advance.
        opaque: Reason the site cannot be observed, or None.
        extra: JSON-able facts stored with the site.
    """

    name: str
    layer: str
    layer_class: str
    role: str
    rate: float | None
    gate: str | None = None
    axes_fn: Callable[[int], tuple[str, ...]] = lambda r: axes_for(r)
    noise_fn: Callable[[int], tuple[int | None, ...] | None] | None = None
    rank: int | None = None
    opaque: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    declared: bool = False
    selected: bool = True

    def info(self, rank: int | None = None) -> SiteInfo:
        """The :class:`SiteInfo` for this site at ``rank`` (the spec's own rank by default)."""
        rank = self.rank if rank is None else rank
        if rank is None:
            raise ValueError(f"Site {self.name!r}: rank unknown")
        self.rank = rank
        noise = self.noise_fn(rank) if self.noise_fn is not None else (None,) * rank
        return SiteInfo(
            name=self.name,
            layer=self.layer,
            layer_class=self.layer_class,
            role=self.role,
            axes=self.axes_fn(rank),
            rate=None if self.rate is None else float(self.rate),
            gate=self.gate,
            noise_shape=noise,
            scale=float32_scale(self.rate),
            opaque=self.opaque,
            extra=dict(self.extra),
        )


@dataclass
class DrawMeta:
    """What the host needs to turn one exported draw back into a :class:`Record`.

    ``expand_time``: the noise gets a size-1 time axis at position 1 (one mask used at every
    timestep of the call).
    """

    site: str
    noise_rank: int
    rank: int
    training: bool
    applied: bool
    expand_time: bool = False


def decode_step(step: int, draws: list[DrawMeta], bits: Any, dims: Any) -> list[Record]:
    """Turn one step's exported masks (one flat bool array, one flat int array) into records.

    ``dims`` holds, per draw, its noise shape then its applied shape; ``bits`` holds the
    flattened keep-noise of every applied draw, in draw order.
    """
    bits = np.asarray(bits)
    dims = np.asarray(dims).tolist()
    records: list[Record] = []
    calls: dict[str, int] = {}
    off = boff = 0
    for m in draws:
        ns = tuple(dims[off:off + m.noise_rank])
        off += m.noise_rank
        shape = tuple(dims[off:off + m.rank])
        off += m.rank
        noise = None
        if m.applied:
            n = int(np.prod(ns))
            noise = bits[boff:boff + n].reshape(ns)
            boff += n
            if m.expand_time:
                noise = noise[:, None]
        call = calls.get(m.site, 0)
        calls[m.site] = call + 1
        records.append(Record(site=m.site, step=step, call=call, training=m.training,
                              shape=shape, noise=noise))
    return records


class TraceStack:
    """Each thread's active traces, innermost last (each capture module keeps its own)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def current(self) -> Any:
        """The innermost active trace of this thread, or None."""
        traces = getattr(self._local, "traces", None)
        return traces[-1] if traces else None

    def push(self, trace: Any) -> None:
        """Make ``trace`` the active trace of this thread."""
        if not hasattr(self._local, "traces"):
            self._local.traces = []
        self._local.traces.append(trace)

    def pop(self, trace: Any) -> None:
        """Remove ``trace`` (the innermost one) from this thread's stack."""
        traces = getattr(self._local, "traces", [])
        if traces and traces[-1] is trace:
            traces.pop()
        elif trace in traces:
            traces.remove(trace)


class SharedPatch:
    """A process-wide patch, applied by the first adapter that installs it and restored by the
    last one that uninstalls it.

    Args:
        apply: Puts the patch in place.
        restore: Puts the original functions back.

    ``attached`` lists the adapters recording now (told about draws outside a recorded step).
    """

    def __init__(self, apply: Callable[[], None], restore: Callable[[], None]) -> None:
        self._apply = apply
        self._restore = restore
        self._lock = threading.Lock()
        self._count = 0
        self.attached: list[Any] = []

    def install(self, owner: Any = None) -> None:
        """Add ``owner`` to :attr:`attached`; the first install applies the patch."""
        with self._lock:
            if owner is not None:
                self.attached.append(owner)
            if self._count == 0:
                self._apply()
            self._count += 1

    def uninstall(self, owner: Any = None) -> None:
        """Undo one :meth:`install`; the last one restores the original functions."""
        with self._lock:
            if owner is not None and owner in self.attached:
                self.attached.remove(owner)
            if self._count == 0:
                return
            self._count -= 1
            if self._count == 0:
                self._restore()


@dataclass
class _TraceMeta:
    """What the host keeps of one traced step, under its trace id."""

    draws: list[DrawMeta]
    eager: bool
    lost: dict[str, int] = field(default_factory=dict)


class KerasAdapterBase:
    """The lifecycle both Keras adapters share: patch and undo, step numbering, the payload.

    A subclass provides ``framework`` (``"keras"``, ``"tf_keras"``), ``_model_label`` (how
    messages name its models: ``"Keras"``, ``"tf_keras"``), :meth:`_install` (find and declare
    the sites, set ``_cap`` to its capture module, patch; called by :meth:`attach`),
    :meth:`_new_trace` and :meth:`_steps_per_execution`. Its traces
    (``cap.Trace``) carry ``eager``, ``draws`` (``cap.Draw`` objects with ``spec``, ``keep``,
    ``noise_shape``, ``applied_shape``, ``training``, ``applied``, ``expand_time``) and
    ``lost`` (draws of the step that cannot be recorded, by cause).

    Args:
        model: The model to record.
    """

    framework: str
    session: Session  # set by attach()
    _model_label: str
    _sites: Any
    _cap: Any     # the adapter's capture module: Trace, push_trace, pop_trace

    def __init__(self, model: Any) -> None:
        self.model = model
        self._undo: list[Callable[[], None]] = []
        self._attached = False
        self._sites = None
        self._cap = None
        # Per step kind, where inner steps of one execution leave their masks (TF, spe > 1).
        self._inner_buffers: dict[str, Any] = {}
        self._traces: dict[int, _TraceMeta] = {}
        self._step = 0
        self._calls_step = -1
        self._calls: dict[tuple[str, int], int] = {}
        self._noted: set[str] = set()

    def attach(self, session: Session) -> None:
        """Find and declare the sites, then install the capture. Undone by :meth:`detach`."""
        if self._attached:
            raise RecordingError(
                f"This {type(self).__name__} is already attached; call detach() first.")
        self._attached = True
        self.session = session
        try:
            self._install()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Restore every patched function and train function (idempotent)."""
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep restoring the rest; say what could not be undone
                self.session.note(f"{self.framework} adapter: could not undo a patch: {exc!r}")
        if self._attached and self._sites is not None:
            never = [s.name for s in self._sites.all_specs() if not s.declared]
            if never:
                self.session.note(
                    f"{len(never)} {self._model_label} site(s) never drew a mask while "
                    f"recording and could not be declared (the rank of their input is "
                    f"unknown): {', '.join(never)}"
                )
        self._attached = False
        self._traces.clear()

    def mark_step(self, step: int | None = None) -> None:
        """Not supported: Keras counts train steps itself (``fit``, ``train_on_batch``).

        Raises:
            RecordingError: Always.
        """
        raise RecordingError(
            f"The {self.framework} adapter counts steps itself (one per train step); "
            f"mark_step() is not supported for it.")

    def _install(self) -> None:  # pragma: no cover - provided by the adapter
        raise NotImplementedError

    def _steps_per_execution(self) -> tuple[int, bool]:  # pragma: no cover - adapter's
        """The model's steps per execution, and whether Keras may raise it (autotuning)."""
        raise NotImplementedError

    def _set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute behind Keras' tracking, and remember how to undo it."""
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        object.__setattr__(obj, name, value)

        def undo() -> None:
            if had:
                object.__setattr__(obj, name, old)
            elif name in obj.__dict__:
                object.__delattr__(obj, name)

        self._undo.append(undo)

    def _check_compiled_options(self) -> None:
        """Refuse what would lose masks: several steps per execution, several replicas."""
        model = self.model
        label = self._model_label
        spe, autotuned = self._steps_per_execution()
        if (spe > 1 or autotuned) and not self._records_inner_steps():
            raise UnsupportedModelError(
                f"dropspy cannot record a {label} model compiled with steps_per_execution={spe}: "
                f"{label} returns only the last step's outputs of each execution, so the masks "
                f"of the other steps would be lost. Expected steps_per_execution=1 while "
                f"recording."
            )
        strategy = getattr(model, "distribute_strategy", None)
        replicas = getattr(strategy, "num_replicas_in_sync", 1)
        if replicas and replicas > 1:
            why = self._replicas_refused(strategy)
            if why:
                raise UnsupportedModelError(
                    f"dropspy cannot record a {label} model under a distribution strategy with "
                    f"{replicas} replicas: {why} Received: {type(strategy).__name__}."
                )

    def _records_inner_steps(self) -> bool:
        """Whether the masks of every inner step of one execution reach the host."""
        return False

    def _replicas_refused(self, strategy: Any) -> str | None:
        """Why masks of ``strategy``'s replicas cannot be recorded (None: they can)."""
        return ("step outputs are reduced across replicas, and masks must not be. Expected a "
                "single replica.")

    def _declare(self, spec: Any, rank: int) -> bool:
        if not spec.declared:
            spec.selected = self.session.declare_site(spec.info(rank))
            spec.declared = True
        return spec.selected

    def _unobservable(self, spec: Any, why: str, trace: Any = None) -> None:
        """Say once that ``spec``'s masks are not recorded; count the draw lost on ``trace``."""
        if trace is not None:
            trace.lost["unobservable"] = trace.lost.get("unobservable", 0) + 1
        if not spec.declared and spec.rank is not None:
            spec.opaque = why
            self._declare(spec, spec.rank)
        self._note_once(f"unobservable:{spec.name}",
                        f"site {spec.name}: masks not recorded: {why}")

    def _note_once(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.session.note(message)

    def _new_trace(self, kind: str, graph: Any, eager: bool) -> Any:  # pragma: no cover
        """A fresh ``cap.Trace`` for one ``kind`` (train, test, predict) step."""
        raise NotImplementedError

    def _payload_ops(self) -> Any:
        """The capture's tensor operations for the payload (Keras 3 captures carry their own;
        the Keras 2 capture module uses TensorFlow's, :class:`_TFOps`)."""
        ops = self._cap
        return ops if hasattr(ops, "concat") else _TFOps()

    def _traced_step(self, original_step: Callable[..., Any], data: Any,
                     kind: str = "train", *, pair: bool = False) -> Any:
        """Run one step with a trace active; its masks become an extra output of the step.

        Args:
            original_step: The model's own step (``data -> logs``, or with ``pair`` the JAX
                form ``data -> (logs, state)``).
            data: The batch.
            kind: ``"train"``, ``"test"`` or ``"predict"``.
            pair: The step returns ``(logs, state)`` (JAX); the masks go into the logs.
        """
        cap = self._cap
        ops = self._payload_ops()
        eager = ops.eager()
        trace = self._new_trace(kind, ops.scope(), eager)
        cap.push_trace(trace)
        try:
            out = original_step(data)
        finally:
            cap.pop_trace(trace)
        logs, rest = (out[0], tuple(out[1:])) if pair else (out, ())
        if kind == "predict":   # outputs of any structure: carry them next to the masks
            logs = {PREDICT_OUTPUTS_KEY: logs, OUTPUT_KEY: self._payload(trace)}
        elif not isinstance(logs, dict):
            self._note_once(
                "logs",
                f"{kind}_step returned {type(logs).__name__}, not a dict of logs: dropspy cannot "
                f"attach the masks to it, and records nothing for this model.",
            )
        else:
            logs = dict(logs)
            logs[OUTPUT_KEY] = self._payload(trace)
        buffer = self._inner_buffers.get(kind)
        if buffer is not None and isinstance(logs, dict) and OUTPUT_KEY in logs:
            buffer.write(logs[OUTPUT_KEY])
        return (logs, *rest) if pair else logs

    def _payload(self, trace: Any) -> dict[str, Any]:
        """The step's draws as two tensors; their metadata stays on the host by trace id."""
        ops = self._payload_ops()
        tid = next(_trace_ids)
        metas, keeps, dims = [], [], []
        for d in trace.draws:
            metas.append(DrawMeta(site=d.spec.name, noise_rank=int(d.noise_shape.shape[0]),
                                  rank=int(d.applied_shape.shape[0]), training=d.training,
                                  applied=d.applied, expand_time=d.expand_time))
            dims += [d.noise_shape, d.applied_shape]
            if d.applied:
                keeps.append(ops.flatten(d.keep))
        self._traces[tid] = _TraceMeta(draws=metas, eager=trace.eager, lost=dict(trace.lost))
        # The trace id and every shape in one small int32 vector (read every step: it says
        # which trace ran); the keep-bits in one bool vector, copied to the host only for
        # sampled steps. A step sharded over devices keeps each mask apart at its own shape
        # and sharding instead: joining them would make the compiler gather every shard.
        if getattr(ops, "keeps_apart", _never)():
            bits: Any = tuple(d.keep for d in trace.draws if d.applied)
        else:
            bits = ops.concat(keeps) if keeps else ops.empty_bits()
        return {
            "bits": bits,
            "dims": ops.concat([ops.int_vector([tid]), *dims]),
        }

    def _host_wrapper(self, inner: Callable[..., Any], kind: str = "train", *,
                      pair: bool = False) -> Any:
        """Wrap a compiled step function: take the masks out of its outputs, count steps.

        ``pair``: the function returns ``(logs, state)`` (JAX).
        """
        def function(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            logs = out[0] if pair else out
            if isinstance(logs, dict) and OUTPUT_KEY in logs:
                logs = dict(logs)
                payload = logs.pop(OUTPUT_KEY)
                if kind == "predict":
                    logs = logs[PREDICT_OUTPUTS_KEY]
                buffer = self._inner_buffers.get(kind)
                # Several steps per execution: every inner step's payload, from the buffer
                # (the one in the logs is the last step's, also in the buffer).
                steps = buffer.drain() if buffer is not None else [payload]
                for one in steps:
                    step = self._step
                    if kind == "train":
                        self._step += 1
                    # Several replicas: one payload each, in replica order (see capture_tf).
                    for replica, part in enumerate(one.get("replicas", [one])):
                        self._on_step(step, part, replica,
                                      wanted=kind == "train" or self.session.record_eval)
                out = (logs, *out[1:]) if pair else logs
            return out

        function._dropspy_owner = self  # type: ignore[attr-defined]
        function.__wrapped__ = inner  # type: ignore[attr-defined]
        return function

    def _on_step(self, step: int, payload: dict[str, Any], replica: int = 0,
                  wanted: bool = True) -> None:
        ops = self._payload_ops()
        dims = np.asarray(ops.to_numpy(payload["dims"]))
        tid = int(dims[0])
        meta = self._traces.get(tid)
        if meta is None:
            return
        if meta.eager:
            del self._traces[tid]
        for cause, n in meta.lost.items():
            self.session.count_dropped(cause, n)
        if not meta.draws:
            return
        if not wanted or not self.session.want_step(step):
            self.session.count_dropped("sampling", len(meta.draws))
            return
        bits = payload["bits"]
        if isinstance(bits, (tuple, list)):   # masks kept apart (sharded step): join on the host
            bits = np.concatenate([np.reshape(ops.to_numpy(b), -1) for b in bits]) if bits \
                else np.zeros(0, bool)
        else:
            bits = ops.to_numpy(bits)
        records = decode_step(step, meta.draws, bits, dims[1:])
        # Evaluate/predict batches share the step of the next train step: number their calls
        # on from what this step already holds, so (step, call) stays unique per site.
        # Calls are numbered per replica: (step, call, replica) is unique per site.
        if self._calls_step != step:
            self._calls_step, self._calls = step, {}
        for r in records:
            r.replica = replica
            r.call += self._calls.get((r.site, replica), 0)
        for r in records:
            key = (r.site, replica)
            self._calls[key] = max(self._calls.get(key, 0), r.call + 1)
        self.session.submit(step, records)


def _never() -> bool:
    return False


class _TFOps:
    """TensorFlow's payload operations, for a capture module that brings none (Keras 2)."""

    def eager(self) -> bool:
        import tensorflow as tf

        return bool(tf.executing_eagerly())

    def scope(self) -> Any:
        import tensorflow as tf

        return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()

    def flatten(self, x: Any) -> Any:
        import tensorflow as tf

        return tf.reshape(x, [-1])

    def concat(self, parts: list[Any]) -> Any:
        import tensorflow as tf

        return tf.concat([tf.cast(p, tf.int32) if p.dtype != tf.bool else p for p in parts], 0)

    def int_vector(self, values: list[int]) -> Any:
        import tensorflow as tf

        return tf.constant(list(values), tf.int32)

    def empty_bits(self) -> Any:
        import tensorflow as tf

        return tf.zeros([0], tf.bool)

    def to_numpy(self, x: Any) -> Any:
        return np.asarray(x)
