"""Where each Keras draw goes: site, role, gate, training flag (the adapter's trace-time half).

:class:`DrawRouter` is mixed into :class:`~dropspy.frameworks.keras.KerasAdapter`. The patched
``random.dropout`` calls :meth:`DrawRouter.on_dropout` while a recorded step is traced; it looks
at the frame stack the wrappers keep (RNN call, cell mask getter, TimeDistributed) and at the
Python stack (the layer whose code drew), builds the exact draw, and queues a
:class:`~dropspy.frameworks.keras.capture.Draw` on the trace.

The host class provides ``model``, ``session``, ``_sites`` (a ``SiteMap``), ``_cap`` (the
``keras_capture`` module), ``_refresh_sites()``, and ``_declare``, ``_unobservable`` and
``_note_once`` (from :class:`~dropspy.frameworks.keras_base.KerasAdapterBase`).
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import numpy as np

from dropspy.frameworks.base import Session
from dropspy.frameworks.keras_base import fixed_noise_fn

__all__ = ["DrawRouter"]

_ATTENTION_CLASSES = ("Attention", "AdditiveAttention", "GroupedQueryAttention",
                      "MultiHeadAttention")

def _static_bool(value: Any, cap: Any = None) -> bool:
    """A training flag as a Python bool; symbolic flags through the backend's capture."""
    if value is None:
        return False
    if isinstance(value, (bool, int, np.bool_)):
        return bool(value)
    if cap is not None:
        return bool(cap.static_bool(value))
    return True


