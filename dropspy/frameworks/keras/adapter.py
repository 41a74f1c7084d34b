"""The Keras 3 adapter (TensorFlow, JAX, torch backends): record the masks ``fit`` applies.

How it works, in one paragraph: while recording, the active backend's ``random.dropout`` is
replaced by an op-for-op identical version that also returns the keep-mask (one capture per
backend: ``capture_tf``, ``capture_jax``, ``capture_torch``); every layer's ``call`` and
every RNN cell's mask getters push a frame on a small stack so a draw knows its layer, role,
gate and training flag; ``model.train_step`` is wrapped so the masks drawn in a step become
extra outputs of the (compiled: TF graph or XLA, JAX jit; eager on torch) train step, and the
step function is wrapped so those outputs are taken out of the logs before any callback sees
them and handed to the session once per step.
``test_step``/``predict_step`` get the same treatment, so masks drawn in evaluate and predict
are recorded with the training flag the layers saw (RNN masks drawn but not applied; Monte
Carlo dropout applied at inference); they belong to the step after the last train step.
No model variable, no ``numpy_function``, no extra random op: the trained weights and the
seed generators end exactly where they would without dropspy. Several replicas
(MirroredStrategy) and several steps per execution: see ``capture_tf`` and the README.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from dropspy.errors import UnsupportedModelError
from dropspy.frameworks.keras.draws import DrawRouter, _static_bool
from dropspy.frameworks.keras.kept import KeepsVariant
from dropspy.frameworks.keras_base import KerasAdapterBase

__all__ = ["KerasAdapter"]


# One capture module per backend; each is imported only when its backend is the active one.
_CAPTURES = {"tensorflow": "capture_tf", "jax": "capture_jax", "torch": "capture_torch"}


def _keras_module() -> Any:
    return sys.modules.get("keras")


def _capture() -> Any:
    """The active backend's capture (``capture_tf.CAPTURE``, ...)."""
    import importlib

    backend = _keras_module().backend.backend()
    module = importlib.import_module(f"dropspy.frameworks.keras.{_CAPTURES[backend]}")
    return module.CAPTURE


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


