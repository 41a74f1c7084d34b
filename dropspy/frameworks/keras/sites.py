"""Where a Keras 3 model applies dropout: the sites, their names, axes and configuration.

This module walks the layer tree once, when recording starts, and builds one :class:`SiteSpec`
per place a mask is applied. A spec turns into a :class:`~dropspy.store.SiteInfo` once the
rank of the masked tensor is known (at attach time for built functional models, else at the
first draw); both paths go through :meth:`SiteSpec.info`, so the declaration is identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from keras import layers as klayers
from keras.src.layers.rnn.conv_lstm import ConvLSTMCell
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
from keras.src.layers.rnn.stacked_rnn_cells import StackedRNNCells

from dropspy.frameworks.keras_base import SiteSpec, add_time_axis, axes_for, dropout_shape_fns

__all__ = ["SiteSpec", "CellSites", "SiteMap", "axes_for", "find_sites"]

# Gate order of the per-gate masks, as the cells index dp_mask[k] (lstm.py, gru.py, conv_lstm.py).
_GATES = {"LSTMCell": ("i", "f", "c", "o"), "GRUCell": ("z", "r", "h")}
_CONV_LSTM_GATES = ("i", "f", "c", "o")

# Layers that draw noise which is not a Bernoulli keep-mask: declared opaque, with the reason.
_NOISE_LAYERS = {
    "GaussianDropout": "multiplies by Gaussian noise (keras.random.normal); no keep-mask exists",
    "GaussianNoise": "adds Gaussian noise (keras.random.normal); no keep-mask exists",
    "AlphaDropout": (
        "builds its keep-mask from keras.random.uniform with an affine correction; dropspy "
        "does not record AlphaDropout yet"
    ),
}


@dataclass
class CellSites:
    """The sites of one ``DropoutRNNCell``: per role, one spec per mask the cell draws.

    ``input[k]`` is the k-th mask drawn by ``get_dropout_mask`` (gate k, or the single shared
    mask), ``recurrent[k]`` likewise for ``get_recurrent_dropout_mask``.
    """

    rnn: Any
    rnn_path: str
    input: list[SiteSpec]
    recurrent: list[SiteSpec]


@dataclass
class SiteMap:
    """Every site of a model, indexed the way the capture looks them up (by object id)."""

    layer_paths: dict[int, str] = field(default_factory=dict)
    layers: dict[int, Any] = field(default_factory=dict)
    dropout: dict[int, SiteSpec] = field(default_factory=dict)     # Dropout-family layer -> site
    time_distributed: dict[int, Any] = field(default_factory=dict)  # inner layer id -> TD layer
    cells: dict[int, CellSites] = field(default_factory=dict)
    rnns: dict[int, Any] = field(default_factory=dict)
    # (layer id, draw ordinal in one call) -> custom dropout site; (layer id, "keras.random.x")
    # -> opaque site of a layer drawing other random numbers.
    custom: dict[tuple[int, Any], SiteSpec] = field(default_factory=dict)
    opaque: list[SiteSpec] = field(default_factory=list)

    def all_specs(self) -> list[SiteSpec]:
        """Every known spec, in model order."""
        out = list(self.dropout.values())
        for cs in self.cells.values():
            out += cs.input + cs.recurrent
        return out + list(self.custom.values()) + self.opaque


def _static_rank(layer: Any) -> int | None:
    try:
        shape = layer.input.shape
    except Exception:  # never called symbolically (subclassed models, inner layers)
        return None
    try:
        return len(shape)
    except TypeError:
        return None


def _children(layer: Any) -> list[Any]:
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _dropout_spec(layer: Any, path: str, rank: int | None) -> SiteSpec:
    cls = type(layer).__name__
    if isinstance(layer, klayers.SpatialDropout1D):
        spatial = 1
    elif isinstance(layer, (klayers.SpatialDropout2D, klayers.SpatialDropout3D)):
        spatial = 2
    else:
        spatial = 0
    noise_fn, axes_fn = dropout_shape_fns(spatial, getattr(layer, "data_format", None),
                                          getattr(layer, "noise_shape", None))
    return SiteSpec(name=path, layer=path, layer_class=cls, role="output",
                    rate=getattr(layer, "rate", None), axes_fn=axes_fn, noise_fn=noise_fn,
                    rank=rank)


def _cell_specs(cell: Any, rnn: Any, rnn_path: str, prefix: str, in_rank: int | None,
                state_rank: int | None) -> CellSites:
    """Specs for one DropoutRNNCell. Ranks are the applied ranks (time axis included)."""
    cls = type(cell).__name__
    count = getattr(cell, "dropout_mask_count", None)
    data_format = getattr(cell, "data_format", None)
    conv = isinstance(cell, ConvLSTMCell)
    gates: tuple[str, ...] = _GATES.get(cls, _CONV_LSTM_GATES if conv else ())
    if count is not None and len(gates) != count:
        gates = tuple(f"g{k}" for k in range(count))

    def axes_fn(r: int) -> tuple[str, ...]:
        # The applied mask is the per-step mask broadcast over a time axis at position 1.
        step_axes = axes_for(r - 1, data_format if conv else None, sequence=False) if conv \
            else axes_for(r - 1)
        return (step_axes[0], "time", *step_axes[1:])

    def noise_fn(r: int) -> tuple[int | None, ...]:
        return (None, 1) + (None,) * (r - 2)

    def specs(role: str, rate: float, rank: int | None) -> list[SiteSpec]:
        if not rate:
            return []
        n = 1 if count is None else count
        extra: dict[str, Any] = {
            "time_axis_by_construction": True,
            "masks_per_call": n,
            "cell_class": cls,
            "drawn": "once per layer call, before the time loop; the same mask at every step",
        }
        if gates:   # SimpleRNN has no gates: nothing to share or not
            extra["gates_share_mask"] = n == 1
            extra["gates"] = list(gates)
        if hasattr(cell, "implementation"):
            extra["implementation"] = int(cell.implementation)
        out = []
        for k in range(n):
            gate = gates[k] if count is not None else None
            name = f"{prefix}/{role}" + (f"/{gate}" if gate else "")
            out.append(SiteSpec(name=name, layer=rnn_path, layer_class=type(rnn).__name__,
                                role=role, rate=rate, gate=gate, axes_fn=axes_fn,
                                noise_fn=noise_fn, rank=rank, extra=dict(extra)))
        return out

    return CellSites(rnn=rnn, rnn_path=rnn_path,
                     input=specs("input", float(getattr(cell, "dropout", 0.0)), in_rank),
                     recurrent=specs("recurrent", float(getattr(cell, "recurrent_dropout", 0.0)),
                                     state_rank))


def _noise_amount(layer: Any) -> Any:
    """A noise layer's rate (GaussianDropout, AlphaDropout) or stddev (GaussianNoise)."""
    stddev: Any = getattr(layer, "stddev", 0)
    return getattr(layer, "rate", stddev)