class DrawRouter:
    """Routes each dropout drawn in a recorded step to its site (mixin; see module doc)."""

    model: Any
    session: Session
    _sites: Any
    _cap: Any
    _noted: set[str]
    # From KerasAdapterBase (annotations only: a stub here would shadow it in the MRO).
    _declare: Callable[[Any, int], bool]
    _unobservable: Callable[..., None]
    _note_once: Callable[[str, str], None]

    def _refresh_sites(self) -> None:  # pragma: no cover - provided by the adapter
        raise NotImplementedError

    def on_dropout(self, trace: Any, inputs: Any, rate: Any, noise_shape: Any, seed: Any) -> Any:
        """Called (at trace time) for each ``backend.random.dropout`` in a recorded step."""
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
                out, keep, ns = cap.exact_dropout(inputs, rate, noise_shape, seed)
                if keep is None:
                    return self._missed(trace, specs[k], out)
                training = _static_bool(rnn_frame.training, cap)
                # The cells apply the cached masks only under `training and 0 < rate < 1`;
                # RNN.call draws them in every mode (also predict/evaluate).
                applied = (training and isinstance(rate, numbers.Real)
                           and 0.0 < float(rate) < 1.0)
                t = cap.shape_vector(rnn_frame.sequence)[1:2]
                applied_shape = cap.concat([ns[:1], t, ns[1:]])
                self._add_draw(trace, specs[k], keep, ns, applied_shape, training, applied,
                               expand_time=True, rank=int(cap.rank(keep)) + 1)
                return out

        layer = self._drawing_layer()
        if layer is not None and id(layer) not in sm.layers:
            self._refresh_sites()   # built lazily inside this step (e.g. MHA's dropout layer)
        if layer is None:
            layer = top.layer if top is not None else self.model
        own = top if top is not None and top.layer is layer else None

        rnn_frame = next((f for f in reversed(trace.stack) if f.kind == "rnn"), None)
        if rnn_frame is not None and not getattr(rnn_frame.layer, "unroll", False):
            # Drawn by a cell's own code: Keras' TF rnn() calls the step once outside the loop
            # to learn the output spec (result discarded) and then inside a tf.while_loop.
            # Neither draw can be reported as the mask that was applied.
            spec = sm.dropout.get(id(layer)) or self._custom_spec(
                layer, 0, rate, noise_shape, cap.rank(inputs))
            out, keep, _ = cap.exact_dropout(inputs, rate, noise_shape, seed)
            in_loop = keep is not None and cap.in_inner_scope(trace, keep)
            steps = rnn_frame.sequence.shape[1] if rnn_frame.sequence is not None else None
            self._unobservable(spec, "the mask is drawn inside a TensorFlow loop (an RNN "
                                     "cell's own dropout, redrawn at every timestep) and cannot "
                                     "leave the compiled step")
            if in_loop:   # one applied mask per timestep; the spec draw outside is discarded
                trace.lost["unobservable"] = trace.lost.get("unobservable", 0) + (steps or 1)
            return out

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
                                             "its layer inside vectorized_map", trace)
                    return cap.original_dropout(inputs, rate, noise_shape=noise_shape, seed=seed)
            out, keep, ns = cap.exact_dropout(inputs, rate, noise_shape, seed)
            if keep is None:
                return self._missed(trace, spec, out)
            training = True if own is None or own.training is None \
                else _static_bool(own.training, cap)
            in_rank = cap.rank(inputs)
            rank = None if in_rank is None else in_rank + (1 if td_frame is not None else 0)
            draw = self._add_draw(trace, spec, keep, ns, cap.shape_vector(inputs),
                                  training, True, rank=rank, declare=td_frame is None)
            if draw is not None:
                draw.td_frame = td_frame
            return out

        # Anything else that calls keras.random.dropout: a custom site on the calling layer.
        ordinal = 0
        if own is not None:
            ordinal = own.count
            own.count += 1
        rank = cap.rank(inputs)
        spec = self._custom_spec(layer, ordinal, rate, noise_shape, rank)
        out, keep, ns = cap.exact_dropout(inputs, rate, noise_shape, seed)
        if keep is None:
            return self._missed(trace, spec, out)
        training = True if own is None or own.training is None \
            else _static_bool(own.training, cap)
        self._add_draw(trace, spec, keep, ns, cap.shape_vector(inputs), training, True, rank=rank)
        return out

    def _missed(self, trace: Any, spec: Any, out: Any) -> Any:
        """A draw whose mask could not be copied: count it (capture_error), say so once."""
        trace.lost["capture_error"] = trace.lost.get("capture_error", 0) + 1
        why = getattr(self._cap, "miss", "the mask could not be copied")
        self._note_once(f"miss:{spec.name}", f"site {spec.name}: a mask was not recorded ({why}); "
                        f"counted as dropped (capture_error)")
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
        frame: FrameType | None = sys._getframe(2)
        for _ in range(8):   # initializer -> keras.random -> backend: a few frames up
            if frame is None:
                break
            if frame.f_globals.get("__name__", "").startswith("keras.src.initializers"):
                return  # a weight initializer of a layer built lazily in the step, not noise
            frame = frame.f_back
        from dropspy.frameworks.keras.sites import _NOISE_LAYERS, SiteSpec

        path = self._sites.layer_paths.get(id(layer), layer.name)
        cls = type(layer).__name__
        known = next((s for s in self._sites.opaque if s.layer == path), None)
        if known is None:
            key = (id(layer), f"keras.random.{name}")
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

    def _drawing_layer(self) -> Any:
        """The innermost Keras layer on the Python stack (the one whose code drew)."""
        import keras

        frame: FrameType | None = sys._getframe(2)
        for _ in range(64):
            if frame is None:
                return None
            obj = frame.f_locals.get("self")
            if isinstance(obj, keras.layers.Layer):
                return obj
            frame = frame.f_back
        return None

    def _custom_spec(self, layer: Any, ordinal: int, rate: Any, noise_shape: Any,
                     rank: int | None) -> Any:
        from dropspy.frameworks.keras.sites import SiteSpec

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
            rate=float(rate) if isinstance(rate, numbers.Real) else None,
            noise_fn=fixed_noise_fn(configured),
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

    def _add_draw(self, trace: Any, spec: Any, keep: Any, ns: Any, applied_shape: Any,
                  training: bool, applied: bool, *, rank: int | None, expand_time: bool = False,
                  declare: bool = True) -> Any:
        if rank is None:
            self._unobservable(spec, "the rank of its input is unknown while tracing", trace)
            return None
        if self._cap.in_inner_scope(trace, keep):
            self._unobservable(spec, "the mask is drawn inside a TensorFlow loop or branch "
                                     "(tf.while_loop / tf.cond) and cannot leave the compiled "
                                     "step", trace)
            return None
        if declare:
            if spec.declared and spec.rank != rank:
                self._note_once(f"rank:{spec.name}",
                                f"site {spec.name}: a call with rank {rank} differs from the "
                                f"declared rank {spec.rank}; those records are counted as "
                                f"dropped (rank_mismatch)")
                trace.lost["rank_mismatch"] = trace.lost.get("rank_mismatch", 0) + 1
                return None
            if not self._declare(spec, rank):
                trace.lost["site_filter"] = trace.lost.get("site_filter", 0) + 1
                return None
        draw = self._cap.Draw(spec=spec, keep=keep, noise_shape=ns, applied_shape=applied_shape,
                              training=training, applied=applied, expand_time=expand_time)
        trace.draws.append(draw)
        return draw

    def _merge_time_distributed(self, trace: Any, frame: Any) -> None:
        """Stack the per-timestep draws of a TimeDistributed call into one (batch, time, ...)."""
        cap = self._cap
        slices = [d for d in trace.draws[frame.start:] if d.td_frame is frame]
        if not slices:
            return
        trace.draws[:] = [d for d in trace.draws if d.td_frame is not frame]
        spec = slices[0].spec
        rank = int(cap.rank(slices[0].keep)) + 1
        if not (spec.declared and spec.rank == rank) and not self._declare(spec, rank):
            return
        t = cap.int_vector([len(slices)])
        keep = cap.stack([d.keep for d in slices], 1)
        ns, ap = slices[0].noise_shape, slices[0].applied_shape
        trace.draws.append(cap.Draw(
            spec=spec, keep=keep, noise_shape=cap.concat([ns[:1], t, ns[1:]]),
            applied_shape=cap.concat([ap[:1], t, ap[1:]]), training=slices[0].training,
            applied=True))
