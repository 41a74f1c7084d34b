"""One streaming pass over a site's records: the mergeable summary the verdicts come from.

The scan reads the index and the packed bits in blocks (:meth:`dropspy.store.Site.index_blocks`,
``read_bits``) and works on whole blocks with numpy: kept elements are counted on the packed
bytes, records are compared for identity on their packed bytes, and masks are unpacked only
while an axis is still undecided and cannot be decided on the packed bytes. Nothing it keeps
grows with the number of records except a bounded sample of digests
(:class:`~dropspy.analysis.summary.Sample`), so memory is bounded by the block size.

An axis where the noise has size 1 is shared by construction; constancy along any other axis
is decided on the noise itself, and once an axis is seen to vary it is never looked at again.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dropspy.analysis.summary import PairCount, Sample, SiteSummary, merge_rates, union_ranges
from dropspy.records import IndexBlock

__all__ = ["scan_site", "SAMPLE_KEYS", "SAMPLE_BYTES"]

#: Most (step, call) keys whose record digests a site's summary keeps, and the packed bytes
#: they may cover: enough for a verdict at any threshold, small enough to ship as JSON.
SAMPLE_KEYS = 8192
SAMPLE_BYTES = 16 << 20
# A record at most this big is kept in memory as the "previous step's mask" of its call, so a
# suspected repeat is verified at once instead of by re-reading the file.
_KEEP_BYTES = 1 << 20
# Packed bytes unpacked at once when an axis must be decided on unpacked bools (8x in memory).
_UNPACK_BYTES = 2 << 20
# Index rows per block; they also bound the records worked on at once. 65536 rows of 256-byte
# records held ~50 MiB of per-record temporaries (peak RSS 166 MiB on bench_inspect's small
# layout); 16384 rows: 113 MiB, the same CPU time.
_INDEX_ROWS = 1 << 14
_MASK64 = (1 << 64) - 1

_FP_MULT = np.random.default_rng(0x5EED).integers(1, 2**63, size=8, dtype=np.uint64) | 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64 (wraps modulo 2**64)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def key_hash(steps: np.ndarray, calls: np.ndarray) -> np.ndarray:
    """A fixed hash of (step, call): the same in every process, on every machine."""
    with np.errstate(over="ignore"):
        s = steps.astype(np.int64).view(np.uint64)
        c = calls.astype(np.int64).view(np.uint64)
        return _mix(_mix(s) ^ (c * np.uint64(0x9E3779B97F4A7C15)))


def _popcount(rows: np.ndarray, size: int) -> np.ndarray:
    """Set bits per row of packed bytes, ignoring the padding bits of the last byte."""
    k, w = rows.shape
    if w == 0:
        return np.zeros(k, np.int64)
    if size % 64 == 0 and rows.flags.c_contiguous:
        # Whole 64-bit words: an eighth of the elements to count and add.
        return np.bitwise_count(rows.view(np.uint64)).sum(axis=1, dtype=np.int64)
    counts = np.bitwise_count(rows[:, :w - 1]).sum(axis=1, dtype=np.int64)
    tail = size - 8 * (w - 1)
    last = rows[:, w - 1] & np.uint8((0xFF << (8 - tail)) & 0xFF)
    return counts + np.bitwise_count(last).astype(np.int64)


def _fingerprints(rows: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """A cheap uint64 per row: equal rows always have equal fingerprints (a filter only).

    The kept count and 24 bytes (the first, middle and last 8): independent masks differ
    there almost always; rows that agree there are compared in full.
    """
    k, w = rows.shape
    if w > 24:
        mid = (w - 8) // 2
        rows = np.concatenate([rows[:, :8], rows[:, mid:mid + 8], rows[:, w - 8:]], axis=1)
        w = 24
    pad = (-w) % 8
    if pad:
        rows = np.concatenate([rows, np.zeros((k, pad), np.uint8)], axis=1)
    words = np.ascontiguousarray(rows).view(np.uint64)
    with np.errstate(over="ignore"):
        h = kept.astype(np.uint64)
        for j in range(words.shape[1]):
            h = h * _FP_MULT[j % len(_FP_MULT)] + words[:, j]
        return _mix(h)


def _digests(shape: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """Per row, a 128-bit BLAKE2b of the noise shape and the packed bits: ``(k, 2)`` uint64."""
    head = hashlib.blake2b(np.asarray(shape, dtype="<i8").tobytes(), digest_size=16)
    out = []
    for row in rows:
        h = head.copy()
        h.update(row)
        out.append(h.digest())
    return np.frombuffer(b"".join(out), dtype="<u8").reshape(len(rows), 2).astype(np.uint64)


@dataclass
class _Prev:
    """A record remembered across blocks: its step, fingerprint, and bits or where they are."""

    step: int
    fp: int
    row: np.ndarray | None
    offset: int
    width: int
    shape: tuple[int, ...]


class _Pairs:
    """What pairing carries from one stretch of records to the next.

    Records come in segments of one step. Freshness pairs each record with the last record
    of the same (call, replica) in the latest earlier segment that has one; calls within a
    step pair each record of call > 0 with the latest call-0 record of its replica in the
    same segment.
    """

    def __init__(self) -> None:
        self.seg_step: int | None = None
        self.last: dict[int, _Prev] = {}      # key -> last record of the latest closed segment
        self.pending: dict[int, _Prev] = {}   # key -> last record of the open segment
        self.call0: dict[int, _Prev] = {}     # replica -> latest call-0 record, open segment


def _note(log: PairCount, pairs: int, hits: list[tuple[int, int, int]],
          shape: tuple[int, ...]) -> None:
    """Add ``pairs`` compared pairs and the identical ones, ``(later position, earlier step,
    later step)``, to ``log``."""
    if not pairs:
        return
    log.pairs += pairs
    log.identical += len(hits)
    log.shapes.add(shape)
    if hits and log.first is None:
        _, a, b = min(hits)
        log.first = (a, b)


class _Unit:
    """Consecutive used records of one noise shape, with their packed rows."""

    def __init__(self, steps: np.ndarray, calls: np.ndarray, replicas: np.ndarray,
                 offsets: np.ndarray, rows: np.ndarray, kept: np.ndarray,
                 shape: tuple[int, ...]) -> None:
        self.steps, self.calls, self.replicas = steps, calls, replicas
        self.offsets, self.rows, self.shape = offsets, rows, shape
        self.width = rows.shape[1]
        self.fps = _fingerprints(rows, kept)
        self.keys = calls * (1 << 20) + replicas

    def prev(self, j: int) -> _Prev:
        keep = self.width <= _KEEP_BYTES
        return _Prev(int(self.steps[j]), int(self.fps[j]),
                     self.rows[j].copy() if keep else None, int(self.offsets[j]), self.width,
                     self.shape)

    def same(self, p: _Prev, j: int, read: Callable[[int, int], np.ndarray]) -> bool:
        """Whether record ``j`` equals the remembered record ``p``, bit for bit."""
        if p.shape != self.shape or p.fp != int(self.fps[j]):
            return False
        data = p.row if p.row is not None else read(p.offset, p.offset + p.width)
        return bool(np.array_equal(data, self.rows[j]))

    def equal(self, later: np.ndarray, earlier: np.ndarray) -> np.ndarray:
        """Per pair of positions, whether the two rows are identical (fingerprints first)."""
        out = np.zeros(len(later), bool)
        cand = np.flatnonzero(self.fps[later] == self.fps[earlier])
        for c in range(0, len(cand), 256):
            part = cand[c:c + 256]
            out[part] = (self.rows[later[part]] == self.rows[earlier[part]]).all(axis=1)
        return out


def _segments(st: _Pairs, steps: np.ndarray) -> np.ndarray:
    """Segment number of each record; 0 continues the segment open before this unit."""
    newseg = np.empty(len(steps), bool)
    newseg[0] = st.seg_step is None or int(steps[0]) != st.seg_step
    newseg[1:] = steps[1:] != steps[:-1]
    if newseg[0]:
        st.last.update(st.pending)
        st.pending = {}
        st.call0 = {}
    return np.cumsum(newseg)


def _groups(keys: np.ndarray, segid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Records sorted by key (then position): order, group starts, run starts (key, segment)."""
    m = len(keys)
    pos = np.arange(m)
    order = np.lexsort((pos, keys))
    sk, sseg = keys[order], segid[order]
    gflag = np.ones(m, bool)
    gflag[1:] = sk[1:] != sk[:-1]
    rflag = gflag.copy()
    rflag[1:] |= sseg[1:] != sseg[:-1]
    gstart = np.maximum.accumulate(np.where(gflag, pos, 0))
    rstart = np.maximum.accumulate(np.where(rflag, pos, 0))
    return order, gflag, gstart, rstart


