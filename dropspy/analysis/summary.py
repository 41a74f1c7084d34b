"""The per-file summary: what one streamed pass over a run file leaves, small and mergeable.

A :class:`SiteSummary` holds counts, shape groups, the first record seen to vary along each
axis, pair counts (freshness, calls within a step) and a bounded sample of record digests
keyed by (step, call, replica); nothing in it grows with the number of records beyond that
sample. A :class:`RunSummary` is one file's summaries plus the file's facts (rank, world size,
run id, status). Summaries of the ranks of one run are merged site by site and concluded into
one report (:mod:`dropspy.analysis.runset`); :func:`to_dict`/:func:`from_dict` carry them as
JSON, so a set can be summarised where each file lies (``dropspy inspect --summary``) and
combined elsewhere.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dropspy._version import __version__
from dropspy.errors import ReportError

__all__ = ["PairCount", "Sample", "SiteSummary", "RunSummary", "SUMMARY_FORMAT",
           "SUMMARY_VERSION", "to_dict", "from_dict", "merge_sites", "union_ranges"]

SUMMARY_FORMAT = "dropspy.summary"
SUMMARY_VERSION = 1


@dataclass
class PairCount:
    """Pairs of records compared for identity (freshness, or calls within a step).

    Attributes:
        pairs: Pairs compared.
        identical: Pairs found identical, bit for bit.
        shapes: Noise shapes of the records compared (for the chance of a coincidence).
        first: Steps (earlier, later) of the first identical pair, or None.
    """

    pairs: int = 0
    identical: int = 0
    shapes: set[tuple[int, ...]] = field(default_factory=set)
    first: tuple[int, int] | None = None

    def merge(self, other: PairCount) -> None:
        self.pairs += other.pairs
        self.identical += other.identical
        self.shapes |= other.shapes
        if other.first is not None and (self.first is None or other.first[1] < self.first[1]):
            self.first = other.first


_SAMPLE_FIELDS = ("steps", "calls", "replicas", "d0", "d1", "sizes")


@dataclass
class Sample:
    """Digests of the records at a bounded, deterministic set of (step, call) keys.

    Every file keeps the keys with the smallest hash of (step, call), so files of one run
    (and sibling gate sites) keep the same keys, and their records can be compared at the same
    step and call without the files being in one place. ``d0``/``d1`` are a 128-bit BLAKE2b
    digest of the record's noise shape and packed bits.
    """

    steps: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    calls: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    replicas: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    d0: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    d1: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    sizes: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    shapes: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.int64))
    keys_total: int = 0
    keys_kept: int = 0

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class SiteSummary:
    """One site of one file, summarised (see the module docstring).

    The site's declared facts come first; then what the masks showed.
    """

    name: str
    layer: str
    layer_class: str
    role: str
    gate: str | None
    axes: tuple[str, ...]
    rate: float | None
    noise_shape: tuple[int | None, ...] | None
    scale: float | None
    opaque: str | None
    extra: dict[str, Any]
    records: int = 0
    training_records: int = 0
    applied_records: int = 0
    applied_training: int = 0
    used: int = 0
    step_ranges: list[tuple[int, int]] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = field(default_factory=dict)
    kept: int = 0
    elements: int = 0
    # Drops the per-record rates expect over ``elements`` (None: some record's rate unknown),
    # and the distinct per-record rates seen (a few; one site may be used at several rates).
    expected_dropped: float | None = 0.0
    record_rates: list[float] = field(default_factory=list)
    varies_at: list[int | None] = field(default_factory=list)
    inference_records: int = 0
    inference_first_step: int | None = None
    fresh: PairCount = field(default_factory=PairCount)
    calls: PairCount = field(default_factory=PairCount)
    sample: Sample = field(default_factory=Sample)
    nbytes: int = 0

    @property
    def steps(self) -> int:
        """Distinct steps with at least one record."""
        return sum(b - a + 1 for a, b in self.step_ranges)

    def layout_key(self) -> tuple[Any, ...]:
        """What must agree for two files' records of this site to be one site."""
        return (self.layer, self.layer_class, self.role, self.gate, self.axes)


