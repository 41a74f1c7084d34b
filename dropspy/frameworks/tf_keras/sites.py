"""Where a tf_keras (Keras 2) model applies dropout: its sites, named as the Keras 3 adapter does.

Every tf_keras layer that draws random numbers owns a ``backend.RandomGenerator``
(``layer._random_generator``), so a draw is attributed to its layer through the generator that
made it, with no layer ``call`` patched. RNN cells draw ``count`` masks per role
(``get_dropout_mask_for_cell(inputs, training, count=4)`` for LSTM) but apply only some of them,
depending on the path the layer takes; this module knows which draw index is applied where:

- LSTM/GRU on the cuDNN-eligible path (``layer._could_use_gpu_kernel``, taken on CPU too): the
  *layer* draws ``count`` masks over the whole ``(batch, time, feature)`` input and applies the
  first one to the input, for all gates: site ``<layer>/input``, a new mask at every timestep.
- The cell path with ``implementation=1`` (forced by ``recurrent_dropout > 0``): one mask per
  gate and role, ``<layer>/input/i`` ... ``<layer>/recurrent/o`` (GRU ``z, r, h``).
- The cell path with ``implementation=2``: only the first input mask is applied, to all gates:
  ``<layer>/input``.
- SimpleRNN: one mask per role: ``<layer>/input``, ``<layer>/recurrent``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tf_keras.src import layers as klayers
from tf_keras.src.layers.rnn.dropout_rnn_cell_mixin import DropoutRNNCellMixin
from tf_keras.src.layers.rnn.stacked_rnn_cells import StackedRNNCells

from dropspy.frameworks.keras_base import SiteSpec, add_time_axis, axes_for, dropout_shape_fns

__all__ = ["SiteMap", "find_sites", "DrawSlot"]

_GATES = {"LSTMCell": ("i", "f", "c", "o"), "GRUCell": ("z", "r", "h"),
          "ConvLSTMCell": ("i", "f", "c", "o")}
_COUNTS = {"LSTMCell": 4, "GRUCell": 3, "ConvLSTMCell": 4, "SimpleRNNCell": 1}

# Layers that draw noise which is not a Bernoulli keep-mask: declared opaque, with the reason.
_NOISE_LAYERS = {
    "GaussianDropout": "multiplies by Gaussian noise (random_normal); no keep-mask exists",
    "GaussianNoise": "adds Gaussian noise (random_normal); no keep-mask exists",
    "AlphaDropout": ("builds its keep-mask from random_uniform with an affine correction; "
                     "dropspy does not record AlphaDropout yet"),
}


@dataclass
class DrawSlot:
    """What the k-th draw of one owner in one role is: its site (None: drawn, never applied).

    ``kind``: ``"sequence"`` (drawn on the whole sequence, cuDNN-eligible path), ``"step"``
    (drawn per cell call on one timestep's input or state), ``"output"`` (a dropout layer).
    """

    spec: SiteSpec | None
    kind: str
    unknown: bool = False    # a draw beyond what dropspy knows the layer draws (not recorded)


@dataclass
class SiteMap:
    """Every site of a model, indexed by the ids of the generators and layers that draw."""

    layer_paths: dict[int, str] = field(default_factory=dict)
    owners: dict[int, Any] = field(default_factory=dict)         # id(generator) -> layer
    dropout: dict[int, SiteSpec] = field(default_factory=dict)    # id(layer) -> spec
    time_distributed: dict[int, Any] = field(default_factory=dict)  # inner layer id -> TD layer
    slots: dict[tuple[int, str], list[DrawSlot]] = field(default_factory=dict)  # (layer, role)
    mask_getters: list[tuple[Any, str]] = field(default_factory=list)  # (layer, role) to wrap
    rnns: dict[int, Any] = field(default_factory=dict)           # RNN layers, by id
    loop_paths: dict[int, str] = field(default_factory=dict)      # id(RNN) -> "cuDNN-eligible"...
    opaque: list[SiteSpec] = field(default_factory=list)

    def all_specs(self) -> list[SiteSpec]:
        """Every spec, in model order, each once."""
        seen: dict[str, SiteSpec] = {}
        for spec in self.dropout.values():
            seen.setdefault(spec.name, spec)
        for slots in self.slots.values():
            for s in slots:
                if s.spec is not None:
                    seen.setdefault(s.spec.name, s.spec)
        for spec in self.opaque:
            seen.setdefault(spec.name, spec)
        return list(seen.values())

    def slot(self, layer: Any, role: str, k: int) -> DrawSlot | None:
        """The slot of the k-th mask ``layer`` draws in ``role``; None if unknown."""
        slots = self.slots.get((id(layer), role))
        if slots is None:
            return None
        if k < len(slots):
            return slots[k]
        return DrawSlot(None, slots[0].kind, unknown=True)


def _static_rank(layer: Any) -> int | None:
    try:
        return len(layer.input_shape)
    except Exception:  # never called symbolically (subclassed models, inner layers)
        return None


def _children(layer: Any) -> list[Any]:
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _dropout_spec(layer: Any, path: str) -> SiteSpec:
    if isinstance(layer, klayers.SpatialDropout1D):
        spatial = 1
    elif isinstance(layer, (klayers.SpatialDropout2D, klayers.SpatialDropout3D)):
        spatial = 2
    else:
        spatial = 0
    noise, axes = dropout_shape_fns(spatial, getattr(layer, "data_format", None),
                                    getattr(layer, "noise_shape", None))
    return SiteSpec(name=path, layer=path, layer_class=type(layer).__name__, role="output",
                    rate=float(layer.rate), noise_fn=noise, axes_fn=axes, rank=_static_rank(layer))


def _rnn_specs(sm: SiteMap, rnn: Any, path: str, cell: Any, prefix: str, in_rank: int | None,
               *, eager: bool) -> None:
    """Slots and specs for one DropoutRNNCellMixin cell of ``rnn``."""
    cls = type(cell).__name__
    count = _COUNTS.get(cls)
    gates = _GATES.get(cls, ())
    impl = getattr(cell, "implementation", 1)
    cudnn = bool(getattr(rnn, "_could_use_gpu_kernel", False)) and cell is rnn.cell
    unroll = bool(getattr(rnn, "unroll", False))
    conv = cls == "ConvLSTMCell"
    data_format = getattr(cell, "data_format", None)
    rnn_cls = type(rnn).__name__

    def axes(r: int) -> tuple[str, ...]:
        step = axes_for(r - 1, data_format, sequence=False) if conv else axes_for(r - 1)
        return (step[0], "time", *step[1:])

    if cudnn:
        loop = "cuDNN-eligible"
        how = ("drawn once per layer call on the whole (batch, time, feature) input, before "
               "the cuDNN-eligible kernel: a different mask at every timestep")
    elif eager or unroll:
        loop = "unrolled" if unroll else "eager"
        how = ("drawn once per layer call at the first timestep and used at every timestep "
               f"({'unroll=True' if unroll else 'run_eagerly=True'})")
    else:
        loop = "while-loop"
        how = ("drawn inside the time loop (tf.while_loop body): a new mask at every timestep; "
               "the masks drawn before the loop at time 0 are never used")
    sm.loop_paths[id(rnn)] = loop
    per_timestep = loop in ("cuDNN-eligible", "while-loop")
    state_rank = in_rank if conv else (3 if in_rank is not None else None)

    def spec(role: str, rate: float, gate: str | None, rank: int | None, drawn: int,
             applied: int) -> SiteSpec:
        # Keys shared with the Keras 3 adapter (masks_per_call, gates_share_mask, gates) mean
        # the same there: the masks applied per cell step, one per gate or one for all gates.
        extra: dict[str, Any] = {
            "cell_class": cls, "tf_keras_path": loop, "drawn": how,
            "masks_per_call": applied,
            "masks_drawn_per_call": drawn, "masks_applied_per_call": applied,
        }
        if gates:   # SimpleRNN has no gates: nothing to share or not
            extra["gates_share_mask"] = gate is None
            extra["gates"] = list(gates)
        if hasattr(cell, "implementation"):
            extra["implementation"] = int(impl)
        if not per_timestep:
            extra["time_axis_by_construction"] = True
        name = f"{prefix}/{role}" + (f"/{gate}" if gate else "")
        return SiteSpec(name=name, layer=path, layer_class=rnn_cls, role=role, rate=rate,
                        gate=gate, noise_fn=(lambda r: (None,) * r) if per_timestep
                        else (lambda r: (None, 1) + (None,) * (r - 2)),
                        axes_fn=axes, rank=rank, extra=extra)

    n = count or 1
    rate_in = float(getattr(cell, "dropout", 0.0) or 0.0)
    rate_rec = float(getattr(cell, "recurrent_dropout", 0.0) or 0.0)
    if getattr(rnn, "time_major", False):
        # (time, batch, ...) layouts would need their own axis order and time-axis handling.
        sm.loop_paths[id(rnn)] = "time-major"   # nothing captured: no loop outputs added
        for role, rate in (("input", rate_in), ("recurrent", rate_rec)):
            if rate:
                sm.opaque.append(SiteSpec(
                    name=f"{prefix}/{role}", layer=path, layer_class=rnn_cls, role=role,
                    rate=rate, rank=in_rank or 3,
                    opaque="time_major=True: dropspy does not record time-major RNNs yet"))
                owner = rnn if cudnn and role == "input" else cell
                sm.slots[(id(owner), role)] = [DrawSlot(None, "step")] * n
                sm.mask_getters.append((owner, role))
        return
    if rate_in:
        if cudnn:
            s = spec("input", rate_in, None, in_rank, n, 1)
            sm.slots[(id(rnn), "input")] = [DrawSlot(s, "sequence")] + \
                [DrawSlot(None, "sequence")] * (n - 1)
            sm.mask_getters.append((rnn, "input"))
        elif count is not None and n > 1 and impl == 2:
            s = spec("input", rate_in, None, in_rank, n, 1)
            sm.slots[(id(cell), "input")] = [DrawSlot(s, "step")] + \
                [DrawSlot(None, "step")] * (n - 1)
        elif count is not None and n > 1:
            sm.slots[(id(cell), "input")] = [
                DrawSlot(spec("input", rate_in, g, in_rank, n, n), "step") for g in gates]
        else:
            sm.slots[(id(cell), "input")] = [
                DrawSlot(spec("input", rate_in, None, in_rank, 1, 1), "step")]
        if not cudnn:
            sm.mask_getters.append((cell, "input"))
    if rate_rec:
        if count is not None and n > 1:
            sm.slots[(id(cell), "recurrent")] = [
                DrawSlot(spec("recurrent", rate_rec, g, state_rank, n, n), "step")
                for g in gates]
        else:
            sm.slots[(id(cell), "recurrent")] = [
                DrawSlot(spec("recurrent", rate_rec, None, state_rank, 1, 1), "step")]
        sm.mask_getters.append((cell, "recurrent"))


def find_sites(model: Any) -> SiteMap:
    """Walk ``model``'s layer tree and return every dropout site it can apply.

    Args:
        model: A tf_keras model.

    Returns:
        A :class:`SiteMap`, keyed by the ids of the generators, layers and cells that draw.
    """
    sm = SiteMap()
    sm.layer_paths[id(model)] = model.name
    eager = bool(getattr(model, "run_eagerly", False))

    def visit(layer: Any, path: str, parent: Any) -> None:
        sm.layer_paths[id(layer)] = path
        gen = getattr(layer, "_random_generator", None)
        if gen is not None:
            sm.owners[id(gen)] = layer
        cls = type(layer).__name__
        if isinstance(layer, klayers.Dropout):
            if layer.rate:
                spec = _dropout_spec(layer, path)
                if isinstance(parent, klayers.TimeDistributed):
                    # Keras 3 names this site the same way, with a time axis at position 1.
                    add_time_axis(spec)
                    spec.rank = _static_rank(parent)
                    spec.extra = {"wrapper": "TimeDistributed",
                                  "drawn": "a different mask at every timestep (the layer runs "
                                           "on the (batch * time, ...) reshaped input, or on "
                                           "each time slice in a loop)"}
                    sm.time_distributed[id(layer)] = parent
                sm.dropout[id(layer)] = spec
        elif cls in _NOISE_LAYERS and (getattr(layer, "rate", None)
                                       or getattr(layer, "stddev", None)):
            sm.opaque.append(SiteSpec(name=path, layer=path, layer_class=cls, role="output",
                                      rate=getattr(layer, "rate", None),
                                      rank=_static_rank(layer) or 2,
                                      opaque=_NOISE_LAYERS[cls]))
        if isinstance(layer, klayers.RNN):
            sm.rnns[id(layer)] = layer
            in_rank = _static_rank(layer)
            if in_rank is None and isinstance(parent, klayers.Bidirectional):
                in_rank = _static_rank(parent)
            cell = layer.cell
            if isinstance(cell, StackedRNNCells):
                for c in cell.cells:
                    if isinstance(c, DropoutRNNCellMixin):
                        _rnn_specs(sm, layer, path, c, f"{path}/{c.name}", in_rank, eager=eager)
            elif isinstance(cell, DropoutRNNCellMixin):
                _rnn_specs(sm, layer, path, cell, path, in_rank, eager=eager)
        for child in _children(layer):
            if id(child) not in sm.layer_paths:
                visit(child, f"{path}/{child.name}", layer)

    for child in _children(model):
        visit(child, child.name, model)
    return sm
