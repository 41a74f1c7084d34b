"""The few probability facts the analysis rests on, in log space (pure numpy/math).

Every chance here is an upper bound on how often *independent* Bernoulli masks would produce
what was observed, so a verdict drawn from "chance below the threshold" errs towards
``inconclusive``, never towards a structure that is not there.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

__all__ = [
    "wilson_interval",
    "log10_constant_fibers",
    "log10_repeat_tail",
    "worst_keep_probability",
]

_LN10 = math.log(10.0)


def wilson_interval(events: float, trials: float, confidence: float) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Args:
        events: Observed successes (here: dropped elements; fractional when scaled to an
            effective element count).
        trials: Number of independent trials; may be fractional when derived from an
            effective element count.
        confidence: Two-sided confidence level, e.g. 0.999.

    Returns:
        ``(low, high)``, both in [0, 1]; ``(0.0, 1.0)`` when there are no trials.
    """
    if trials <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = min(max(events / trials, 0.0), 1.0)
    z2n = z * z / trials
    center = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / trials + z2n / (4.0 * trials))
    low = 0.0 if events <= 0 else max(0.0, center - half)
    high = 1.0 if events >= trials else min(1.0, center + half)
    return low, high


def worst_keep_probability(low: float, high: float) -> float:
    """Largest per-element probability of repeating a given value, over rates in [low, high].

    An independent element equals a fixed value with probability ``p`` or ``1 - p``; the
    worst case over the rate interval is the endpoint farthest from 0.5.
    """
    return max(high, 1.0 - low, 0.5)


def log10_constant_fibers(lengths: np.ndarray, counts: np.ndarray, low: float,
                          high: float) -> float:
    """log10 of the chance that independent Bernoulli fibers all come out constant.

    A fiber of ``n`` independent Bernoulli(p) elements is constant (all kept or all dropped)
    with probability ``(1-p)**n + p**n``; fibers are independent, so chances multiply. The
    rate is unknown within ``[low, high]``; the chance is convex in ``p`` with its maximum at
    an endpoint, so the larger of the two endpoint values is returned.

    Args:
        lengths: Fiber length of each group (>= 2).
        counts: Number of fibers in each group.
        low: Lower end of the drop-rate interval.
        high: Upper end of the drop-rate interval.

    Returns:
        A log10 probability (<= 0). 0 when a rate of 0 or 1 is plausible.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if lengths.size == 0:
        return 0.0
    best = -math.inf
    for p in (low, high):
        if p <= 0.0 or p >= 1.0:
            return 0.0
        per_fiber = np.logaddexp(lengths * math.log1p(-p), lengths * math.log(p))
        best = max(best, float(np.sum(counts * per_fiber)))
    return min(0.0, best / _LN10)


def log10_repeat_tail(pairs: int, repeats: int, log10_pair_chance: float) -> float:
    """log10 upper bound on P(at least ``repeats`` of ``pairs`` fresh draws repeat by chance).

    Each pair of independently drawn masks is identical with probability at most
    ``10**log10_pair_chance``. The number of identical pairs is then stochastically below
    Binomial(pairs, q); the Chernoff bound ``exp(-pairs * KL(repeats/pairs || q))`` bounds
    its upper tail and is exact (``q**pairs``) when every pair repeats.

    Returns:
        A log10 probability (<= 0); 0 when there are no repeats or chance explains them.
    """
    if repeats <= 0 or pairs <= 0:
        return 0.0
    ln_q = log10_pair_chance * _LN10
    if ln_q >= 0.0:
        return 0.0
    a = repeats / pairs
    q = math.exp(ln_q)
    if a <= q:
        return 0.0
    kl = a * (math.log(a) - ln_q)
    if a < 1.0:
        kl += (1.0 - a) * (math.log1p(-a) - math.log1p(-q))
    return min(0.0, -pairs * kl / _LN10)
