"""The Keras 2 adapter (``tf_keras``, the legacy ``tf.keras``): record the masks it applies.

The mechanism is the Keras 3 adapter's (``keras.py``): the masks drawn in a train (test,
predict) step become extra outputs of the compiled step, taken out of the logs before any
callback sees them and handed to the session once per step. What differs is where Keras 2 draws
and applies them (see ``tf_keras_sites`` and ``tf_keras_capture``): dropout goes through
``backend.RandomGenerator.dropout``, a draw is attributed to the layer owning the generator,
and RNN cells draw a new mask at every timestep inside the time loop, captured there.

Zero perturbation: in graph mode only non-random ops are added (reads of the keep-masks TF
already computes; TF derives op seeds from a per-graph count of random ops, so the random
streams are unchanged). dropspy says so before it records where it cannot prove it:

- tf_keras itself is not reproducible run to run: random ops in a ``while`` loop body (RNN cell
  path in graph mode), legacy stateful random ops under XLA;
- the train function was built before recording: legacy stateful random ops keep their state
  inside it, and the function dropspy builds restarts their streams.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from dropspy.errors import UnsupportedModelError
from dropspy.frameworks.keras_base import KerasAdapterBase, fixed_noise_fn

__all__ = ["TfKerasAdapter"]


def _tf_keras_layer_class() -> Any:
    for name in ("tf_keras.src.engine.base_layer", "tf_keras"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        base = getattr(mod, "Layer", None) or getattr(getattr(mod, "layers", None), "Layer", None)
        if isinstance(base, type):
            return base
    return None


class TfKerasAdapter(KerasAdapterBase):
    """Records a tf_keras (Keras 2) model: ``fit``, ``train_on_batch``, ``evaluate``, ``predict``.

    Args:
        model: A ``tf_keras.Model`` (also ``tf.keras.Model`` under ``TF_USE_LEGACY_KERAS=1``).

    Raises:
        UnsupportedModelError: A layer that is not a model, ``steps_per_execution > 1``, or
            several replicas.

    Example:
        >>> with dropspy.record(model, "run.h5"):   # doctest: +SKIP
        ...     model.fit(x, y, epochs=1)
    """

    framework = "tf_keras"
    _model_label = "tf_keras"

    @classmethod
    def claims(cls, model: Any) -> bool:
        """Whether ``model`` is a tf_keras layer or model (never a Keras 3 or torch object)."""
        base = _tf_keras_layer_class()
        return isinstance(base, type) and isinstance(model, base)

    def __init__(self, model: Any) -> None:
        import tf_keras

        if not isinstance(model, tf_keras.Model):
            raise UnsupportedModelError(
                f"dropspy records a tf_keras Model trained with fit/train_on_batch. Received a "
                f"layer that is not a model: {type(model).__qualname__} "
                f"{getattr(model, 'name', '')!r}; wrap it in a tf_keras.Model."
            )
        super().__init__(model)

    # -- contract -------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """Framework, versions and devices, for the run file's root attributes."""
        import tensorflow as tf
        import tf_keras

        return {
            "framework": "tf_keras",
            "framework_version": tf_keras.__version__,
            "keras_major": 2,
            "backend": "tensorflow",
            "tensorflow_version": tf.__version__,
            "devices": [d.name for d in tf.config.list_logical_devices()],
            "jit_compile": str(getattr(self.model, "_jit_compile", None)),
            "run_eagerly": str(bool(self.model.run_eagerly)),
        }

    def _install(self) -> None:
        from dropspy.frameworks.tf_keras import capture as cap
        from dropspy.frameworks.tf_keras.sites import find_sites

        self._cap = cap
        self._check_compiled_options()
        self._sites = find_sites(self.model)
        for spec in self._sites.all_specs():
            if spec.rank is not None:
                self._declare(spec, spec.rank)
        self._warn_unreproducible()
        cap.install(self)
        self._undo.append(lambda: cap.uninstall(self))
        for layer, role in self._sites.mask_getters:
            getter = ("get_dropout_mask_for_cell" if role == "input"
                      else "get_recurrent_dropout_mask_for_cell")
            self._set_attr(layer, getter, self._mask_wrapper(layer, getattr(layer, getter), role))
        self._wrap_training()

    # -- patching ---------------------------------------------------------------------------

    def _mask_wrapper(self, layer: Any, original: Callable[..., Any], role: str) -> Any:
        cap = self._cap

        def get_mask(*args: Any, **kwargs: Any) -> Any:
            trace = cap.current_trace()
            if trace is None or trace.owner is not self:
                return original(*args, **kwargs)
            trace.roles.append(cap.RoleFrame(layer, role))
            try:
                return original(*args, **kwargs)
            finally:
                trace.roles.pop()

        get_mask.__wrapped__ = original  # type: ignore[attr-defined]
        return get_mask

    def _wrap_training(self) -> None:
        """Wrap the train/test/predict steps and the functions tf_keras compiles from them.

        Train steps count steps. Evaluate and predict batches are recorded too, at the current
        step and with ``training=False``: a mask applied there is dropout at inference (e.g.
        Monte Carlo dropout, ``Dropout()(x, training=True)``), and the analysis says so.
        """
        for kind in ("train", "test", "predict"):
            self._wrap_step_kind(kind)

    def _wrap_step_kind(self, kind: str) -> None:
        model = self.model
        original_step = getattr(model, f"{kind}_step")
        original_make = getattr(model, f"make_{kind}_function")
        attr = f"{kind}_function"

        def step_fn(data: Any) -> Any:
            return self._traced_step(original_step, data, kind)

        def make_function(force: bool = False) -> Any:
            self._check_compiled_options()
            fn = model.__dict__.get(attr)
            if fn is not None and not force and getattr(fn, "_dropspy_owner", None) is self:
                return fn
            object.__setattr__(model, attr, None)
            original_make(force=True)
            wrapped = self._host_wrapper(getattr(model, attr), kind)
            object.__setattr__(model, attr, wrapped)
            return wrapped

        self._set_attr(model, f"{kind}_step", step_fn)
        self._set_attr(model, f"make_{kind}_function", make_function)
        # A function built before recording has no mask outputs: set it aside (restored on
        # detach) so fit/evaluate/predict build one with the wrapped step.
        self._set_attr(model, attr, None)
        self._set_attr(model, f"{kind}_tf_function", None)

    def _steps_per_execution(self) -> tuple[int, bool]:
        model = self.model
        spe = getattr(model, "_steps_per_execution", None)
        try:
            spe = int(spe.numpy().item()) if spe is not None else 1
        except Exception:
            spe = 1
        return spe, bool(getattr(model, "autotune_steps_per_execution", False))

    def _warn_unreproducible(self) -> None:
        """Say before recording where tf_keras itself is not reproducible run to run."""
        model = self.model
        sm = self._sites
        if model.run_eagerly:
            return
        loops = [sm.layer_paths[i] for i, how in sm.loop_paths.items() if how == "while-loop"]
        if loops:
            self.session.warn_perturbation(
                f"{', '.join(loops)}: tf_keras draws these RNN dropout masks inside the time "
                f"loop (tf.while_loop) with stateful random ops, whose order across loop "
                f"iterations is not fixed: such training is not reproducible run to run even "
                f"without dropspy, so dropspy cannot prove it leaves it unchanged (capturing the "
                f"per-timestep masks adds loop outputs). The recorded masks are the ones "
                f"applied. Reproducible alternatives: unroll=True or run_eagerly=True (one mask "
                f"set for all timesteps), or recurrent_dropout=0 with the default activations "
                f"(the cuDNN-eligible path, one mask per timestep drawn before the loop)."
            )
        built = model.__dict__.get("train_function")
        if built is not None and self._legacy_stateful():
            self.session.warn_perturbation(
                "this model's train function was built before recording started. tf_keras' "
                "stateful dropout ops keep their random state inside that compiled function; "
                "dropspy must build a new one (with the masks as extra outputs), whose random "
                "streams start again from the seeds, and restores the old one on exit. The "
                "masks drawn while recording, and the training from here on, differ from a run "
                "without dropspy. To keep training bit-identical, start recording before the "
                "first fit/train_on_batch, or call model.compile() again before recording."
            )
        jit = getattr(model, "_jit_compile", None)
        if jit and sm.all_specs():
            self.session.warn_perturbation(
                "jit_compile=True: under XLA tf_keras' stateful dropout ops are not "
                "reproducible run to run even without dropspy (measured: different weights "
                "after identical seeded runs), so dropspy cannot prove it leaves training "
                "unchanged. The recorded masks are the ones applied."
            )

    def _legacy_stateful(self) -> bool:
        """Whether some dropout generator of the model uses TF's stateful (legacy) random ops."""
        from tf_keras.src import backend as kbackend

        legacy = kbackend.RandomGenerator.RNG_LEGACY_STATEFUL
        sm = self._sites
        owners = set(sm.dropout) | {lid for lid, _ in sm.slots}
        return any(getattr(gen_owner._random_generator, "_rng_type", legacy) == legacy
                   for gen_owner in sm.owners.values() if id(gen_owner) in owners)

    # -- trace time -------------------------------------------------------------------------

    def _new_trace(self, kind: str, graph: Any, eager: bool) -> Any:
        return self._cap.Trace(owner=self, graph=graph, eager=eager, training=kind == "train")

    def on_dropout(self, trace: Any, generator: Any, inputs: Any, rate: Any,
                   noise_shape: Any) -> Any:
        """Called (at trace time) for each ``RandomGenerator.dropout`` in a recorded step."""
        import tensorflow as tf

        cap = self._cap
        sm = self._sites
        owner = sm.owners.get(id(generator))
        role = trace.roles[-1] if trace.roles else None
        slot = None
        if role is not None and owner is role.layer:
            k = role.count
            role.count += 1
            slot = sm.slot(owner, role.role, k)
        out, keep = cap.exact_dropout(generator, inputs, rate, noise_shape)
        if owner is None:
            return out
        if slot is not None:
            spec = slot.spec
            if spec is None:
                if slot.unknown and role is not None:
                    path = sm.layer_paths.get(id(owner), owner.name)
                    self._note_once(f"unknown:{path}:{role.role}",
                                    f"{path} ({type(owner).__name__}) drew more {role.role} "
                                    f"masks per call than dropspy knows it applies; the extra "
                                    f"ones are not recorded")
                return out   # drawn and never applied (e.g. LSTM masks 1-3, cuDNN-eligible)
        else:
            spec = sm.dropout.get(id(owner)) or self._custom_spec(owner, rate, noise_shape)
        if keep is None:
            self._unobservable(spec, "the keep-mask could not be read from TF's dropout ops")
            return out
        loop = trace.loops[-1] if trace.loops else None
        kind = slot.kind if slot is not None else "output"
        if kind != "sequence" and loop is not None:
            # Inside backend.rnn: a cell's masks, or a layer run per timestep (TimeDistributed).
            step_shape = tf.shape(keep if slot is not None else inputs, out_type=tf.int32)
            if trace.eager or keep.graph is trace.graph:
                entry = loop.outer.setdefault(spec.name, (spec, [], step_shape))
                entry[1].append(keep)
            elif keep.graph is loop.body_graph:
                loop.body[spec.name] = keep
            else:
                self._unobservable(spec, "the mask is drawn inside a TensorFlow branch (tf.cond; "
                                         "is `training` a tensor?) and cannot leave the step")
            return out
        if kind == "step":
            self._unobservable(spec, "an RNN cell drew a mask outside an RNN layer's loop")
            return out
        if not (trace.eager or keep.graph is trace.graph):
            self._unobservable(spec, "the mask is drawn inside a TensorFlow loop or branch "
                                     "(tf.while_loop / tf.cond) and cannot leave the step")
            return out
        noise = tf.shape(keep, out_type=tf.int32)
        applied = noise if kind == "sequence" else tf.shape(inputs, out_type=tf.int32)
        rank = int(keep.shape.rank)
        td = self._sites.time_distributed.get(id(owner))
        if td is not None:
            # TimeDistributed ran the layer once on the (batch * time, ...) reshaped input.
            t = self._static_time(td)
            if t is None:
                self._unobservable(spec, "TimeDistributed with an unknown number of timesteps")
                return out
            t = tf.cast(t, tf.int32)
            shared = tf.equal(noise[:1], 1)   # noise_shape (1, ...): one mask for all rows
            lead = tf.concat([tf.where(shared, 1, noise[:1] // t), tf.where(shared, 1, [t])], 0)
            keep = tf.reshape(keep, tf.concat([lead, noise[1:]], 0))
            noise = tf.shape(keep, out_type=tf.int32)
            applied = tf.concat([applied[:1] // t, [t], applied[1:]], 0)
            rank += 1
        self._add_draw(trace, spec, keep, noise, applied, rank=rank)
        return out

    def on_loop_done(self, trace: Any, loop: Any) -> None:
        """After one ``backend.rnn`` call: export its masks, per timestep where they were."""
        import tensorflow as tf

        for name, (spec, keeps, step_shape) in loop.outer.items():
            t = tf.reshape(loop.time_steps(), [1])
            applied = tf.concat([step_shape[:1], t, step_shape[1:]], 0)
            rank = int(keeps[-1].shape.rank) + 1
            buf = loop.buffers.get(name)
            per_step = None
            if buf is not None:
                per_step = buf     # drawn in the while-loop body, one slice per iteration
            elif loop.body_graph is not None:
                self._unobservable(spec, "the loop body drew no mask where the first timestep "
                                         "did; dropspy cannot tell which mask was applied")
                continue
            elif len(keeps) > 1:
                # Eager or unrolled, a layer without a mask cache draws at every timestep (eager
                # loops also call it once at time 0 for shape inference, never applied).
                steps = keeps if loop.unroll else keeps[1:]
                if trace.eager and len(steps) != int(t[0]):
                    self._unobservable(spec, f"{len(keeps)} draws in a loop of {int(t[0])} "
                                             f"timesteps; dropspy cannot tell which were applied")
                    continue
                per_step = tf.stack(steps, 0)
            if per_step is not None:
                if loop.go_backwards:
                    per_step = tf.reverse(per_step, [0])   # loop order -> input order
                noise = per_step if loop.time_major else tf.transpose(
                    per_step, [1, 0, *range(2, rank)])
                self._add_draw(trace, spec, noise, tf.shape(noise, out_type=tf.int32), applied,
                               rank=rank)
            else:
                # One cached mask (eager or unroll=True) serves every timestep.
                self._add_draw(trace, spec, keeps[0], tf.shape(keeps[0], out_type=tf.int32),
                               applied, rank=rank, expand_time=True)

    @staticmethod
    def _static_time(td: Any) -> Any:
        """The number of timesteps of the running ``TimeDistributed`` call (int or tensor)."""
        # TimeDistributed.call computes it (static or tf.shape) before calling its layer.
        frame: FrameType | None = sys._getframe(1)
        for _ in range(64):
            if frame is None:
                break
            if frame.f_locals.get("self") is td and "input_length" in frame.f_locals:
                value = frame.f_locals["input_length"]
                if value is not None:
                    return value
            frame = frame.f_back
        try:
            return int(td.input_shape[1])
        except Exception:  # never called symbolically, or an unknown length
            return None

    def on_untraced_dropout(self, generator: Any) -> None:
        """A dropout drawn outside any recorded train step (custom loop?): say so, once."""
        if "untraced" in self._noted or self._sites is None:
            return
        owner = self._sites.owners.get(id(generator))
        if owner is None:
            return
        path = self._sites.layer_paths.get(id(owner), owner.name)
        self._note_once(
            "untraced",
            f"{path} drew a dropout mask outside model.fit/evaluate/predict (a custom training "
            f"loop, or model(x, training=True)): dropspy records the masks of tf_keras train, "
            f"test and predict steps only; masks drawn elsewhere are not recorded.",
        )

    # -- helpers ------------------------------------------------------------------------------

    def _add_draw(self, trace: Any, spec: Any, keep: Any, noise_shape: Any, applied_shape: Any,
                  *, rank: int | None, expand_time: bool = False) -> None:
        if rank is None:
            self._unobservable(spec, "the rank of its input is unknown while tracing")
            return
        if spec.declared and spec.rank != rank:
            self._note_once(f"rank:{spec.name}",
                            f"site {spec.name}: a call with rank {rank} differs from the "
                            f"declared rank {spec.rank}; those records are not kept")
            return
        if not self._declare(spec, rank):
            return
        trace.draws.append(self._cap.Draw(spec=spec, keep=keep, noise_shape=noise_shape,
                                          applied_shape=applied_shape, training=trace.training,
                                          expand_time=expand_time))

    def _custom_spec(self, owner: Any, rate: Any, noise_shape: Any) -> Any:
        """A site for a layer dropspy does not know that calls its generator's dropout."""
        from dropspy.frameworks.keras_base import SiteSpec

        path = self._sites.layer_paths.get(id(owner), owner.name)
        configured = None
        if isinstance(noise_shape, (list, tuple)):
            configured = tuple(d if isinstance(d, int) else None for d in noise_shape)
        spec = SiteSpec(
            name=path, layer=path, layer_class=type(owner).__name__, role="custom",
            rate=float(rate) if isinstance(rate, (int, float)) else None,
            noise_fn=fixed_noise_fn(configured),
            extra={"drawn_by": "self._random_generator.dropout in the layer's call()"},
        )
        self._sites.dropout[id(owner)] = spec
        return spec
