"""Records of one site compared across copies: ranks of a run set, replicas in a process.

Data parallel training runs one copy of the model per rank (and per replica inside a process,
as with ``tf.distribute.MirroredStrategy``); each copy should draw its own masks. Records of
the same site at the same step and call are compared across copies on the digests the
per-file summaries keep (:class:`~dropspy.analysis.summary.Sample`): the same keys in every
file, so files need not be in one place. The first copy at a key (lowest rank, then replica)
is the reference; every other copy's record there is one pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dropspy.analysis._stats import log10_repeat_tail
from dropspy.analysis.results import PairCheck
from dropspy.analysis.summary import Sample

__all__ = ["Copies", "compare_copies", "compare_gates"]


@dataclass
class Copies:
    """Pairs of records of one site compared across ranks/replicas.

    Attributes:
        pairs: Records compared with the reference copy's record at the same step and call.
        identical: Of those, records identical to it (equal 128-bit digests).
        shapes: Noise shapes compared (for the chance of a coincidence).
        by_copy: ``"rank 1"`` (or ``"rank 0 replica 1"``) -> (identical, pairs).
        kind: ``ranks``, ``replicas`` or ``ranks and replicas``.
        keys: Distinct (step, call) keys compared; ``sampled`` when the summaries kept only
            a sample of the site's keys.
    """

    pairs: int = 0
    identical: int = 0
    shapes: set[tuple[int, ...]] = field(default_factory=set)
    by_copy: dict[str, tuple[int, int]] = field(default_factory=dict)
    kind: str = "ranks"
    keys: int = 0
    sampled: bool = False

    def check(self, independent_elements: Callable[[np.ndarray], np.ndarray], log_w: float,
              threshold: float) -> PairCheck:
        """The verdict, as the other identity checks draw it (see :mod:`.site`)."""
        source = (f"each {self.kind[:-1] if self.kind != 'ranks and replicas' else 'copy'}'s "
                  f"record vs the first {self.kind.split()[0][:-1]}'s at the same step and call, "
                  f"{self.keys} keys" + (" (a sample)" if self.sampled else ""))
        if self.pairs == 0:
            return PairCheck("inconclusive", 0, 0, None, source + "; no common records")
        if self.identical == 0:
            return PairCheck("independent", self.pairs, 0, 0.0, source)
        smallest = int(independent_elements(
            np.array(sorted(self.shapes), dtype=np.int64)).min())
        tail = log10_repeat_tail(self.pairs, self.identical, smallest * log_w)
        if tail < math.log10(threshold):
            word = "identical" if self.identical == self.pairs else "partial"
            return PairCheck(word, self.pairs, self.identical, tail, source)
        return PairCheck("inconclusive", self.pairs, self.identical, tail, source)


def _label(rank: int, replica: int, with_rank: bool, with_replica: bool) -> str:
    parts = ([f"rank {rank}"] if with_rank else []) + (
        [f"replica {replica}"] if with_replica else [])
    return " ".join(parts)


def compare_copies(samples: Sequence[tuple[int, Sample]]) -> Copies | None:
    """Compare one site's sampled records across ranks (``(rank, sample)`` per file) and
    replicas; None when only one rank and replica has records."""
    parts = [(r, s) for r, s in samples if len(s)]
    if not parts:
        return None
    rank = np.concatenate([np.full(len(s), r, np.int64) for r, s in parts])
    rep = np.concatenate([s.replicas for _, s in parts])
    if len(np.unique(rank)) < 2 and len(np.unique(rep)) < 2:
        return None
    step = np.concatenate([s.steps for _, s in parts])
    call = np.concatenate([s.calls for _, s in parts])
    d0 = np.concatenate([s.d0 for _, s in parts])
    d1 = np.concatenate([s.d1 for _, s in parts])
    shapes = np.concatenate([s.shapes for _, s in parts])
    order = np.lexsort((rep, rank, call, step))
    step, call, rank, rep = step[order], call[order], rank[order], rep[order]
    d0, d1, shapes = d0[order], d1[order], shapes[order]
    start = np.ones(len(order), bool)
    start[1:] = (step[1:] != step[:-1]) | (call[1:] != call[:-1])
    ref = np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))
    other = ~start
    same = other & (d0 == d0[ref]) & (d1 == d1[ref])
    many_ranks = len(np.unique(rank)) > 1
    many_reps = len(np.unique(rep)) > 1
    kind = ("ranks and replicas" if many_ranks and many_reps
            else "ranks" if many_ranks else "replicas")
    out = Copies(kind=kind, keys=int(start.sum()),
                 sampled=any(s.keys_kept < s.keys_total for _, s in parts))
    out.pairs = int(other.sum())
    out.identical = int(same.sum())
    out.shapes = {tuple(int(x) for x in row) for row in np.unique(shapes[other], axis=0)}
    for r, p in sorted({(int(a), int(b)) for a, b in zip(rank[other], rep[other])}):
        sel = other & (rank == r) & (rep == p)
        out.by_copy[_label(r, p, many_ranks, many_reps)] = (int(same[sel].sum()),
                                                             int(sel.sum()))
    return out


def compare_gates(samples: Sequence[Sample]) -> tuple[int, int, int | None]:
    """Each gate's sampled records vs the first gate's at the same step, call and replica.

    Returns:
        ``(pairs, identical, smallest noise size compared)``.
    """
    ref = samples[0]
    keys = {(int(a), int(b), int(c)): (int(x), int(y))
            for a, b, c, x, y in zip(ref.steps, ref.calls, ref.replicas, ref.d0, ref.d1)}
    pairs = identical = 0
    smallest: int | None = None
    for other in samples[1:]:
        for a, b, c, x, y, size in zip(other.steps, other.calls, other.replicas, other.d0,
                                       other.d1, other.sizes):
            d = keys.get((int(a), int(b), int(c)))
            if d is None:
                continue
            pairs += 1
            identical += d == (int(x), int(y))
            smallest = int(size) if smallest is None else min(smallest, int(size))
    return pairs, identical, smallest
