"""Framework-free pieces both Keras adapters need: axis names, scales, the step payload.

Nothing here imports Keras, tf_keras or TensorFlow, so the Keras 2 adapter can use it without
importing Keras 3 (``keras_sites`` imports ``keras`` at module level). The naming rules are the
Keras 3 adapter's (``keras_sites.axes_for``), so that both adapters name a model's sites and
axes the same way and ``dropspy diff`` lines the two runs up site by site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dropspy.store import Record, SiteInfo

__all__ = ["OUTPUT_KEY", "DrawMeta", "SiteSpec", "axes_for", "float32_scale", "decode_step"]

# Key of the extra train-step output; removed before any callback sees the logs.
OUTPUT_KEY = "_dropspy_masks"


def _spatial_names(n: int) -> tuple[str, ...]:
    return {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}.get(
        n, tuple(f"spatial{k}" for k in range(n))
    )


def axes_for(rank: int, data_format: str | None = None, *,
             sequence: bool = True) -> tuple[str, ...]:
    """Names for the axes of a tensor of ``rank`` in Keras' layout.

    The same rule as ``dropspy.frameworks.keras_sites.axes_for``.

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