def _freshness(st: _Pairs, log: PairCount, u: _Unit, segid: np.ndarray,
               read: Callable[[int, int], np.ndarray]) -> None:
    steps = u.steps
    order, gflag, gstart, rstart = _groups(u.keys, segid)
    q = rstart - 1
    inb = q >= gstart
    later, earlier = order[inb], order[q[inb]]
    ok = steps[later] != steps[earlier]
    later, earlier = later[ok], earlier[ok]
    same = u.equal(later, earlier)
    hits = [(int(a), int(steps[b]), int(steps[a])) for a, b in zip(later[same], earlier[same])]
    pairs = len(later)
    for p in np.flatnonzero(~inb).tolist():
        j = int(order[p])
        key = int(u.keys[j])
        prev = st.last.get(key) if segid[j] == 0 else (st.pending.get(key) or st.last.get(key))
        if prev is None or prev.step == int(steps[j]):
            continue
        pairs += 1
        if u.same(prev, j, read):
            hits.append((j, prev.step, int(steps[j])))
    _note(log, pairs, hits, u.shape)
    final = int(segid[-1])
    if final > 0:
        st.last.update(st.pending)
        st.pending = {}
    for p in np.flatnonzero(np.r_[gflag[1:], True]).tolist():
        j = int(order[p])
        key = int(u.keys[j])
        if segid[j] == final:
            st.pending[key] = u.prev(j)
            r = int(rstart[p]) - 1
            if r >= int(gstart[p]):
                st.last[key] = u.prev(int(order[r]))
        else:
            st.last[key] = u.prev(j)
            st.pending.pop(key, None)