@dataclass
class RunSummary:
    """One run file summarised: its facts (root attributes, status) and its sites."""

    path: str
    attrs: dict[str, Any]
    complete: bool
    records_written: int
    records_readable: int
    records_dropped: dict[str, int]
    stop_reason: str
    notes: list[str]
    site_order: list[str]
    sites: dict[str, SiteSummary]
    damage: list[str] = field(default_factory=list)

    @property
    def framework(self) -> str:
        return str(self.attrs.get("framework", "unknown"))

    @property
    def rank(self) -> int:
        return _int(self.attrs.get("rank"), 0)

    @property
    def world_size(self) -> int | None:
        w = _int(self.attrs.get("world_size"), 0)
        return w if w > 0 else None


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def union_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive integer ranges merged into sorted, disjoint, non-adjacent ones."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def merge_sites(parts: Sequence[SiteSummary]) -> SiteSummary:
    """One site's summaries from several files (ranks) merged into one (samples excluded).

    Counts add up, step ranges unite, the first record seen to vary along an axis is the
    earliest step of any file. Samples stay per file: they are compared across files, not
    merged (:mod:`dropspy.analysis.runset`).
    """
    first = parts[0]
    out = SiteSummary(
        name=first.name, layer=first.layer, layer_class=first.layer_class, role=first.role,
        gate=first.gate, axes=first.axes, rate=first.rate, noise_shape=first.noise_shape,
        scale=first.scale, opaque=first.opaque or next((p.opaque for p in parts if p.opaque),
                                                        None),
        extra=dict(first.extra), varies_at=[None] * len(first.axes))
    ranges: list[tuple[int, int]] = []
    replicas: set[int] = set()
    for p in parts:
        out.records += p.records
        out.training_records += p.training_records
        out.applied_records += p.applied_records
        out.applied_training += p.applied_training
        out.used += p.used
        ranges.extend(p.step_ranges)
        replicas.update(p.replicas)
        for key, n in p.groups.items():
            out.groups[key] = out.groups.get(key, 0) + n
        out.kept += p.kept
        out.elements += p.elements
        out.expected_dropped = (None if out.expected_dropped is None or p.expected_dropped is None
                                else out.expected_dropped + p.expected_dropped)
        out.record_rates = merge_rates(out.record_rates, p.record_rates)
        for k, v in enumerate(p.varies_at[:len(out.varies_at)]):
            now = out.varies_at[k]
            if v is not None and (now is None or v < now):
                out.varies_at[k] = v
        out.inference_records += p.inference_records
        if p.inference_first_step is not None and (
                out.inference_first_step is None
                or p.inference_first_step < out.inference_first_step):
            out.inference_first_step = p.inference_first_step
        out.fresh.merge(p.fresh)
        out.calls.merge(p.calls)
        out.nbytes += p.nbytes
    out.step_ranges = union_ranges(ranges)
    out.replicas = sorted(replicas)
    return out


# -- JSON ---------------------------------------------------------------------------------