class KerasAdapter(KeepsVariant, DrawRouter, KerasAdapterBase):
    """Records a Keras 3 model (TensorFlow, JAX or torch backend): ``fit``, ``train_on_batch``,
    ``evaluate``,
    ``predict``, and eager custom loops (each ``model(x, training=True)`` is one step).

    Args:
        model: A ``keras.Model``.

    Raises:
        UnsupportedModelError: A tf_keras (Keras 2) model (recorded by ``TfKerasAdapter``), a
            backend without a capture (numpy, openvino), a layer that is not a model, torch's
            ``jit_compile=True``, a strategy with several replicas other than
            MirroredStrategy, ``steps_per_execution > 1`` with XLA or replicas
            on TensorFlow, or a JAX ``keras.distribution`` other than ``DataParallel`` in one
            process.

    Example:
        >>> with dropspy.record(model, "run.h5"):   # doctest: +SKIP
        ...     model.fit(x, y, epochs=1)
    """

    framework = "keras"
    _model_label = "Keras"

    @classmethod
    def claims(cls, model: Any) -> bool:
        """Whether ``model`` is a Keras layer or model (Keras 3, or tf_keras to refuse it)."""
        keras = _keras_module()
        layer = getattr(getattr(keras, "layers", None), "Layer", None)
        if isinstance(layer, type) and isinstance(model, layer):
            return True
        return _is_tf_keras_model(model)

    def __init__(self, model: Any) -> None:
        _check_supported(model)
        super().__init__(model)
        self._making: str | None = None   # the kind of step function being built (JAX)

    def meta(self) -> dict[str, Any]:
        """Framework, versions, backend and devices, for the run file's root attributes."""
        import keras

        backend = keras.backend.backend()
        meta: dict[str, Any] = {
            "framework": "keras",
            "framework_version": keras.__version__,
            "backend": backend,
            "jit_compile": str(getattr(self.model, "jit_compile", None)),
        }
        if backend == "tensorflow":
            import tensorflow as tf

            meta["tensorflow_version"] = tf.__version__
            meta["devices"] = [d.name for d in tf.config.list_logical_devices()]
        elif backend == "jax":
            import jax

            meta["jax_version"] = jax.__version__
            meta["devices"] = [str(d) for d in jax.devices()]
            sharding = _jax_batch_sharding()
            if sharding is not None:
                meta["distribution"] = sharding
        elif backend == "torch":
            import torch

            meta["torch_version"] = torch.__version__
            meta["devices"] = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return meta

    def _install(self) -> None:
        from dropspy.frameworks.keras.sites import find_sites

        cap = _capture()
        self._cap = cap
        self._sites = find_sites(self.model)
        self._adopt_kept()   # the recording functions of an earlier record(), if still valid
        for spec in self._sites.all_specs():
            if spec.rank is not None:
                self._declare(spec, spec.rank)
        cap.install(self)
        self._undo.append(lambda: cap.uninstall(self))
        self._wrap_layers()
        self._wrap_training()
        self._set_attr(self.model, "call", self._model_call_wrapper(self.model.call))

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
            first = args[0] if args else kwargs.get(
                "sequences", kwargs.get("inputs", next(iter(kwargs.values()), None)))
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
        """Wrap train/test/predict steps and their compiled functions (see module doc).

        Train steps count steps. Evaluate and predict batches are recorded too, with the
        training flag the layers saw, at the current step: a mask applied there is dropout
        active at inference (e.g. Monte Carlo dropout), and the analysis says so.
        """
        self._check_compiled_options()
        for kind in ("train", "test", "predict"):
            self._wrap_step_kind(kind)

    def _records_inner_steps(self) -> bool:
        # JAX runs the inner steps of an execution in a Python loop: each jitted step's
        # masks are taken out as it returns (see _wrap_jax_make_function). TF runs them in a
        # tf.while_loop: each step appends its masks to an InnerStepBuffer (capture_tf), read
        # after each execution; not under XLA (a variable whose length changes) nor with
        # several replicas.
        if self._cap is None:
            return False
        if self._cap.name == "jax":
            return True
        strategy = getattr(self.model, "distribute_strategy", None)
        return (self._cap.name == "tensorflow" and getattr(self.model, "jit_compile", False)
                is not True and getattr(strategy, "num_replicas_in_sync", 1) <= 1)

    def _wrap_jax_make_function(self) -> None:
        """Hand every jitted step to the host wrapper before Keras' Python loop sees it.

        Keras' JAX ``_make_function`` calls the jitted step ``steps_per_execution`` times in
        Python and keeps only the last outputs: wrapping the step itself (not the function
        around the loop) takes each inner step's masks out as it returns, so several steps
        per execution lose nothing.
        """
        model = self.model
        original = model._make_function

        def make_function(step_function: Any, concatenate_outputs: bool = False) -> Any:
            kind = self._making or "train"
            # The jitted step of an earlier record(), if still valid (see kept.py).
            step_function = self._kept_function(kind, lambda: step_function)
            return original(self._host_wrapper(step_function, kind, pair=True),
                            concatenate_outputs=concatenate_outputs)

        self._set_attr(model, "_make_function", make_function)

    def _wrap_step_kind(self, kind: str) -> None:
        model = self.model
        original_step = getattr(model, f"{kind}_step")
        original_make = getattr(model, f"make_{kind}_function")
        attr = f"{kind}_function"
        # JAX steps are pure: (state, data) -> (logs, state); the masks ride in the logs.
        pair = self._cap.name == "jax"
        if pair and "_make_function" not in model.__dict__:
            self._wrap_jax_make_function()

        # One step object per model and kind across record() contexts, so the functions
        # compiled from it can be kept (kept.py); each trace goes to the adapter of the day.
        step_fn = self._kept_step(kind, original_step, pair=pair)

        def make_function(force: bool = False) -> Any:
            self._check_compiled_options()
            fn = model.__dict__.get(attr)
            if fn is not None and not force:
                return fn
            if pair:   # the jitted steps inside are wrapped (_wrap_jax_make_function)
                self._making = kind
                try:
                    original_make(force=True)
                finally:
                    self._making = None
                return getattr(model, attr)

            def build() -> Any:
                original_make(force=True)
                return getattr(model, attr)

            inner = self._kept_function(kind, build)
            setattr(model, attr, self._host_wrapper(inner, kind))
            return getattr(model, attr)

        if self._cap.name == "tensorflow" and self._steps_per_execution()[0] > 1 \
                and kind not in self._inner_buffers:
            from dropspy.frameworks.keras.capture_tf import InnerStepBuffer

            self._inner_buffers[kind] = InnerStepBuffer()
        self._set_attr(model, f"{kind}_step", step_fn)
        self._set_attr(model, f"make_{kind}_function", make_function)
        # A function built before recording has no mask outputs: set it aside (restored on
        # detach) so fit/evaluate/predict build one with the wrapped step.
        existing = model.__dict__.get(attr)
        self._set_attr(model, attr, None)
        if existing is not None:
            # Built already: build the recording variant now (lazily traced at its first
            # call), so a caller that holds the model mid-fit - a callback entering record()
            # in on_train_begin, after fit built its function - finds one to call.
            make_function(force=True)

    def _check_compiled_options(self) -> None:
        """The base refusals, plus what only some backends can compile."""
        backend = self._cap.name if self._cap is not None else _capture().name
        spe = self._steps_per_execution()[0]
        if spe > 1 and backend == "tensorflow" and not self._records_inner_steps():
            raise UnsupportedModelError(
                f"dropspy cannot record a Keras model compiled with steps_per_execution={spe} "
                f"together with jit_compile=True or several replicas on the TensorFlow backend "
                f"yet: the inner steps' masks wait in a variable whose length changes, which "
                f"XLA does not compile, and are not kept per replica. Expected "
                f"jit_compile=False and one replica, or steps_per_execution=1. Received: "
                f"jit_compile={getattr(self.model, 'jit_compile', None)}."
            )
        super()._check_compiled_options()
        if backend == "torch" and getattr(self.model, "jit_compile", False) is True:
            raise UnsupportedModelError(
                "dropspy cannot record a Keras model compiled with jit_compile=True on the "
                "torch backend yet: Keras wraps the step in torch.compile, whose graphs do not "
                "run dropspy's mask copy. Expected jit_compile=False (the torch backend's "
                "default) while recording."
            )
        if backend == "jax":
            why = _jax_distribution_refused()
            if why:
                raise UnsupportedModelError(why)

    def _replicas_refused(self, strategy: Any) -> str | None:
        """MirroredStrategy in one process is recorded per replica (TF backend); the rest not.

        Each replica's masks stay apart (the ``replica`` of each record), see ``capture_tf``.
        """
        kind = type(strategy).__name__
        if self._cap is not None and self._cap.name == "tensorflow" and kind == "MirroredStrategy":
            return None
        if kind.startswith("MultiWorkerMirroredStrategy") or kind.startswith("Collective"):
            return ("each worker of a MultiWorkerMirroredStrategy is a process of its own and "
                    "needs its own run file (one per rank, with the run set's rank attributes), "
                    "which dropspy does not name for tf.distribute yet; its step outputs are "
                    "also gathered across workers, not kept per replica. Expected "
                    "MirroredStrategy on the devices of one process.")
        return (f"dropspy keeps the masks of each replica apart for MirroredStrategy only (TF "
                f"backend); {kind} reduces step outputs its own way. Expected MirroredStrategy "
                f"or a single replica.")

    def _steps_per_execution(self) -> tuple[int, bool]:
        spe = getattr(self.model, "steps_per_execution", 1) or 1
        try:
            spe = int(spe)
        except (TypeError, ValueError):
            spe = 1
        return spe, False

    def _new_trace(self, kind: str, graph: Any, eager: bool) -> Any:
        self._refresh_sites()
        return self._cap.Trace(owner=self, graph=graph, eager=eager)

    def _model_call_wrapper(self, original: Callable[..., Any]) -> Any:
        """Make each eager training-mode call of the model outside fit one recorded step."""
        cap = self._cap

        def call(*args: Any, **kwargs: Any) -> Any:
            trace = cap.current_trace()
            if trace is not None and trace.owner is self:
                return original(*args, **kwargs)   # inside fit's train step: nothing to add
            if not _static_bool(kwargs.get("training"), cap):
                return original(*args, **kwargs)
            if not cap.eager():
                self._note_once(
                    "untraced",
                    f"{self.model.name} was called with training=True inside a compiled function "
                    f"(tf.function, jax.jit) outside model.fit/train_on_batch: its "
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

    def _refresh_sites(self) -> None:
        """Add layers created since attach (lazy builds) to the site map, and wrap them."""
        from dropspy.frameworks.keras.sites import find_sites

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


def _check_supported(model: Any) -> None:
    if _is_tf_keras_model(model):
        raise UnsupportedModelError(
            f"The Keras 3 adapter does not record tf_keras (Keras 2) models; dropspy.record "
            f"hands them to the tf_keras adapter (dropspy.frameworks.tf_keras.TfKerasAdapter). "
            f"Expected a Keras 3 model (import keras, keras>=3, TensorFlow backend). Received: "
            f"{type(model).__module__}.{type(model).__qualname__}."
        )
    keras = _keras_module()
    backend = keras.backend.backend() if keras is not None else "?"
    if backend not in _CAPTURES:
        raise UnsupportedModelError(
            f"dropspy records Keras 3 models on the TensorFlow, JAX and torch backends. "
            f"Expected KERAS_BACKEND=tensorflow, jax or torch. Received: backend={backend!r}."
        )
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"dropspy records a keras.Model trained with fit/train_on_batch. Received a layer "
            f"that is not a model: {type(model).__qualname__} {getattr(model, 'name', '')!r}; "
            f"wrap it in a keras.Model."
        )


