"""The framework-free vocabulary every part of dropspy speaks.

Sites and records as adapters hand them over, the run file's format constants, the causes a
record can be dropped for, and the one rule that decides which sites a glob pattern selects.
Adapters import this module, not the writer: it needs numpy only (no h5py, no thread, no
atexit hook).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ROLES",
    "INDEX_FIELDS",
    "DROP_CAUSES",
    "POLICY_CAUSES",
    "SiteInfo",
    "Record",
    "site_matches",
    "select_sites",
    "rank_path",
    "DIST_ATTRS",
    "SiteLike",
    "RunLike",
    "IndexBlock",
]

FORMAT_NAME = "dropspy.run"
# 2: per-record ``replica`` (int32) and ``rate`` (float32) in every site group; version 1
# files read as replica 0 and the site's configured rate.
FORMAT_VERSION = 2

#: Per-record index datasets of every site group, besides ``shape``, ``noise_shape``, ``bits``.
INDEX_FIELDS = ("step", "call", "training", "applied", "offset")

ROLES = ("output", "input", "recurrent", "between_layers", "attention", "custom")
#: Every cause a record can be counted as dropped for, in the order reports list them.
DROP_CAUSES = ("queue_full", "max_bytes", "disk_full", "write_error", "site_filter", "sampling",
               "capture_error")
#: Causes that are the user's own sampling choice, not losses.
POLICY_CAUSES = frozenset({"site_filter", "sampling"})

#: Root attributes of a distributed run (absent, or rank 0 of world size 1, in a single process).
DIST_ATTRS = ("rank", "world_size", "local_rank", "dist_backend", "run_id")
RANK_PLACEHOLDER = "{rank}"


def rank_path(path: str, rank: int, world_size: int) -> str:
    """The run file one rank of a distributed job writes: ranks never share a file.

    A ``{rank}`` placeholder in ``path`` is replaced by the rank; otherwise, when
    ``world_size > 1``, ``.rank<R>`` goes before the suffix (``run.h5`` -> ``run.rank1.h5``).
    A single process keeps ``path`` as given. The rule is framework-free: every adapter that
    knows its rank (torch DDP/FSDP, multi-worker Keras, JAX processes) gets the same names.

    Args:
        path: The path given to ``record()``.
        rank: This process's rank (0 in a single process).
        world_size: Number of processes in the job (1 in a single process).

    Returns:
        The path this process writes.

    Example:
        >>> rank_path("out/run.h5", 1, 2)
        'out/run.rank1.h5'
        >>> rank_path("run-{rank}.h5", 3, 4)
        'run-3.h5'
    """
    if RANK_PLACEHOLDER in path:
        return path.replace(RANK_PLACEHOLDER, str(int(rank)))
    if world_size <= 1:
        return path
    head, tail = os.path.split(path)
    stem, dot, suffix = tail.rpartition(".")
    if not dot or not stem:  # "run" or ".h5": no suffix to keep
        return os.path.join(head, f"{tail}.rank{int(rank)}")
    return os.path.join(head, f"{stem}.rank{int(rank)}.{suffix}")


@dataclass(frozen=True)
class SiteInfo:
    """One place in the model where one mask is applied.

    Args:
        name: Site name, e.g. ``"lstm/input/i"`` or ``"encoder.layers.0.dropout"``.
        layer: Layer path (Keras) or qualified module name (torch).
        layer_class: Class name of the layer, e.g. ``"SpatialDropout1D"``.
        role: ``output``, ``input``, ``recurrent``, ``between_layers``, ``attention``
            or ``custom``.
        axes: Names of the applied mask's axes, e.g. ``("batch", "time", "feature")``.
        rate: Configured drop rate, or None when unknown.
        gate: Gate of an RNN cell (``"i"``, ``"f"``...) or None.
        noise_shape: Configured noise shape (None entries follow the input), or None.
        scale: Multiplier applied to kept elements, or None when unknown.
        opaque: Why the masks of this site cannot be observed; None for a recorded site.
        extra: JSON-able facts the adapter knows about the site.
    """

    name: str
    layer: str
    layer_class: str
    role: str
    axes: tuple[str, ...]
    rate: float | None
    gate: str | None = None
    noise_shape: tuple[int | None, ...] | None = None
    scale: float | None = None
    opaque: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Invalid site name. Expected a non-empty string. Received: ''")
        if self.role not in ROLES:
            raise ValueError(
                f"Invalid role for site {self.name!r}. Expected one of {ROLES}. "
                f"Received: role={self.role!r}"
            )
        object.__setattr__(self, "axes", tuple(self.axes))
        if self.noise_shape is not None:
            object.__setattr__(self, "noise_shape", tuple(self.noise_shape))
            if len(self.noise_shape) != len(self.axes):
                raise ValueError(
                    f"Site {self.name!r}: noise_shape {self.noise_shape} has rank "
                    f"{len(self.noise_shape)} but axes {self.axes} have rank {len(self.axes)}"
                )

    def to_attrs(self) -> dict[str, Any]:
        """The site as plain HDF5 attributes (strings, numbers, JSON strings)."""
        return {k: _attr_value(v) for k, v in {
            "name": self.name,
            "layer": self.layer,
            "layer_class": self.layer_class,
            "role": self.role,
            "gate": self.gate or "",
            "axes": json.dumps(list(self.axes)),
            "rate": float("nan") if self.rate is None else float(self.rate),
            "noise_shape": json.dumps(None if self.noise_shape is None else list(self.noise_shape)),
            "scale": float("nan") if self.scale is None else float(self.scale),
            "opaque": self.opaque or "",
            "extra": json.dumps(dict(self.extra), sort_keys=True),
        }.items()}


@dataclass(slots=True)
class Record:
    """One mask drawn at one site, during one call, at one training step.

    Give either ``noise`` (bool or 0/1 array, same rank as ``shape``, size-1 dimensions
    broadcast) or ``packed`` (``np.packbits(noise.ravel(), bitorder="big")``) with
    ``noise_shape``; give neither for a call that applied no mask. ``rate`` is the drop
    rate this call was made with (None: the site's configured rate), so one site whose rate
    changes (a schedule, one module used at several rates) is judged call by call.
    """

    site: str
    step: int
    call: int
    training: bool
    shape: tuple[int, ...]
    noise: np.ndarray | None = None
    packed: np.ndarray | None = None
    noise_shape: tuple[int, ...] | None = None
    replica: int = 0
    rate: float | None = None


def _attr_value(value: Any) -> Any:
    """A plain HDF5 attribute value: numbers as numbers, text as fixed-length UTF-8.

    Fixed-length strings live in the attribute message itself; h5py's default variable-length
    strings live in the global heap, which a writer killed mid-flush can leave damaged.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    if isinstance(value, str):
        value = str(value)  # a str subclass (torch.__version__) is not a str to h5py
    else:
        value = json.dumps(value, sort_keys=True, default=str)
    return np.bytes_(value.encode("utf-8")) if value else np.bytes_(b"")


# -- reader -------------------------------------------------------------------------------


def site_matches(pattern: str, name: str, layer: str | None = None) -> bool:
    """The one site-selection rule: a glob matches a site's name or its layer path.

    ``record(sites=)``, ``select_sites``, the CLI and expectations all use this rule.
    """
    return fnmatch.fnmatchcase(name, pattern) or (
        layer is not None and fnmatch.fnmatchcase(layer, pattern))


def select_sites(names: Sequence[str], patterns: str | Sequence[str] | None,
                 layers: Mapping[str, str] | None = None) -> list[str]:
    """Site names matching any of the glob ``patterns`` (all names for None), in run order.

    Args:
        names: Site names, in run order.
        patterns: Glob patterns (see :func:`site_matches`), or None for all sites.
        layers: Layer path of each site name, when known.

    Raises:
        SiteNotFoundError: A pattern matches no site (the message lists the sites).
    """
    from dropspy.errors import SiteNotFoundError

    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    layers = layers or {}
    chosen: set[str] = set()
    for pat in patterns:
        hit = [n for n in names if site_matches(pat, n, layers.get(n))]
        if not hit:
            raise SiteNotFoundError(
                f"no site matches {pat!r}; sites: {', '.join(names) or '(none)'}"
            )
        chosen.update(hit)
    return [n for n in names if n in chosen]


@dataclass(frozen=True)
class IndexBlock:
    """Consecutive records of one site, as the reader streams its index (no mask bits).

    ``start`` is the first record's number; every array has one entry (row) per record.
    """

    start: int
    steps: np.ndarray         # int64
    calls: np.ndarray         # int64
    replicas: np.ndarray      # int64; 0 in files that do not record replicas
    training: np.ndarray      # bool
    applied: np.ndarray       # bool
    offsets: np.ndarray       # int64, byte offset of the packed noise in the site's bits
    shapes: np.ndarray        # (k, rank) int64, applied shapes
    noise_shapes: np.ndarray  # (k, rank) int64, drawn noise shapes
    rates: np.ndarray | None = None  # float64 drop rate per record; NaN/None: the site's

    def __len__(self) -> int:
        return len(self.steps)


class SiteLike(Protocol):
    """What analysis reads of a site: the reader's ``Site`` and ``MemorySite`` both are one."""

    name: str
    axes: tuple[str, ...]
    rate: float | None

    def __len__(self) -> int: ...


class RunLike(Protocol):
    """What analysis reads of a run: a mapping of site names to sites, plus run facts."""

    @property
    def sites(self) -> tuple[str, ...]: ...

    def __getitem__(self, name: str) -> Any: ...

    def __iter__(self) -> Iterable[str]: ...