def _arr(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape),
            "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _arr_from(d: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(str(d["dtype"]))
    if dtype.kind not in "iu":
        raise ReportError(f"summary array of dtype {dtype} (expected integers)")
    shape = tuple(int(x) for x in d["shape"])
    raw = base64.b64decode(str(d["data"]), validate=True)
    if len(raw) != dtype.itemsize * math.prod(shape):
        raise ReportError(f"summary array of shape {shape} holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _pairs(p: PairCount) -> dict[str, Any]:
    return {"pairs": p.pairs, "identical": p.identical, "shapes": sorted(list(s) for s in p.shapes),
            "first": None if p.first is None else list(p.first)}


MAX_RECORD_RATES = 16


def merge_rates(a: list[float], b: Any) -> list[float]:
    """Distinct rates of two lists, sorted, at most MAX_RECORD_RATES (the smallest kept)."""
    return sorted(set(a) | {float(x) for x in b})[:MAX_RECORD_RATES]


def _pairs_from(d: Mapping[str, Any]) -> PairCount:
    first = d.get("first")
    return PairCount(int(d["pairs"]), int(d["identical"]),
                     {tuple(int(x) for x in s) for s in d.get("shapes", ())},
                     None if first is None else (int(first[0]), int(first[1])))


def _site(s: SiteSummary) -> dict[str, Any]:
    smp = s.sample
    return {
        "name": s.name, "layer": s.layer, "layer_class": s.layer_class, "role": s.role,
        "gate": s.gate, "axes": list(s.axes), "rate": s.rate,
        "noise_shape": None if s.noise_shape is None else list(s.noise_shape),
        "scale": s.scale, "opaque": s.opaque, "extra": s.extra,
        "records": s.records, "training_records": s.training_records,
        "applied_records": s.applied_records, "applied_training": s.applied_training,
        "used": s.used, "step_ranges": [list(r) for r in s.step_ranges],
        "replicas": list(s.replicas),
        "groups": [[list(a), list(b), n] for (a, b), n in s.groups.items()],
        "kept": s.kept, "elements": s.elements, "varies_at": list(s.varies_at),
        "expected_dropped": s.expected_dropped, "record_rates": list(s.record_rates),
        "inference_records": s.inference_records,
        "inference_first_step": s.inference_first_step,
        "fresh": _pairs(s.fresh), "calls": _pairs(s.calls), "nbytes": s.nbytes,
        "sample": {"keys_total": smp.keys_total, "keys_kept": smp.keys_kept,
                   **{k: _arr(getattr(smp, k)) for k in _SAMPLE_FIELDS + ("shapes",)}},
    }


def _site_from(d: Mapping[str, Any]) -> SiteSummary:
    smp = d["sample"]
    ns = d.get("noise_shape")
    return SiteSummary(
        name=str(d["name"]), layer=str(d["layer"]), layer_class=str(d["layer_class"]),
        role=str(d["role"]), gate=d.get("gate"), axes=tuple(str(a) for a in d["axes"]),
        rate=d.get("rate"), noise_shape=None if ns is None else tuple(ns),
        scale=d.get("scale"), opaque=d.get("opaque"), extra=dict(d.get("extra") or {}),
        records=int(d["records"]), training_records=int(d["training_records"]),
        applied_records=int(d["applied_records"]), applied_training=int(d["applied_training"]),
        used=int(d["used"]), step_ranges=[(int(a), int(b)) for a, b in d["step_ranges"]],
        replicas=[int(r) for r in d["replicas"]],
        groups={(tuple(int(x) for x in a), tuple(int(x) for x in b)): int(n)
                for a, b, n in d["groups"]},
        kept=int(d["kept"]), elements=int(d["elements"]),
        expected_dropped=(None if d.get("expected_dropped", 0.0) is None
                          else float(d.get("expected_dropped", 0.0))),
        record_rates=[float(r) for r in d.get("record_rates", ())],
        varies_at=[None if v is None else int(v) for v in d["varies_at"]],
        inference_records=int(d["inference_records"]),
        inference_first_step=d.get("inference_first_step"),
        fresh=_pairs_from(d["fresh"]), calls=_pairs_from(d["calls"]), nbytes=int(d["nbytes"]),
        sample=Sample(**{k: _arr_from(smp[k]) for k in _SAMPLE_FIELDS + ("shapes",)},
                      keys_total=int(smp["keys_total"]), keys_kept=int(smp["keys_kept"])),
    )


def to_dict(summary: RunSummary) -> dict[str, Any]:
    """The summary as JSON-able data (what ``dropspy inspect --summary`` prints)."""
    return {
        "format": SUMMARY_FORMAT, "format_version": SUMMARY_VERSION,
        "dropspy_version": __version__, "path": summary.path,
        "attrs": json.loads(json.dumps(summary.attrs, default=str)),
        "complete": summary.complete, "records_written": summary.records_written,
        "records_readable": summary.records_readable,
        "records_dropped": dict(summary.records_dropped), "stop_reason": summary.stop_reason,
        "notes": list(summary.notes), "site_order": list(summary.site_order),
        "damage": list(summary.damage),
        "sites": [_site(summary.sites[n]) for n in summary.site_order if n in summary.sites],
    }


def from_dict(data: Mapping[str, Any]) -> RunSummary:
    """Rebuild a :class:`RunSummary` from :func:`to_dict` output.

    Raises:
        ReportError: ``data`` is not a dropspy summary of a known version, or is malformed.
    """
    if not isinstance(data, Mapping) or data.get("format") != SUMMARY_FORMAT:
        got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise ReportError(f"not a dropspy summary: 'format' is {got!r}, expected "
                          f"{SUMMARY_FORMAT!r}")
    if data.get("format_version") != SUMMARY_VERSION:
        raise ReportError(f"unsupported summary format_version {data.get('format_version')!r};"
                          f" this dropspy reads version {SUMMARY_VERSION}")
    try:
        sites = [_site_from(s) for s in data["sites"]]
        return RunSummary(
            path=str(data["path"]), attrs=dict(data.get("attrs") or {}),
            complete=bool(data["complete"]), records_written=int(data["records_written"]),
            records_readable=int(data["records_readable"]),
            records_dropped={str(k): int(v) for k, v in dict(data["records_dropped"]).items()},
            stop_reason=str(data.get("stop_reason") or ""),
            notes=[str(n) for n in data.get("notes", ())],
            site_order=[str(n) for n in data["site_order"]], sites={s.name: s for s in sites},
            damage=[str(d) for d in data.get("damage", ())])
    except ReportError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"malformed dropspy summary: {type(exc).__name__}: {exc}") from exc