def _within_step(st: _Pairs, log: PairCount, u: _Unit, segid: np.ndarray,
                 read: Callable[[int, int], np.ndarray]) -> None:
    m = len(u.steps)
    order, gflag, gstart, _ = _groups(u.replicas, np.zeros(m, np.int64))
    is0 = u.calls[order] == 0
    pos = np.arange(m)
    last0 = np.maximum.accumulate(np.where(is0, pos, -1))
    sseg = segid[order]
    valid = ~is0 & (last0 >= gstart)
    valid[valid] = sseg[last0[valid]] == sseg[valid]
    later, earlier = order[valid], order[last0[valid]]
    same = u.equal(later, earlier)
    steps = u.steps
    hits = [(int(a), int(steps[b]), int(steps[a])) for a, b in zip(later[same], earlier[same])]
    pairs = len(later)
    for p in np.flatnonzero(~is0 & ~valid & (sseg == 0)).tolist():
        j = int(order[p])
        prev = st.call0.get(int(u.replicas[j]))
        if prev is None:
            continue
        pairs += 1
        if u.same(prev, j, read):
            hits.append((j, prev.step, int(steps[j])))
    _note(log, pairs, hits, u.shape)
    final = int(segid[-1])
    if final > 0:
        st.call0 = {}
    for p in np.flatnonzero(is0 & (sseg == final)).tolist():
        j = int(order[p])
        st.call0[int(u.replicas[j])] = u.prev(j)   # sorted by position: the latest wins
    st.seg_step = int(steps[-1])


