"""One streaming pass over a site's records: the raw facts the verdicts are drawn from.

The scan looks at the drawn noise, never at broadcast masks: an axis where the noise has
size 1 is shared by construction, and constancy along any other axis is decided on the noise
itself. Once an axis is seen to vary it is never looked at again, so the common case
(elementwise dropout) costs one count per record after the first.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SiteScan", "scan_site", "fingerprint", "noises_equal"]

# A mask small enough to keep in memory until the next step, so that a suspected repeat is
# verified at once instead of by re-reading the file afterwards.
_KEEP_BYTES = 1 << 20
_SAMPLE = 128


def fingerprint(noise: np.ndarray, kept: int | None = None) -> tuple[Any, ...]:
    """A cheap summary of a mask: equal masks always have equal fingerprints.

    Shape, number of kept elements, and the bits at a few hundred fixed positions (the first,
    the last, and evenly spaced ones). Different fingerprints prove different masks; equal
    fingerprints are verified element for element before anything is called identical.
    """
    flat = noise.reshape(-1)
    if kept is None:
        kept = int(np.count_nonzero(flat))
    return (noise.shape, kept, _samples(flat[None, :])[0])


def noises_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """True when two drawn masks are identical (same shape, same bits)."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(np.array_equal(a, b))


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


@dataclass
class _PairLog:
    """Pairs of records compared for identity (freshness, calls within a step, gates).

    A long run has about one pair per record, so pairs are counted, with the noise shapes
    seen (for the chance of a coincidence), not listed.
    """

    pairs: int = 0
    shapes: set[tuple[int, ...]] = field(default_factory=set)
    identical: array = field(default_factory=lambda: array("q"))   # later record of each repeat
    first_pair: tuple[int, int] | None = None            # first proven repeat (earlier, later)
    deferred: list[tuple[int, int]] = field(default_factory=list)  # verify by re-reading

    def note(self, earlier: int, later: int, fp_a: Any, fp_b: Any,
             a: tuple[np.ndarray, int] | None, b: tuple[np.ndarray, int] | None) -> None:
        """Record a compared pair; ``a``/``b`` are (batch, row) when held in memory."""
        self.pairs += 1
        self.shapes.add(fp_b[0])
        if fp_a != fp_b:
            return
        if a is not None and b is not None:
            if noises_equal(a[0][a[1]], b[0][b[1]]):
                self._repeat(earlier, later)
        else:
            self.deferred.append((earlier, later))

    def _repeat(self, earlier: int, later: int) -> None:
        self.identical.append(later)
        if self.first_pair is None or later < self.first_pair[1]:
            self.first_pair = (earlier, later)

    def verify(self, read: Callable[[int], np.ndarray | None]) -> None:
        for earlier, later in self.deferred:
            if noises_equal(read(earlier), read(later)):
                self._repeat(earlier, later)
        self.deferred.clear()


@dataclass
class SiteScan:
    """Facts gathered from one site's records in one pass.

    Attributes:
        rank: Number of axes.
        used: Number of records the structure statistics come from (training records that
            applied a mask; every applied record when the site has no training ones).
        groups: (applied shape, noise shape) -> number of used records with them.
        varies_at: Per axis, the first used record whose noise varies along it, or -1.
        kept: Kept noise elements over used records.
        elements: Noise elements over used records.
        inference_dropping: Records with training=False that dropped at least one element.
        fresh: Consecutive-step pairs of the same call (freshness).
        calls: Pairs (call c, call 0) within one step.
        digests: Per record, a hash of its fingerprint for gate comparison (only when asked;
            0 for records without one).
        nbytes: Packed bytes of mask data read.
    """

    rank: int
    used: int
    varies_at: list[int]
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = field(default_factory=dict)
    kept: int = 0
    elements: int = 0
    inference_dropping: list[int] = field(default_factory=list)
    fresh: _PairLog = field(default_factory=_PairLog)
    calls: _PairLog = field(default_factory=_PairLog)
    digests: np.ndarray | None = None
    nbytes: int = 0