def _jax_distribution_refused() -> str | None:
    """Why the active ``keras.distribution`` cannot be recorded on JAX (None: it can).

    ``DataParallel`` in one process is recorded: the step is one SPMD program over global
    arrays, so each mask is one global draw (the single-device draw, split by batch rows over
    the devices, see ``capture_jax``) and reaches the host whole, with no collective added.
    """
    from keras import distribution

    dist = distribution.distribution()
    if dist is None:
        return None
    kind = type(dist).__name__
    if not isinstance(dist, distribution.DataParallel):
        return (f"dropspy cannot record a Keras model under keras.distribution.{kind} on the "
                f"JAX backend yet: its layout map may shard activations along axes other "
                f"than the batch, and that dropspy's extra step outputs leave the partitioning "
                f"of such a step unchanged is not proved. Expected "
                f"keras.distribution.DataParallel or no distribution while recording.")
    import jax

    if jax.process_count() > 1:
        return (f"dropspy cannot record keras.distribution.DataParallel across "
                f"{jax.process_count()} processes yet: each process sees only its own rows of "
                f"a mask and would need its own run file (one per rank), which dropspy does not "
                f"name for JAX yet. Expected DataParallel over the devices of one process.")
    return None


def _jax_batch_sharding() -> dict[str, Any] | None:
    """How ``DataParallel`` splits a batch over its devices (the ``distribution`` root attr)."""
    from keras import distribution

    dist = distribution.distribution()
    if dist is None:
        return None
    mesh = dist.device_mesh
    devices = [str(d) for d in mesh.devices.reshape(-1).tolist()]
    return {
        "kind": type(dist).__name__,
        "batch_axis": str(dist.batch_dim_name),
        "devices": devices,
        "records": "global: one record per draw holds the whole batch; batch rows are split "
                   f"into {len(devices)} equal contiguous blocks, block k on devices[k]",
    }
