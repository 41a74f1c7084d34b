"""Sites and runs held in memory, with the reader API: the analysis runs on them directly."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dropspy.records import IndexBlock

__all__ = ["MemorySite", "MemoryRun"]


class MemorySite:
    """Masks held in memory, with the reader API of :class:`dropspy.store.Site`.

    Lets the analysis (and tests) run on arrays that never went through a run file.

    Args:
        name: Site name.
        axes: Axis names.
        noises: Keep-noise per record (bool or 0/1), or None for a record without a mask.
        rate: Configured rate.
        shapes: Applied shape per record (default: the noise's shape).
        steps: Step per record (default: 0, 1, 2...).
        calls: Call per record (default: 0).
        training: Training flag per record (default: True).
        layer: Layer path (default: ``name``).
        layer_class: Layer class name.
        role: Site role.
        gate: Gate name or None.
        extra: Site facts.
        opaque: Reason the masks cannot be observed, or None.
        replicas: Replica per record (default: 0).
    """

    def __init__(self, name: str, axes: Sequence[str], noises: Sequence[np.ndarray | None], *,
                 rate: float | None = None, shapes: Sequence[Sequence[int]] | None = None,
                 steps: Sequence[int] | None = None, calls: Sequence[int] | None = None,
                 training: Sequence[bool] | None = None, layer: str | None = None,
                 layer_class: str = "Dropout", role: str = "output", gate: str | None = None,
                 extra: Mapping[str, Any] | None = None, opaque: str | None = None,
                 replicas: Sequence[int] | None = None) -> None:
        self.name = name
        self.axes = tuple(axes)
        self.rate = rate
        self.layer = layer if layer is not None else name
        self.layer_class = layer_class
        self.role = role
        self.gate = gate
        self.extra = dict(extra or {})
        self.opaque = opaque
        self.noise_shape = None
        self.scale = None if rate is None or rate >= 1 else 1.0 / (1.0 - rate)
        self._noises = [None if x is None else np.asarray(x) != 0 for x in noises]
        n = len(self._noises)
        rank = len(self.axes)
        for x in self._noises:
            if x is not None and x.ndim != rank:
                raise ValueError(f"Site {name!r}: noise of shape {x.shape} has rank {x.ndim}, "
                                 f"expected rank {rank} (axes {self.axes})")
        self.shapes = np.array(
            shapes if shapes is not None else
            [x.shape if x is not None else (0,) * rank for x in self._noises],
            dtype=np.int64).reshape(n, rank)
        self.noise_shapes = np.array(
            [x.shape if x is not None else (0,) * rank for x in self._noises],
            dtype=np.int64).reshape(n, rank)
        self.steps = np.asarray(steps if steps is not None else range(n), dtype=np.int64)
        self.calls = np.asarray(calls if calls is not None else [0] * n, dtype=np.int64)
        self.training = np.asarray(training if training is not None else [True] * n, dtype=bool)
        self.applied = np.array([x is not None for x in self._noises], dtype=bool)
        self.replicas = np.zeros(n, np.int64) if replicas is None else np.asarray(replicas,
                                                                                   np.int64)
        for arr, what in ((self.steps, "steps"), (self.calls, "calls"),
                          (self.training, "training"), (self.replicas, "replicas")):
            if len(arr) != n:
                raise ValueError(f"Site {name!r}: {len(arr)} {what} for {n} records")
        packed = [np.empty(0, np.uint8) if x is None else np.packbits(x.ravel())
                  for x in self._noises]
        sizes = np.array([len(p) for p in packed], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._bits = np.concatenate(packed) if packed else np.empty(0, np.uint8)

    @classmethod
    def from_site(cls, site: Any) -> MemorySite:
        """Any site with the reader API (``noise(i)``, index arrays) held in memory."""
        n = len(site)
        return cls(site.name, site.axes, [site.noise(i) for i in range(n)],
                   rate=getattr(site, "rate", None),
                   shapes=np.asarray(site.shapes)[:n].tolist(),
                   steps=np.asarray(site.steps)[:n].tolist(),
                   calls=np.asarray(site.calls)[:n].tolist(),
                   training=np.asarray(site.training)[:n].tolist(),
                   replicas=getattr(site, "replicas", None),
                   layer=getattr(site, "layer", None),
                   layer_class=getattr(site, "layer_class", "Dropout"),
                   role=getattr(site, "role", "output"), gate=getattr(site, "gate", None),
                   extra=getattr(site, "extra", None), opaque=getattr(site, "opaque", None))

    def index_blocks(self, rows: int = 1 << 16) -> Iterator[IndexBlock]:
        """The index in blocks of ``rows`` records (the reader API the analysis streams)."""
        n = len(self)
        for a in range(0, n, max(rows, 1)):
            b = min(n, a + rows)
            yield IndexBlock(start=a, steps=self.steps[a:b], calls=self.calls[a:b],
                             replicas=self.replicas[a:b], training=self.training[a:b],
                             applied=self.applied[a:b], offsets=self.offsets[a:b],
                             shapes=self.shapes[a:b], noise_shapes=self.noise_shapes[a:b])

    def read_bits(self, begin: int, end: int) -> np.ndarray:
        """Packed bytes ``begin:end`` of all records' noise, back to back."""
        return self._bits[begin:end]

    def __len__(self) -> int:
        return len(self._noises)

    def noise(self, i: int) -> np.ndarray | None:
        """The keep-noise of record ``i``."""
        return self._noises[i]

    def mask(self, i: int) -> np.ndarray | None:
        """The applied keep-mask of record ``i`` (a broadcast copy)."""
        x = self._noises[i]
        return None if x is None else np.broadcast_to(x, tuple(self.shapes[i])).copy()

    def iter_noise(self, start: int = 0, stop: int | None = None, *,
                   max_bytes: int = 16 << 20) -> Iterable[tuple[int, np.ndarray | None]]:
        """Yield ``(i, noise)`` for records ``start:stop``."""
        stop = len(self) if stop is None else min(stop, len(self))
        for i in range(start, stop):
            yield i, self._noises[i]


class MemoryRun(Mapping[str, Any]):
    """A mapping of site name to :class:`MemorySite`, with the run attributes the analysis reads.

    Args:
        sites: The sites.
        complete: Whether the run counts as closed cleanly.
        records_dropped: Records not written, by cause.
        notes: Messages for the user.
        framework: Framework name.
    """

    def __init__(self, sites: Iterable[MemorySite], *, complete: bool = True,
                 records_dropped: Mapping[str, int] | None = None,
                 notes: Sequence[str] = (), framework: str = "memory") -> None:
        self._sites = {s.name: s for s in sites}
        self.complete = complete
        self.records_dropped = dict(records_dropped or {})
        self.notes = list(notes)
        self.framework = framework
        self.path = None
        self.attrs: dict[str, Any] = {}
        self.records_written = sum(len(s) for s in self._sites.values())

    @property
    def sites(self) -> tuple[str, ...]:
        """Site names in order."""
        return tuple(self._sites)

    def __getitem__(self, name: str) -> MemorySite:
        return self._sites[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)