def scan_site(site: Any, *, want_digests: bool = False, max_bytes: int = 16 << 20,
              progress: Callable[[int], None] | None = None) -> SiteScan:
    """Stream every record of ``site`` once and gather the facts of :class:`SiteScan`.

    Records are processed in batches of equal noise shape, so that small masks (RNN gates,
    a few hundred bytes each) cost a share of a numpy call rather than several each.

    Args:
        site: A :class:`dropspy.store.Site` or anything with its reader API.
        want_digests: Keep a fingerprint hash per used record (for gate comparison).
        max_bytes: Packed bytes per block read from the file.
        progress: Called with the packed bytes of each batch of records as it is consumed.

    Returns:
        The :class:`SiteScan`.
    """
    rank = len(site.axes)
    n = len(site)
    applied = np.asarray(site.applied, dtype=bool)[:n]
    training = np.asarray(site.training, dtype=bool)[:n]
    steps = np.asarray(site.steps)[:n]
    calls = np.asarray(site.calls)[:n]
    use_mask = applied & training if (applied & training).any() else applied
    applied_shapes = np.asarray(site.shapes, dtype=np.int64).reshape(n, rank)
    scan = SiteScan(rank=rank, used=int(use_mask.sum()), varies_at=[-1] * rank)
    if want_digests:
        scan.digests = np.zeros(n, dtype=np.int64)
    if n == 0 or not applied.any():
        return scan
    # Freshness: the last record of each call index, from the latest earlier step.
    last_by_call: dict[int, tuple[int, int, Any, np.ndarray | None]] = {}
    step_now: int | None = None
    pending: dict[int, tuple[int, int, Any, np.ndarray | None]] = {}
    call0: tuple[int, Any, np.ndarray | None] | None = None
    undecided = list(range(rank))
    for idx, batch in _batches(site, max_bytes):
        k = len(idx)
        shape = batch.shape[1:]
        size = math.prod(shape)
        nb = (size + 7) // 8
        scan.nbytes += nb * k
        flat = batch.reshape(k, size)
        kept = _kept(flat)
        dropping = ~training[idx] & (kept < size)
        if dropping.any():
            scan.inference_dropping.extend(idx[dropping].tolist())
        use = use_mask[idx]
        if not use.all():
            idx, batch, flat, kept = idx[use], batch[use], flat[use], kept[use]
            k = len(idx)
        if not k:
            if progress is not None:
                progress(nb * len(use))
            continue
        scan.kept += int(kept.sum())
        scan.elements += size * k
        _count_shapes(scan.groups, applied_shapes[idx], shape)
        for ax in list(undecided):
            if shape[ax] > 1:
                const = _constant_along_batch(batch, ax)
                if not const.all():
                    scan.varies_at[ax] = int(idx[int(np.argmin(const))])
                    undecided.remove(ax)
        samples = _samples(flat)
        # Plain Python values once per batch: this loop runs once per record.
        small = size <= _KEEP_BYTES
        batch_digests = []
        for j, i, step, call, kept_j, sample in zip(range(k), idx.tolist(), steps[idx].tolist(),
                                                    calls[idx].tolist(), kept.tolist(), samples):
            fp = (shape, kept_j, sample)
            keep = (batch, j) if small else None  # a row of the batch, taken only if needed
            if step != step_now:
                # A new step: what the previous step drew becomes "the previous step's mask".
                last_by_call.update(pending)
                pending = {}
                step_now = step
                call0 = None
            prev = last_by_call.get(call)
            if prev is not None and prev[0] != step:
                scan.fresh.note(prev[1], i, prev[2], fp, prev[3], keep)
            pending[call] = (step, i, fp, keep)
            if call == 0:
                call0 = (i, fp, keep)
            elif call0 is not None:
                scan.calls.note(call0[0], i, call0[1], fp, call0[2], keep)
            if scan.digests is not None:
                batch_digests.append(hash(fp) or 1)  # 0 marks "no digest"
        if scan.digests is not None:
            scan.digests[idx] = batch_digests
        if progress is not None:
            progress(nb * len(use))
    return scan


def _count_shapes(groups: dict, applied: np.ndarray, noise_shape: tuple[int, ...]) -> None:
    """Add a batch's (applied shape, noise shape) pairs to ``groups`` (usually one pair)."""
    if (applied == applied[0]).all():
        rows, counts = applied[:1], [len(applied)]
    else:
        rows, counts = np.unique(applied, axis=0, return_counts=True)
    for row, c in zip(rows.tolist(), np.asarray(counts).tolist()):
        key = (tuple(row), noise_shape)
        groups[key] = groups.get(key, 0) + c


# Records at least this big are handled one at a time (as views, never copied into a batch).
_ALONE_BYTES = 1 << 20
_BATCH_BYTES = 8 << 20
_BATCH_RECORDS = 4096


def _batches(site: Any, max_bytes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, noise)``: consecutive applied records of one noise shape, stacked.

    Uses ``site.iter_batches`` when the reader offers it (a store that can unpack a whole
    block of records in one call), else groups what ``site.iter_noise`` yields.
    """
    fast = getattr(site, "iter_batches", None)
    if fast is not None:
        yield from fast(max_bytes=max_bytes)
        return
    idx: list[int] = []
    buf: list[np.ndarray] = []
    shape: tuple[int, ...] | None = None
    held = 0
    for i, noise in _iter(site, max_bytes):
        if noise is None:
            continue
        if noise.nbytes >= _ALONE_BYTES:
            if buf:
                yield np.asarray(idx), np.stack(buf)
                idx, buf, held = [], [], 0
            yield np.asarray([i]), noise[None]
            continue
        if buf and (noise.shape != shape or held + noise.nbytes > _BATCH_BYTES
                    or len(buf) >= _BATCH_RECORDS):
            yield np.asarray(idx), np.stack(buf)
            idx, buf, held = [], [], 0
        shape = noise.shape
        idx.append(i)
        buf.append(noise)
        held += noise.nbytes
    if buf:
        yield np.asarray(idx), np.stack(buf)


def _kept(flat: np.ndarray) -> np.ndarray:
    """Kept elements per row of a (records, elements) bool array."""
    k, size = flat.shape
    if k == 1 or size >= 1 << 16:
        return np.array([np.count_nonzero(row) for row in flat], dtype=np.int64)
    return flat.view(np.uint8).sum(axis=1, dtype=np.int64)


def _samples(flat: np.ndarray) -> list[bytes]:
    """Per row of a (records, elements) bool array, the elements at the fingerprint
    positions (first, evenly spaced, last), as bytes. Basic slices only: fancy indexing or
    bit packing here would cost more than everything else the scan does per record."""
    size = flat.shape[1]
    if size <= 3 * _SAMPLE:
        sample = np.ascontiguousarray(flat)
    else:
        step = size // _SAMPLE
        sample = np.concatenate(
            (flat[:, :_SAMPLE], flat[:, ::step][:, :_SAMPLE], flat[:, -_SAMPLE:]), axis=1)
    width = sample.shape[1]
    raw = sample.tobytes()
    return [raw[j * width:(j + 1) * width] for j in range(sample.shape[0])]


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


def _iter(site: Any, max_bytes: int) -> Iterator[tuple[int, np.ndarray | None]]:
    iter_noise = getattr(site, "iter_noise", None)
    if iter_noise is not None:
        return iter_noise(max_bytes=max_bytes)
    return ((i, site.noise(i)) for i in range(len(site)))
