"""The Keras 3 adapter (TensorFlow backend): record the exact masks ``model.fit`` applies.

How it works, in one paragraph: while recording, Keras' TF-backend ``random.dropout`` is
replaced by an op-for-op identical version that also returns the keep-mask
(:mod:`dropspy.frameworks.keras_capture`); every layer's ``call`` and every RNN cell's mask
getters push a frame on a small stack so a draw knows its layer, role, gate and training flag;
``model.train_step`` is wrapped so the masks drawn in a step become extra outputs of the
(compiled, possibly XLA) train step, and ``model.train_function`` is wrapped so those outputs are
taken out of the logs before any callback sees them and handed to the session once per step.
No variable, no ``numpy_function``, no extra random op: the trained weights and the seed
generators end exactly where they would without dropspy.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dropspy.errors import RecordingError, UnsupportedModelError
from dropspy.store import Record

__all__ = ["KerasAdapter"]

# Key of the extra train-step output; removed before Keras' callbacks see the logs.
_OUTPUT_KEY = "_dropspy_masks"
_ATTENTION_CLASSES = ("Attention", "AdditiveAttention", "GroupedQueryAttention",
                      "MultiHeadAttention")
_trace_ids = itertools.count(1)


@dataclass
class _DrawMeta:
    """What the host needs to turn one exported draw back into a Record."""

    site: str
    noise_rank: int
    rank: int
    training: bool
    applied: bool
    expand_time: bool


@dataclass
class _TraceMeta:
    draws: list[_DrawMeta]
    eager: bool


def _keras_module() -> Any:
    return sys.modules.get("keras")


def _is_tf_keras_model(model: Any) -> bool:
    """A tf_keras (Keras 2) layer/model, detected without importing tf_keras."""
    for name in ("tf_keras", "tf_keras.src"):
        mod = sys.modules.get(name)
        layers = getattr(mod, "layers", None)
        base = getattr(layers, "Layer", None)
        if isinstance(base, type) and isinstance(model, base):
            return True
    module = type(model).__module__
    return module.startswith(("tf_keras.", "keras.engine.", "tensorflow.python.keras."))


def _static_bool(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, (bool, int, np.bool_)):
        return bool(value)
    import tensorflow as tf  # only reached with the TF backend

    static = tf.get_static_value(value)
    return bool(static) if static is not None else True


class KerasAdapter:
    """Records a Keras 3 model (TensorFlow backend) trained with ``fit`` or ``train_on_batch``.

    Args:
        model: A ``keras.Model``.
        session: The recorder's session (see ``docs/internals.md``).

    Raises:
        UnsupportedModelError: A tf_keras (Keras 2) model, a backend other than TensorFlow, a
            layer that is not a model, ``steps_per_execution > 1``, or several replicas.

    Example:
        >>> with dropspy.record(model, "run.h5"):   # doctest: +SKIP
        ...     model.fit(x, y, epochs=1)
    """

    framework = "keras"

    @classmethod
    def claims(cls, model: Any) -> bool:
        """Whether ``model`` is a Keras layer or model (Keras 3, or tf_keras to refuse it)."""
        keras = _keras_module()
        layer = getattr(getattr(keras, "layers", None), "Layer", None)
        if isinstance(layer, type) and isinstance(model, layer):
            return True
        return _is_tf_keras_model(model)

    def __init__(self, model: Any, session: Any) -> None:
        _check_supported(model)
        self.model = model
        self.session = session
        self._undo: list[Callable[[], None]] = []
        self._attached = False
        self._sites: Any = None
        self._traces: dict[int, _TraceMeta] = {}
        self._step = 0
        self._noted: set[str] = set()

    # -- contract -------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """Framework, versions, backend and devices, for the run file's root attributes."""
        import keras
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_logical_devices()]
        return {
            "framework": "keras",
            "framework_version": keras.__version__,
            "backend": keras.backend.backend(),
            "tensorflow_version": tf.__version__,
            "devices": devices,
            "jit_compile": str(getattr(self.model, "jit_compile", None)),
        }

    def attach(self) -> None:
        """Find and declare the sites, then install the capture. Undone by :meth:`detach`."""
        if self._attached:
            raise RecordingError("This KerasAdapter is already attached; call detach() first.")
        from dropspy.frameworks import keras_capture as cap
        from dropspy.frameworks.keras_sites import find_sites

        self._cap = cap
        self._attached = True
        try:
            self._sites = find_sites(self.model)
            for spec in self._sites.all_specs():
                if spec.rank is not None:
                    self._declare(spec, spec.rank)
            cap.install(self)
            self._undo.append(lambda: cap.uninstall(self))
            self._wrap_layers()
            self._wrap_training()
            self._set_attr(self.model, "call", self._model_call_wrapper(self.model.call))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Restore every patched function and train function (idempotent)."""
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep restoring the rest; report the first failure
                self.session.note(f"keras adapter: could not undo a patch: {exc!r}")
        if self._attached and self._sites is not None:
            never = [s.name for s in self._sites.all_specs() if not s.declared]
            if never:
                self.session.note(
                    f"{len(never)} Keras site(s) never drew a mask while recording and could "
                    f"not be declared (the rank of their input is unknown): {', '.join(never)}"
                )
        self._attached = False
        self._traces.clear()

    # -- patching ---------------------------------------------------------------------------

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

    def _wrap_layers(self, only: set[int] | None = None) -> None:
        from keras import layers as klayers

        sm = self._sites
        for lid, layer in sm.layers.items():
            if only is not None and lid not in only:
                continue
            if layer is self.model or isinstance(layer, klayers.InputLayer):
                continue
            if lid in sm.rnns:
                kind = "rnn"
            elif isinstance(layer, klayers.TimeDistributed):
                kind = "td"
            else:
                kind = "layer"
            self._set_attr(layer, "call", self._call_wrapper(layer, layer.call, kind))
        for cid in sm.cells:
            if only is not None and cid not in only:
                continue
            cell = sm.layers.get(cid)
            if cell is None:
                continue
            for getter, role in (("get_dropout_mask", "input"),
                                 ("get_recurrent_dropout_mask", "recurrent")):
                self._set_attr(cell, getter, self._mask_wrapper(cell, getattr(cell, getter), role))

    def _call_wrapper(self, layer: Any, original: Callable[..., Any], kind: str) -> Any:
        cap = self._cap

        def call(*args: Any, **kwargs: Any) -> Any:
            trace = cap.current_trace()
            if trace is None or trace.owner is not self:
                return original(*args, **kwargs)
            first = args[0] if args else next(iter(kwargs.values()), None)
            frame = cap.Frame(kind, layer, training=kwargs.get("training"),
                              sequence=first, start=len(trace.draws))
            trace.stack.append(frame)
            try:
                out = original(*args, **kwargs)
            finally:
                trace.stack.pop()
            if kind == "td":
                self._merge_time_distributed(trace, frame)
            return out

        call.__wrapped__ = original  # type: ignore[attr-defined]
        return call

    def _mask_wrapper(self, cell: Any, original: Callable[..., Any], role: str) -> Any:
        cap = self._cap

        def get_mask(step_input: Any) -> Any:
            trace = cap.current_trace()
            if trace is None or trace.owner is not self:
                return original(step_input)
            trace.stack.append(cap.Frame("mask", cell, role=role))
            try:
                return original(step_input)
            finally:
                trace.stack.pop()

        get_mask.__wrapped__ = original  # type: ignore[attr-defined]
        return get_mask

    def _wrap_training(self) -> None:
        model = self.model
        self._check_compiled_options()
        original_step = model.train_step
        original_make = model.make_train_function

        def train_step(data: Any) -> Any:
            return self._traced_step(original_step, data)

        def make_train_function(force: bool = False) -> Any:
            self._check_compiled_options()
            fn = model.__dict__.get("train_function")
            if fn is not None and not force:
                return fn
            original_make(force=True)
            model.train_function = self._host_wrapper(model.train_function)
            return model.train_function

        self._set_attr(model, "train_step", train_step)
        self._set_attr(model, "make_train_function", make_train_function)
        # A train function built before recording has no mask outputs: set it aside (restored on
        # detach) so fit/train_on_batch build one with the wrapped train_step.
        self._set_attr(model, "train_function", None)

    def _check_compiled_options(self) -> None:
        model = self.model
        spe = getattr(model, "steps_per_execution", 1) or 1
        try:
            spe = int(spe)
        except (TypeError, ValueError):
            spe = 1
        if spe > 1:
            raise UnsupportedModelError(
                f"dropspy cannot record a Keras model compiled with steps_per_execution={spe}: "
                f"Keras returns only the last step's outputs of each execution, so the masks of "
                f"the other steps would be lost. Expected steps_per_execution=1 while recording."
            )
        strategy = getattr(model, "distribute_strategy", None)
        replicas = getattr(strategy, "num_replicas_in_sync", 1)
        if replicas and replicas > 1:
            raise UnsupportedModelError(
                f"dropspy cannot record a Keras model under a distribution strategy with "
                f"{replicas} replicas yet (step outputs are reduced across replicas; masks must "
                f"not be). Expected a single replica. Received: {type(strategy).__name__}."
            )

    # -- trace time -------------------------------------------------------------------------

    def _traced_step(self, original_step: Callable[[Any], Any], data: Any) -> Any:
        import tensorflow as tf

        cap = self._cap
        self._refresh_sites()
        eager = tf.executing_eagerly()
        graph = None if eager else tf.compat.v1.get_default_graph()
        trace = cap.Trace(owner=self, graph=graph, eager=eager)
        cap.push_trace(trace)
        try:
            logs = original_step(data)
        finally:
            cap.pop_trace(trace)
        if not isinstance(logs, dict):
            self._note_once(
                "logs",
                f"train_step returned {type(logs).__name__}, not a dict of logs: dropspy cannot "
                f"attach the masks to it, and records nothing for this model.",
            )
            return logs
        logs = dict(logs)
        logs[_OUTPUT_KEY] = self._payload(trace)
        return logs

    def _payload(self, trace: Any) -> dict[str, Any]:
        """The step's draws as three tensors, their metadata kept on the host by trace id."""
        import tensorflow as tf

        tid = next(_trace_ids)
        metas, keeps, dims = [], [], []
        for d in trace.draws:
            metas.append(_DrawMeta(site=d.spec.name, noise_rank=int(d.noise_shape.shape[0]),
                                   rank=int(d.applied_shape.shape[0]),
                                   training=d.training, applied=d.applied,
                                   expand_time=d.expand_time))
            dims += [tf.cast(d.noise_shape, tf.int32), tf.cast(d.applied_shape, tf.int32)]
            if d.applied:
                keeps.append(tf.reshape(d.keep, [-1]))
        self._traces[tid] = _TraceMeta(draws=metas, eager=trace.eager)
        return {
            "trace": tf.constant(tid, tf.int32),
            # One flat bool tensor and one int tensor: one device-to-host copy each per step.
            "bits": tf.concat(keeps, 0) if keeps else tf.zeros([0], tf.bool),
            "dims": tf.concat(dims, 0) if dims else tf.zeros([0], tf.int32),
        }

    def _model_call_wrapper(self, original: Callable[..., Any]) -> Any:
        """Make each eager training-mode call of the model outside fit one recorded step."""
        cap = self._cap

        def call(*args: Any, **kwargs: Any) -> Any:
            trace = cap.current_trace()
            if trace is not None and trace.owner is self:
                return original(*args, **kwargs)   # inside fit's train step: nothing to add
            if not _static_bool(kwargs.get("training")):
                return original(*args, **kwargs)
            import tensorflow as tf

            if not tf.executing_eagerly():
                self._note_once(
                    "untraced",
                    f"{self.model.name} was called with training=True inside a tf.function "
                    f"outside model.fit/train_on_batch (a compiled custom training loop): its "
                    f"masks cannot leave that function and are not recorded. Run the loop "
                    f"eagerly, or use fit/train_on_batch, to record them.",
                )
                return original(*args, **kwargs)
            self._refresh_sites()
            step_trace = cap.Trace(owner=self, graph=None, eager=True)
            cap.push_trace(step_trace)
            try:
                out = original(*args, **kwargs)
            finally:
                cap.pop_trace(step_trace)
            step = self._step
            self._step += 1
            self._on_step(step, self._payload(step_trace))
            return out

        call.__wrapped__ = original  # type: ignore[attr-defined]
        return call

    def on_dropout(self, trace: Any, inputs: Any, rate: Any, noise_shape: Any, seed: Any) -> Any:
        """Called (at trace time) for each ``backend.random.dropout`` in a recorded step."""
        import tensorflow as tf

        cap = self._cap
        sm = self._sites
        top = trace.stack[-1] if trace.stack else None

        if top is not None and top.kind == "mask" and id(top.layer) in sm.cells:
            cs = sm.cells[id(top.layer)]
            specs = cs.input if top.role == "input" else cs.recurrent
            k = top.count
            top.count += 1
            rnn_frame = next((f for f in reversed(trace.stack)
                              if f.kind == "rnn" and f.layer is cs.rnn), None)
            if k < len(specs) and rnn_frame is not None:
                out, keep, ns = cap.exact_dropout(inputs, rate, None, seed) \
                    if noise_shape is None else cap.exact_dropout(inputs, rate, noise_shape, seed)
                training = _static_bool(rnn_frame.training)
                # The cells apply the cached masks only under `training and 0 < rate < 1`;
                # RNN.call draws them in every mode (also predict/evaluate).
                applied = training and isinstance(rate, (int, float)) and 0.0 < rate < 1.0
                t = tf.shape(rnn_frame.sequence, out_type=tf.int32)[1:2]
                applied_shape = tf.concat([ns[:1], t, ns[1:]], 0)
                self._add_draw(trace, specs[k], keep, ns, applied_shape, training, applied,
                               expand_time=True, rank=int(keep.shape.rank) + 1)
                return out

        layer = self._drawing_layer()
        if layer is not None and id(layer) not in sm.layers:
            self._refresh_sites()   # built lazily inside this step (e.g. MHA's dropout layer)
        if layer is None:
            layer = top.layer if top is not None else self.model
        own = top if top is not None and top.layer is layer else None

        if id(layer) in sm.dropout:
            spec = sm.dropout[id(layer)]
            td_layer = sm.time_distributed.get(id(layer))
            td_frame = None
            if td_layer is not None:
                td_frame = next((f for f in reversed(trace.stack)
                                 if f.kind == "td" and f.layer is td_layer), None)
                if td_frame is not None and td_frame.sequence is not None \
                        and td_frame.sequence.shape[1] is None:
                    self._unobservable(spec, "TimeDistributed with an unknown time length runs "
                                             "its layer inside vectorized_map")
                    return cap._ORIGINAL_DROPOUT(inputs, rate, noise_shape=noise_shape, seed=seed)
            out, keep, ns = cap.exact_dropout(inputs, rate, noise_shape, seed)
            training = True if own is None or own.training is None else _static_bool(own.training)
            rank = int(inputs.shape.rank) + (1 if td_frame is not None else 0)
            draw = self._add_draw(trace, spec, keep, ns, tf.shape(inputs, out_type=tf.int32),
                                  training, True, rank=rank, declare=td_frame is None)
            if draw is not None:
                draw.td_frame = td_frame
            return out

        # Anything else that calls keras.random.dropout: a custom site on the calling layer.
        ordinal = 0
        if own is not None:
            ordinal = own.count
            own.count += 1
        spec = self._custom_spec(layer, ordinal, rate, noise_shape,
                                 int(inputs.shape.rank) if inputs.shape.rank is not None else None)
        out, keep, ns = cap.exact_dropout(inputs, rate, noise_shape, seed)
        training = True if own is None or own.training is None else _static_bool(own.training)
        if spec is not None:
            self._add_draw(trace, spec, keep, ns, tf.shape(inputs, out_type=tf.int32),
                           training, True, rank=spec.rank)
        return out

    def on_untraced_dropout(self) -> None:
        """A dropout drawn outside any recorded train step (custom loop?): say so, once."""
        from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell

        if "untraced" in self._noted:
            return
        layer = self._drawing_layer()
        # RNN layers draw their masks in every mode (predict, evaluate) and apply them only
        # when training: those draws are expected outside train steps.
        if layer is None or id(layer) not in self._sites.layers \
                or isinstance(layer, DropoutRNNCell):
            return
        path = self._sites.layer_paths.get(id(layer), layer.name)
        self._note_once(
            "untraced",
            f"{path} drew a dropout mask outside model.fit/train_on_batch (a custom training "
            f"loop, or model(x, training=True)): dropspy records the masks of Keras train steps "
            f"only; masks drawn elsewhere are not recorded.",
        )

    def on_other_random(self, trace: Any, name: str) -> None:
        """A non-dropout ``keras.random`` draw inside a recorded step: name its layer opaque."""
        top = next((f for f in reversed(trace.stack) if f.kind in ("layer", "rnn", "td")), None)
        if top is None:
            return
        layer = top.layer
        module = type(layer).__module__
        if module.startswith("keras.src.layers.preprocessing") or id(layer) in self._sites.dropout:
            return
        caller = sys._getframe(2).f_globals.get("__name__", "")
        if caller.startswith("keras.src.initializers"):
            return  # a weight initializer of a layer built lazily in the step, not noise
        from dropspy.frameworks.keras_sites import _NOISE_LAYERS, SiteSpec

        path = self._sites.layer_paths.get(id(layer), layer.name)
        cls = type(layer).__name__
        known = next((s for s in self._sites.opaque if s.layer == path), None)
        if known is None:
            key = (id(layer), -1 - len(name))
            known = self._sites.custom.get(key)
            if known is None:
                known = SiteSpec(
                    name=f"{path}/{name}", layer=path, layer_class=cls, role="custom", rate=None,
                    opaque=_NOISE_LAYERS.get(cls) or (
                        f"{cls} draws random numbers with keras.random.{name}; dropspy records "
                        f"only the Bernoulli keep-masks of keras.random.dropout, and does not "
                        f"know this layer"),
                )
                self._sites.custom[key] = known
        if not known.declared:
            rank = getattr(getattr(top.sequence, "shape", None), "rank", None)
            self._declare(known, rank or 1)
            self._note_once(known.name, f"site {known.name} is opaque: {known.opaque}")

    # -- helpers ------------------------------------------------------------------------------

    def _drawing_layer(self) -> Any:
        """The innermost Keras layer on the Python stack (the one whose code drew)."""
        import keras

        frame = sys._getframe(2)
        for _ in range(64):
            if frame is None:
                return None
            obj = frame.f_locals.get("self")
            if isinstance(obj, keras.layers.Layer):
                return obj
            frame = frame.f_back
        return None

    def _refresh_sites(self) -> None:
        """Add layers created since attach (lazy builds) to the site map, and wrap them."""
        from dropspy.frameworks.keras_sites import find_sites

        new, old = find_sites(self.model), self._sites
        fresh = [i for i in new.layers if i not in old.layers]
        if not fresh:
            return
        for name in ("layer_paths", "layers", "dropout", "time_distributed", "cells", "rnns"):
            target = getattr(old, name)
            for key, value in getattr(new, name).items():
                target.setdefault(key, value)
        known = {s.name for s in old.opaque}
        old.opaque += [s for s in new.opaque if s.name not in known]
        for spec in old.all_specs():
            if spec.rank is not None and not spec.declared:
                self._declare(spec, spec.rank)
        self._wrap_layers(only=set(fresh))

    def _custom_spec(self, layer: Any, ordinal: int, rate: Any, noise_shape: Any,
                     rank: int | None) -> Any:
        from dropspy.frameworks.keras_sites import SiteSpec

        key = (id(layer), ordinal)
        spec = self._sites.custom.get(key)
        if spec is not None:
            return spec
        path = self._sites.layer_paths.get(id(layer), layer.name)
        cls = type(layer).__name__
        configured = None
        if noise_shape is not None:
            configured = tuple(d if isinstance(d, int) else None for d in noise_shape)
        spec = SiteSpec(
            name=path if ordinal == 0 else f"{path}/dropout{ordinal}",
            layer=path, layer_class=cls,
            role="attention" if cls in _ATTENTION_CLASSES else "custom",
            rate=float(rate) if isinstance(rate, (int, float)) else None,
            noise_fn=(lambda r, c=configured: c if c is not None and len(c) == r
                      else (None,) * r),
            rank=rank,
            extra={"drawn_by": "keras.random.dropout called in the layer's call()"},
        )
        if cls in ("Attention", "AdditiveAttention"):
            # They drop the attention distribution (batch, query, key), not a sequence.
            spec.axes_fn = lambda r: (("batch", "query", "key") if r == 3
                                      else ("batch",) + tuple(f"axis{k}" for k in range(1, r)))
            spec.extra = {"applied_to": "attention distribution (after softmax)"}
        self._sites.custom[key] = spec
        return spec

    def _declare(self, spec: Any, rank: int) -> bool:
        if not spec.declared:
            spec.selected = self.session.declare_site(spec.info(rank))
            spec.declared = True
        return spec.selected

    def _add_draw(self, trace: Any, spec: Any, keep: Any, ns: Any, applied_shape: Any,
                  training: bool, applied: bool, *, rank: int | None, expand_time: bool = False,
                  declare: bool = True) -> Any:
        if rank is None:
            self._unobservable(spec, "the rank of its input is unknown while tracing")
            return None
        if not trace.eager and keep.graph is not trace.graph:
            self._unobservable(spec, "the mask is drawn inside a TensorFlow loop or branch "
                                     "(tf.while_loop / tf.cond) and cannot leave the compiled step")
            return None
        if declare:
            if spec.declared and spec.rank != rank:
                self._note_once(f"rank:{spec.name}",
                                f"site {spec.name}: a call with rank {rank} differs from the "
                                f"declared rank {spec.rank}; those records are not kept")
                return None
            if not self._declare(spec, rank):
                return None
        draw = self._cap.Draw(spec=spec, keep=keep, noise_shape=ns, applied_shape=applied_shape,
                              training=training, applied=applied, expand_time=expand_time)
        trace.draws.append(draw)
        return draw

    def _merge_time_distributed(self, trace: Any, frame: Any) -> None:
        """Stack the per-timestep draws of a TimeDistributed call into one (batch, time, ...)."""
        import tensorflow as tf

        slices = [d for d in trace.draws[frame.start:] if d.td_frame is frame]
        if not slices:
            return
        trace.draws[:] = [d for d in trace.draws if d.td_frame is not frame]
        spec = slices[0].spec
        rank = int(slices[0].keep.shape.rank) + 1
        if not (spec.declared and spec.rank == rank) and not self._declare(spec, rank):
            return
        t = tf.constant([len(slices)], tf.int32)
        keep = tf.stack([d.keep for d in slices], axis=1)
        ns, ap = slices[0].noise_shape, slices[0].applied_shape
        trace.draws.append(self._cap.Draw(
            spec=spec, keep=keep, noise_shape=tf.concat([ns[:1], t, ns[1:]], 0),
            applied_shape=tf.concat([ap[:1], t, ap[1:]], 0), training=slices[0].training,
            applied=True))

    def _unobservable(self, spec: Any, why: str) -> None:
        if not spec.declared and spec.rank is not None:
            spec.opaque = why
            self._declare(spec, spec.rank)
        self._note_once(f"unobservable:{spec.name}",
                        f"site {spec.name}: masks not recorded: {why}")

    def _note_once(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.session.note(message)

    # -- host side ----------------------------------------------------------------------------

    def _host_wrapper(self, inner: Callable[[Any], Any]) -> Any:
        def train_function(iterator: Any) -> Any:
            logs = inner(iterator)
            if isinstance(logs, dict) and _OUTPUT_KEY in logs:
                logs = dict(logs)
                payload = logs.pop(_OUTPUT_KEY)
                step = self._step
                self._step += 1
                self._on_step(step, payload)
            return logs

        train_function._dropspy_owner = self  # type: ignore[attr-defined]
        train_function.__wrapped__ = inner  # type: ignore[attr-defined]
        return train_function

    def _on_step(self, step: int, payload: dict[str, Any]) -> None:
        tid = int(payload["trace"])
        meta = self._traces.get(tid)
        if meta is None:
            return
        if meta.eager:
            del self._traces[tid]
        if not meta.draws:
            return
        if not self.session.want_step(step):
            self.session.count_dropped("sampling", len(meta.draws))
            return
        bits = np.asarray(payload["bits"])
        dims = np.asarray(payload["dims"]).tolist()
        records: list[Record] = []
        calls: dict[str, int] = {}
        off = boff = 0
        for m in meta.draws:
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
        self.session.submit(step, records)


def _check_supported(model: Any) -> None:
    if _is_tf_keras_model(model):
        raise UnsupportedModelError(
            f"dropspy does not record tf_keras (Keras 2) models yet. Expected a Keras 3 model "
            f"(import keras, keras>=3, TensorFlow backend). Received: "
            f"{type(model).__module__}.{type(model).__qualname__}."
        )
    keras = _keras_module()
    backend = keras.backend.backend() if keras is not None else "?"
    if backend != "tensorflow":
        raise UnsupportedModelError(
            f"dropspy records Keras 3 models on the TensorFlow backend only. Expected "
            f"KERAS_BACKEND=tensorflow. Received: backend={backend!r}."
        )
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"dropspy records a keras.Model trained with fit/train_on_batch. Received a layer "
            f"that is not a model: {type(model).__qualname__} {getattr(model, 'name', '')!r}; "
            f"wrap it in a keras.Model."
        )
