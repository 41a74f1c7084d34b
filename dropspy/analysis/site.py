"""Per-site verdicts: axes, pattern, rate, freshness and over-time, from one streamed scan.

Verdicts follow one rule: a structure is only claimed when the chance that independent
Bernoulli(rate) masks would show it is below ``threshold`` (default 1e-9), computed with the
least favourable rate in the observed rate's confidence interval. Otherwise the verdict is
``inconclusive``, and the chance is reported. The findings are made by the rules in
:mod:`dropspy.analysis.rules`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dropspy.analysis._scan import scan_site
from dropspy.analysis._stats import (
    log10_constant_fibers,
    log10_repeat_tail,
    wilson_interval,
    worst_keep_probability,
)
from dropspy.analysis.copies import Copies
from dropspy.analysis.memory import MemorySite
from dropspy.analysis.results import (
    CONFIDENCE,
    THRESHOLD,
    AxisVerdict,
    PairCheck,
    RankSite,
    RateEstimate,
    SiteAnalysis,
)
from dropspy.analysis.rules import SiteEvidence, site_findings
from dropspy.analysis.summary import SiteSummary

__all__ = ["analyze_site", "analyze_masks", "conclude", "check_args"]


def analyze_site(
    site: Any,
    *,
    threshold: float = THRESHOLD,
    confidence: float = CONFIDENCE,
    max_bytes: int = 16 << 20,
    progress: Callable[[int], None] | None = None,
) -> SiteAnalysis:
    """Analyse one site on its own (no gate comparison; :func:`analyze_run` adds that).

    Args:
        site: A :class:`dropspy.store.Site`, a :class:`MemorySite`, or anything with the
            same reader API.
        threshold: Largest chance of coincidence that still lets a structure be claimed.
        confidence: Confidence level of the rate interval.
        max_bytes: Packed bytes per block read.
        progress: Called with the packed bytes of each record consumed.

    Returns:
        The :class:`SiteAnalysis`.
    """
    check_args(threshold, confidence)
    summary = scan_site(site, max_bytes=max_bytes, progress=progress)
    return conclude(summary, threshold, confidence)


def analyze_masks(
    noises: Iterable[np.ndarray | None],
    axes: Sequence[str],
    *,
    rate: float | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    steps: Sequence[int] | None = None,
    calls: Sequence[int] | None = None,
    training: Sequence[bool] | None = None,
    name: str = "masks",
    extra: Mapping[str, Any] | None = None,
    threshold: float = THRESHOLD,
    confidence: float = CONFIDENCE,
) -> SiteAnalysis:
    """Analyse masks held in memory, as if they were the records of one site.

    Args:
        noises: Keep-noise arrays (bool or 0/1), one per record; size-1 dimensions are
            broadcast to ``shapes``. Applied masks can be passed as they are.
        axes: Axis names.
        rate: Configured drop rate, if known.
        shapes: Applied shapes (default: each noise's own shape).
        steps: Step of each record (default: 0, 1, 2...).
        calls: Call index of each record (default: all 0).
        training: Training flag of each record (default: all True).
        name: Site name used in the findings.
        extra: Site facts, e.g. ``{"time_axis_by_construction": True}``.
        threshold: See :func:`analyze_site`.
        confidence: See :func:`analyze_site`.

    Returns:
        The :class:`SiteAnalysis`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> noise = rng.random((8, 1, 16)) > 0.3
        >>> analyze_masks([noise], ("batch", "time", "feature"), rate=0.3,
        ...               shapes=[(8, 20, 16)]).pattern
        'time-shared'
    """
    site = MemorySite(name, axes, list(noises), rate=rate, shapes=shapes, steps=steps,
                      calls=calls, training=training, extra=extra)
    return analyze_site(site, threshold=threshold, confidence=confidence)


def check_args(threshold: float, confidence: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(
            f"Invalid value received for argument `threshold`. Expected a float in (0, 1). "
            f"Received: threshold={threshold!r}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(
            f"Invalid value received for argument `confidence`. Expected a float in (0, 1). "
            f"Received: confidence={confidence!r}"
        )


def conclude(s: SiteSummary, threshold: float, confidence: float,
             gates: PairCheck | None = None, gate_sites: tuple[str, ...] = (),
             across: Copies | None = None,
             ranks: tuple[RankSite, ...] = ()) -> SiteAnalysis:
    """The verdicts on one site from its (possibly merged) summary.

    Args:
        s: The site's summary (one file's, or merged over the files of a run set).
        threshold: Largest chance of coincidence that still lets a structure be claimed.
        confidence: Confidence level of the rate interval.
        gates: The gate comparison, when the site has sibling gates.
        gate_sites: The sibling gate sites compared.
        across: Records of other ranks/replicas compared with the first one's, if any.
        ranks: Per-rank facts of a run set.
    """
    rank = len(s.axes)
    axes = tuple(s.axes)
    extra = dict(s.extra)

    # Shapes of the used records, grouped: (applied shape, noise shape, records), so that
    # nothing here costs memory per record.
    groups = list(s.groups.items())
    shapes = np.array([g[0][0] for g in groups], dtype=np.int64).reshape(len(groups), rank)
    nshapes = np.array([g[0][1] for g in groups], dtype=np.int64).reshape(len(groups), rank)
    counts = np.array([g[1] for g in groups], dtype=np.int64)
    constant = np.array([v is None for v in s.varies_at], dtype=bool)

    def independent_elements(noise_shapes: np.ndarray) -> np.ndarray:
        """Independently drawn elements per noise shape: axes seen constant count once."""
        return np.prod(np.where(constant[None, :], 1, noise_shapes), axis=1)

    eff = np.where(constant[None, :], 1, nshapes)
    eff_elements = int((independent_elements(nshapes) * counts).sum()) if len(groups) else 0
    rate = _rate(_configured(s), s.kept, s.elements, eff_elements, confidence)
    if len(s.record_rates) > 1:
        # One site used at several rates (AWD-LSTM's LockedDropout, a schedule): judged
        # against the drops its records' own rates expect, element-weighted.
        extra["record_rates"] = list(s.record_rates)
    low = rate.low if rate.low is not None else 0.0
    high = rate.high if rate.high is not None else 1.0

    verdicts = tuple(
        _axis_verdict(k, axes[k], s, shapes, nshapes, counts, eff, low, high, threshold, extra)
        for k in range(rank)
    )
    pattern = _pattern(verdicts) if s.used else "unobserved"

    log_w = math.log10(worst_keep_probability(low, high))
    freshness = _pair_check(s.fresh, independent_elements, log_w, threshold,
                            ("fresh", "stale"), "each record vs the same call at the previous step")
    over_time = _over_time(verdicts, s, independent_elements, log_w, threshold)
    copies = None if across is None else across.check(independent_elements, log_w, threshold)

    findings = site_findings(SiteEvidence(
        name=s.name, records=s.records, training_records=s.training_records,
        applied_training=s.applied_training, configured=s.rate, opaque=s.opaque,
        extra=extra, inference_records=s.inference_records,
        inference_first_step=s.inference_first_step, fresh_first=s.fresh.first, rate=rate,
        axes=verdicts, freshness=freshness, across=copies,
        across_detail=None if across is None else across, threshold=threshold,
        confidence=confidence))

    return SiteAnalysis(
        site=s.name, layer=s.layer, layer_class=s.layer_class, role=s.role,
        gate=s.gate, axes=verdicts, pattern=pattern, rate=rate,
        records=s.records, training_records=s.training_records,
        applied_records=s.applied_records, steps=s.steps, opaque=s.opaque, gates=gates,
        gate_sites=gate_sites, over_time=over_time, freshness=freshness,
        findings=tuple(findings), noise_shape=s.noise_shape, scale=s.scale,
        extra=json.loads(json.dumps(extra, default=str, sort_keys=True)),
        ranks=ranks, replicas=tuple(s.replicas), across=copies,
    )


def _configured(s: SiteSummary) -> float | None:
    """The rate the records were drawn with: the site's, or the records' own when they say."""
    if len(s.record_rates) == 1:
        return s.record_rates[0]
    if len(s.record_rates) > 1 and s.expected_dropped is not None and s.elements:
        return s.expected_dropped / s.elements
    return s.rate


def _rate(configured: float | None, kept: int, elements: int, eff_elements: int,
          confidence: float) -> RateEstimate:
    if elements == 0:
        return RateEstimate(configured, None, None, None, confidence, 0, 0, "unknown")
    dropped = elements - kept
    observed = dropped / elements
    low, high = wilson_interval(observed * eff_elements, eff_elements, confidence)
    if configured is None:
        verdict = "unknown"
    else:
        verdict = "ok" if low - 1e-12 <= configured <= high + 1e-12 else "mismatch"
    return RateEstimate(configured, observed, low, high, confidence, elements,
                        eff_elements, verdict)


def _axis_verdict(k: int, name: str, s: SiteSummary, shapes: np.ndarray, nshapes: np.ndarray,
                  counts: np.ndarray, eff: np.ndarray, low: float, high: float, threshold: float,
                  extra: Mapping[str, Any]) -> AxisVerdict:
    """Verdict on one axis from shape groups (applied shape, noise shape, records)."""
    if len(shapes) == 0:
        return AxisVerdict(name, "inconclusive", False, 0, None, "no masks recorded")
    size = int(shapes[:, k].max())
    at = s.varies_at[k]
    if at is not None:
        return AxisVerdict(name, "independent", False, size, None,
                           f"the mask varies along {name} (first at step {at})")
    if size <= 1:
        return AxisVerdict(name, "inconclusive", False, size, None,
                           f"{name} has size 1 in every record")
    informative = shapes[:, k] > 1
    observed = informative & (nshapes[:, k] > 1)
    # The framework's own fact (one drawn mask reused at every timestep) says more than the
    # broadcast that records it, so it is named first.
    if name == "time" and extra.get("time_axis_by_construction"):
        return AxisVerdict(name, "shared", True, size, None,
                           "the framework applies one drawn mask at every timestep")
    if not observed.any():
        return AxisVerdict(name, "shared", True, size, None,
                           f"the noise has size 1 along {name} (broadcast)")
    lengths = nshapes[observed, k]
    others = np.delete(eff[observed], k, axis=1)
    fibers = np.prod(others, axis=1) if others.shape[1] else np.ones(len(lengths), dtype=np.int64)
    log10_chance = log10_constant_fibers(lengths, fibers * counts[observed], low, high)
    if log10_chance < math.log10(threshold):
        return AxisVerdict(name, "shared", False, size, log10_chance,
                           f"observed constant along {name} in every record "
                           f"(chance if independent: 1e{log10_chance:.0f})")
    return AxisVerdict(name, "inconclusive", False, size, log10_chance,
                       f"constant along {name}, but independent masks would be too with "
                       f"chance {10 ** log10_chance:.2g}")


def _pattern(verdicts: Sequence[AxisVerdict]) -> str:
    informative = [v for v in verdicts if v.size > 1]
    if any(v.verdict == "inconclusive" for v in informative):
        return "inconclusive"
    shared = {v.name for v in informative if v.verdict == "shared"}
    independent = {v.name for v in informative if v.verdict == "independent"}
    if not shared:
        return "elementwise"
    if independent == {"batch"}:
        return "sample"
    if not independent:
        return "shared:" + ",".join(v.name for v in informative if v.verdict == "shared")
    for word, axes in (("time-shared", {"time"}), ("feature-shared", {"feature"}),
                       ("batch-shared", {"batch"})):
        if shared == axes:
            return word
    return "shared:" + ",".join(v.name for v in informative if v.verdict == "shared")


def _pair_check(log: Any, independent_elements: Callable[[np.ndarray], np.ndarray],
                log_w: float, threshold: float, words: tuple[str, str],
                source: str) -> PairCheck | None:
    """Verdict from pairs compared for identity; ``words`` = (all different, all repeated)."""
    pairs = log.pairs
    if pairs == 0:
        return None
    repeats = log.identical
    smallest = int(independent_elements(np.array(sorted(log.shapes), dtype=np.int64)).min())
    log_pair = smallest * log_w
    tail = log10_repeat_tail(pairs, repeats, log_pair)
    if repeats == 0:
        return PairCheck(words[0], pairs, 0, 0.0, source)
    if tail < math.log10(threshold):
        return PairCheck(words[1], pairs, repeats, tail, source)
    return PairCheck("inconclusive", pairs, repeats, tail, source)


def _over_time(verdicts: Sequence[AxisVerdict], s: SiteSummary,
               independent_elements: Callable[[np.ndarray], np.ndarray],
               log_w: float, threshold: float) -> PairCheck | None:
    for v in verdicts:
        if v.name == "time" and v.size > 1:
            word = {"shared": "constant", "independent": "resampled"}.get(v.verdict, "inconclusive")
            return PairCheck(word, 0, 0, v.log10_chance, f"time axis: {v.reason}")
    check = _pair_check(s.calls, independent_elements, log_w, threshold,
                        ("resampled", "constant"), "calls within a step vs call 0")
    if check is not None and 0 < check.identical < check.pairs:
        # One call that differs from call 0 proves the mask is redrawn within the step.
        check = PairCheck("resampled", check.pairs, check.identical, check.log10_chance,
                          check.source)
    return check


# -- the whole run ------------------------------------------------------------------------