def _constant_packed(rows: np.ndarray, shape: tuple[int, ...], ax: int) -> np.ndarray | None:
    """Per row, constancy along ``ax`` decided on packed bytes (None when not byte-aligned)."""
    post = math.prod(shape[ax + 1:])
    if post % 8:
        return None
    k = rows.shape[0]
    a = rows.reshape(k, math.prod(shape[:ax]), shape[ax], post // 8)
    if (post // 8) % 8 == 0:
        a = a.view(np.uint64)
    return np.all(a[:, :, 1:, :] == a[:, :, :1, :], axis=(1, 2, 3))


def _constant(rows: np.ndarray, shape: tuple[int, ...], ax: int) -> np.ndarray:
    """Per row, whether the noise is constant along ``ax``; the first few rows are looked at
    first, since most axes vary in the first record and need no more."""
    head = _constant_rows(rows[:8], shape, ax)
    if len(rows) <= 8 or not head.all():
        return head
    return np.r_[head, _constant_rows(rows[8:], shape, ax)]


def _constant_rows(rows: np.ndarray, shape: tuple[int, ...], ax: int) -> np.ndarray:
    packed = _constant_packed(rows, shape, ax)
    if packed is not None:
        return packed
    size = math.prod(shape)
    per = max(1, _UNPACK_BYTES * 8 // max(size, 1))
    out = np.empty(len(rows), bool)
    for c in range(0, len(rows), per):
        part = rows[c:c + per]
        flat = np.unpackbits(part, axis=1, count=size).view(np.bool_)
        out[c:c + per] = _constant_along_batch(flat.reshape((len(part), *shape)), ax)
    return out


def _ranges(steps: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique steps as inclusive ranges."""
    if not len(steps):
        return []
    d = np.diff(steps)
    # Steps come in order in every run file: no sort needed then.
    u = steps[np.r_[True, d != 0]] if (d >= 0).all() else np.unique(steps)
    brk = np.flatnonzero(np.diff(u) != 1)
    starts = np.r_[0, brk + 1]
    ends = np.r_[brk, len(u) - 1]
    return [(int(u[a]), int(u[b])) for a, b in zip(starts, ends)]


def _smallest(best: np.ndarray, hashes: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` smallest distinct values of ``best`` (sorted, distinct) and ``hashes``."""
    if len(best) >= k:
        hashes = hashes[hashes < best[-1]]
    if len(hashes) > k:
        hashes = np.partition(hashes, k - 1)[:k]
    if not len(hashes):
        return best
    return np.unique(np.concatenate([best, hashes]))[:k]


def _blocks(site: Any) -> Callable[[], Iterator[IndexBlock]]:
    index_blocks = getattr(site, "index_blocks", None)
    if index_blocks is not None:
        return lambda: index_blocks(_INDEX_ROWS)
    from dropspy.analysis.memory import MemorySite

    mem = MemorySite.from_site(site)
    return lambda: mem.index_blocks(_INDEX_ROWS)


def _reader(site: Any) -> Callable[[int, int], np.ndarray]:
    read = getattr(site, "read_bits", None)
    if read is not None:
        return read  # type: ignore[no-any-return]
    from dropspy.analysis.memory import MemorySite

    return MemorySite.from_site(site).read_bits


def _units(blk: IndexBlock, max_bytes: int) -> Iterator[tuple[np.ndarray, tuple[int, ...]]]:
    """Positions (in ``blk``) of consecutive applied records of one noise shape whose packed
    bits lie back to back, at most ``max_bytes`` of them (one record, however big, at least)."""
    ap = np.flatnonzero(blk.applied)
    if not len(ap):
        return
    ns = blk.noise_shapes[ap]
    width = (np.prod(ns, axis=1) + 7) // 8
    off = blk.offsets[ap]
    brk = np.ones(len(ap), bool)
    brk[1:] = (ns[1:] != ns[:-1]).any(axis=1) | (off[1:] != off[:-1] + width[:-1])
    firsts = np.flatnonzero(brk).tolist()
    for a, b in zip(firsts, firsts[1:] + [len(ap)]):
        per = max(1, max_bytes // max(int(width[a]), 1))
        shape = tuple(int(x) for x in ns[a])
        for c in range(a, b, per):
            yield ap[c:min(b, c + per)], shape


def scan_site(site: Any, *, max_bytes: int = 16 << 20,
              progress: Callable[[int], None] | None = None,
              sample_keys: int = SAMPLE_KEYS, sample_bytes: int = SAMPLE_BYTES) -> SiteSummary:
    """Stream every record of ``site`` once (index twice) into a :class:`SiteSummary`.

    Args:
        site: A :class:`dropspy.store.Site`, a :class:`~dropspy.analysis.MemorySite`, or
            anything with the reader API.
        max_bytes: Packed bytes read at once.
        progress: Called with the packed bytes of each stretch of records consumed.
        sample_keys: Most (step, call) keys kept in the digest sample.
        sample_bytes: Most packed bytes the sampled records may cover.

    Returns:
        The site's :class:`SiteSummary`.
    """
    rank = len(site.axes)
    rate = getattr(site, "rate", None)
    summary = SiteSummary(
        name=site.name, layer=getattr(site, "layer", site.name),
        layer_class=getattr(site, "layer_class", ""), role=getattr(site, "role", "output"),
        gate=getattr(site, "gate", None), axes=tuple(site.axes),
        rate=None if rate is None else float(rate),
        noise_shape=_noise_shape(getattr(site, "noise_shape", None)),
        scale=_finite(getattr(site, "scale", None)), opaque=getattr(site, "opaque", None),
        extra=dict(getattr(site, "extra", None) or {}), varies_at=[None] * rank)
    blocks = _blocks(site)
    read = _reader(site)
    best_t = best_a = np.empty(0, np.uint64)
    widest = 0
    ranges: list[tuple[int, int]] = []
    replicas: set[int] = set()
    for blk in blocks():
        at = blk.applied & blk.training
        summary.records += len(blk)
        summary.training_records += int(blk.training.sum())
        summary.applied_records += int(blk.applied.sum())
        summary.applied_training += int(at.sum())
        ranges = union_ranges(ranges + _ranges(blk.steps))
        replicas.update(int(r) for r in np.unique(blk.replicas))
        if blk.applied.any():
            a = blk.applied
            best_a = _smallest(best_a, key_hash(blk.steps[a], blk.calls[a]), sample_keys)
            if at.any():
                best_t = _smallest(best_t, key_hash(blk.steps[at], blk.calls[at]), sample_keys)
            widest = max(widest, int(((np.prod(blk.noise_shapes[a], axis=1) + 7) // 8).max()))
    summary.step_ranges = ranges
    summary.replicas = sorted(replicas)
    use_training = summary.applied_training > 0
    summary.used = summary.applied_training if use_training else summary.applied_records
    best = best_t if use_training else best_a
    keep = min(sample_keys, max(16, sample_bytes // max(widest, 1)))
    threshold = np.uint64(best[keep - 1]) if len(best) >= keep else np.uint64(_MASK64)

    st = _Pairs()
    undecided = list(range(rank))
    smp: dict[str, list[Any]] = {k: [] for k in ("steps", "calls", "replicas", "d0", "d1",
                                                   "sizes", "shapes")}
    for blk in blocks():
        for idx, shape in _units(blk, max_bytes):
            size = math.prod(shape)
            width = (size + 7) // 8
            k = len(idx)
            begin = int(blk.offsets[idx[0]])
            raw = read(begin, begin + width * k)
            if len(raw) != width * k:
                from dropspy.errors import RunFileError

                raise RunFileError(f"site {summary.name!r}: the bits of records "
                                   f"{blk.start + int(idx[0])}.. are cut short")
            rows = np.asarray(raw, dtype=np.uint8).reshape(k, width)
            kept = _popcount(rows, size)
            summary.nbytes += width * k
            training = blk.training[idx]
            dropping = ~training & (kept < size)
            if dropping.any():
                summary.inference_records += int(dropping.sum())
                first = int(blk.steps[idx][dropping][0])
                if summary.inference_first_step is None:
                    summary.inference_first_step = first
            if use_training and not training.all():
                rows, kept, idx = rows[training], kept[training], idx[training]
            if len(idx):
                _consume(summary, st, undecided, blk, idx, rows, kept, shape, read, threshold,
                         smp)
            if progress is not None:
                progress(width * k)
    def cat(key: str, dtype: Any) -> np.ndarray:
        parts = smp[key]
        return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)

    summary.sample = Sample(
        steps=cat("steps", np.int64), calls=cat("calls", np.int64),
        replicas=cat("replicas", np.int64), d0=cat("d0", np.uint64), d1=cat("d1", np.uint64),
        sizes=cat("sizes", np.int64),
        shapes=(np.concatenate(smp["shapes"]) if smp["shapes"]
                else np.empty((0, rank), np.int64)),
        keys_total=summary.used, keys_kept=sum(len(p) for p in smp["steps"]))
    return summary


def _count_rates(summary: SiteSummary, blk: IndexBlock, idx: np.ndarray, size: int) -> None:
    """Drops the records' own rates expect (one site may be used at several rates)."""
    site = np.nan if summary.rate is None else summary.rate
    rates = np.full(len(idx), site) if blk.rates is None else blk.rates[idx]
    rates = np.where(np.isnan(rates), site, rates)
    if summary.expected_dropped is not None:
        summary.expected_dropped = (None if np.isnan(rates).any()
                                    else summary.expected_dropped + float(rates.sum()) * size)
    known = rates[~np.isnan(rates)]
    if len(known):
        # float32 in the file: rounded back to what the user configured.
        seen = {clean_rate(float(r)) for r in np.unique(known)}
        summary.record_rates = merge_rates(summary.record_rates, seen)


def clean_rate(rate: float) -> float:
    """A rate read from float32 as the float64 the user wrote (0.1, not 0.10000000149)."""
    return float(f"{float(np.float32(rate)):.7g}")


def _consume(summary: SiteSummary, st: _Pairs, undecided: list[int], blk: IndexBlock,
             idx: np.ndarray, rows: np.ndarray, kept: np.ndarray, shape: tuple[int, ...],
             read: Callable[[int, int], np.ndarray], threshold: np.uint64,
             smp: dict[str, list[Any]]) -> None:
    """Fold one unit of used records into the summary."""
    size = math.prod(shape)
    steps = blk.steps[idx]
    summary.kept += int(kept.sum())
    summary.elements += size * len(idx)
    _count_rates(summary, blk, idx, size)
    applied = blk.shapes[idx]
    if (applied == applied[0]).all():
        rows_u, counts = applied[:1], np.array([len(applied)])
    else:
        rows_u, counts = np.unique(applied, axis=0, return_counts=True)
    for row, c in zip(rows_u.tolist(), counts.tolist()):
        key = (tuple(row), shape)
        summary.groups[key] = summary.groups.get(key, 0) + int(c)
    for ax in list(undecided):
        if shape[ax] > 1:
            const = _constant(rows, shape, ax)
            if not const.all():
                summary.varies_at[ax] = int(steps[int(np.argmin(const))])
                undecided.remove(ax)
    u = _Unit(steps, blk.calls[idx], blk.replicas[idx], blk.offsets[idx], rows, kept, shape)
    segid = _segments(st, steps)
    _freshness(st, summary.fresh, u, segid, read)
    _within_step(st, summary.calls, u, segid, read)
    pick = np.flatnonzero(key_hash(steps, u.calls) <= threshold)
    if len(pick):
        d = _digests(shape, np.ascontiguousarray(rows[pick]))
        smp["steps"].append(steps[pick])
        smp["calls"].append(u.calls[pick])
        smp["replicas"].append(u.replicas[pick])
        smp["d0"].append(d[:, 0])
        smp["d1"].append(d[:, 1])
        smp["sizes"].append(np.full(len(pick), size, np.int64))
        smp["shapes"].append(np.tile(np.asarray(shape, np.int64), (len(pick), 1)))


def _noise_shape(ns: Any) -> tuple[int | None, ...] | None:
    return None if ns is None else tuple(None if d is None else int(d) for d in ns)


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _constant_along(noise: np.ndarray, k: int) -> bool:
    """True when ``noise`` is constant along axis ``k`` at every index of the other axes."""
    shape = noise.shape
    n = shape[k]
    pre = math.prod(shape[:k])
    post = math.prod(shape[k + 1:])
    a = np.ascontiguousarray(noise).reshape(pre, n, post)
    if post == 1:
        counts = np.count_nonzero(a.reshape(pre, n), axis=1)
        return bool(np.all((counts == 0) | (counts == n)))
    # Compare each slice with the first; whole-word compares when the rows allow it.
    if post % 8 == 0:
        a = a.view(np.uint64)
    first = a[:, :1, :]
    for j in range(1, n, 64):
        if not np.array_equal(a[:, j:j + 64, :], np.broadcast_to(first, a[:, j:j + 64, :].shape)):
            return False
    return True


def _constant_along_batch(batch: np.ndarray, ax: int) -> np.ndarray:
    """Per record of ``batch`` (records first), whether it is constant along noise axis ``ax``."""
    k = batch.shape[0]
    if k == 1:
        return np.array([_constant_along(batch[0], ax)])
    shape = batch.shape[1:]
    n = shape[ax]
    pre = math.prod(shape[:ax])
    post = math.prod(shape[ax + 1:])
    a = np.ascontiguousarray(batch).reshape(k, pre, n, post)
    if post == 1:
        counts = a.reshape(k, pre, n).view(np.uint8).sum(axis=2, dtype=np.int64)
        return np.all((counts == 0) | (counts == n), axis=1)
    if post % 8 == 0:
        a = a.view(np.uint64)
    return np.all(a[:, :, 1:, :] == a[:, :, :1, :], axis=(1, 2, 3))