def _rnn_ranks(rnn: Any, cell: Any, parent: Any) -> tuple[int | None, int | None]:
    in_rank = _static_rank(rnn)
    if in_rank is None and isinstance(parent, klayers.Bidirectional):
        in_rank = _static_rank(parent)
    if in_rank is None:
        return None, None
    # ConvLSTM states have the spatial rank of the input; other cells carry (batch, units).
    state_rank = in_rank if isinstance(cell, ConvLSTMCell) else 3
    return in_rank, state_rank


def find_sites(model: Any) -> SiteMap:
    """Walk ``model``'s layer tree and return every dropout site it can apply.

    Args:
        model: A built or unbuilt Keras 3 model.

    Returns:
        A :class:`SiteMap` of the sites, keyed by the ids of the layers and cells that draw.
    """
    sm = SiteMap()
    sm.layer_paths[id(model)] = model.name
    sm.layers[id(model)] = model

    def visit(layer: Any, path: str, parent: Any) -> None:
        sm.layer_paths[id(layer)] = path
        sm.layers[id(layer)] = layer
        cls = type(layer).__name__
        if isinstance(layer, klayers.Dropout):
            rank = _static_rank(layer)
            if isinstance(parent, klayers.TimeDistributed):
                td_rank = _static_rank(parent)
                spec = _dropout_spec(layer, path, td_rank)
                add_time_axis(spec)
                spec.extra = {"wrapper": "TimeDistributed",
                              "drawn": "once per timestep (TimeDistributed calls the layer on "
                                       "each time slice)"}
                sm.time_distributed[id(layer)] = parent
            elif isinstance(parent, (klayers.MultiHeadAttention, klayers.GroupQueryAttention)):
                ppath = sm.layer_paths[id(parent)]
                spec = _dropout_spec(layer, f"{ppath}/attention", None)
                spec.layer, spec.layer_class, spec.role = ppath, type(parent).__name__, "attention"
                spec.axes_fn = lambda r: (("batch", "head", "query", "key") if r == 4
                                          else ("batch",) + tuple(f"axis{k}" for k in range(1, r)))
                spec.extra = {"applied_to": "attention probabilities (after softmax)"}
            else:
                spec = _dropout_spec(layer, path, rank)
            if spec.rate:
                sm.dropout[id(layer)] = spec
        elif cls in _NOISE_LAYERS and _noise_amount(layer):
            sm.opaque.append(SiteSpec(name=path, layer=path, layer_class=cls, role="output",
                                      rate=getattr(layer, "rate", None),
                                      rank=_static_rank(layer),
                                      opaque=_NOISE_LAYERS[cls]))
        if isinstance(layer, klayers.RNN):
            sm.rnns[id(layer)] = layer
            cell = layer.cell
            in_rank, state_rank = _rnn_ranks(layer, cell, parent)
            if isinstance(cell, StackedRNNCells):
                for c in cell.cells:
                    if isinstance(c, DropoutRNNCell):
                        sm.cells[id(c)] = _cell_specs(c, layer, path, f"{path}/{c.name}",
                                                      in_rank, state_rank)
            elif isinstance(cell, DropoutRNNCell):
                sm.cells[id(cell)] = _cell_specs(cell, layer, path, path, in_rank, state_rank)
        for child in _children(layer):
            if id(child) not in sm.layer_paths:
                visit(child, f"{path}/{child.name}", layer)

    for child in _children(model):
        visit(child, child.name, model)
    return sm
