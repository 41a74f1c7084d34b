"""What the recorded masks say: axis sharing, rates, gates, timesteps, freshness, inference.

Pure numpy: no I/O beyond the reader API of :class:`dropspy.store.Site`, no printing. Every
result is a frozen dataclass; every problem is a :class:`Finding` with a severity. The
analysis streams each site's records once (``site.iter_noise``), so memory stays bounded
whatever the size of the run.

Verdicts follow one rule: a structure is only claimed when the chance that independent
Bernoulli(rate) masks would show it is below ``threshold`` (default 1e-9), computed with the
least favourable rate in the observed rate's confidence interval. Otherwise the verdict is
``inconclusive``, and the chance is reported.

Example:
    >>> run = dropspy.load("run.h5")                      # doctest: +SKIP
    >>> result = analyze_run(run)                          # doctest: +SKIP
    >>> result["spatial_dropout1d"].shared_axes            # doctest: +SKIP
    ('time',)
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from dropspy._scan import SiteScan, noises_equal, scan_site
from dropspy._stats import (
    log10_constant_fibers,
    log10_repeat_tail,
    wilson_interval,
    worst_keep_probability,
)

__all__ = [
    "THRESHOLD",
    "CONFIDENCE",
    "Severity",
    "Finding",
    "AxisVerdict",
    "RateEstimate",
    "PairCheck",
    "SiteAnalysis",
    "RunAnalysis",
    "SiteDifference",
    "analyze_site",
    "analyze_run",
    "analyze_masks",
    "select_sites",
    "diff",
    "MemorySite",
    "MemoryRun",
]

THRESHOLD = 1e-9
"""Largest chance of a coincidence that still lets a structure be claimed."""

CONFIDENCE = 0.999
"""Confidence level of the rate interval."""

PATTERNS = ("elementwise", "time-shared", "feature-shared", "sample", "batch-shared")


class Severity(str, Enum):
    """How much a finding matters: ``info`` < ``warning`` < ``error``."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0, 1, 2 for info, warning, error."""
        return ("info", "warning", "error").index(self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Finding:
    """One fact the user should see, with a severity.

    Attributes:
        code: Stable identifier, e.g. ``"rate-mismatch"``, ``"stale-mask"``.
        severity: :class:`Severity`.
        message: One sentence a person can act on.
        site: The site it is about, or None for the run as a whole.
        data: JSON-able details (numbers behind the message).
    """

    code: str
    severity: Severity
    message: str
    site: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class AxisVerdict:
    """Whether the applied mask was shared along one named axis.

    Attributes:
        name: Axis name (``batch``, ``time``, ``feature``...).
        verdict: ``shared``, ``independent`` or ``inconclusive``.
        by_construction: Shared because the noise has size 1 along the axis (broadcast) or
            the framework applies one drawn mask at every timestep; False when observed.
        size: Largest applied size of the axis over the records.
        log10_chance: log10 of the chance that independent masks would look shared along
            the axis (for an observed ``shared`` or an ``inconclusive``); None otherwise.
        reason: Why, in words.
    """

    name: str
    verdict: str
    by_construction: bool
    size: int
    log10_chance: float | None
    reason: str

    @property
    def chance(self) -> float | None:
        """The chance itself (may underflow to 0.0; use ``log10_chance`` for tiny ones)."""
        return None if self.log10_chance is None else 10.0 ** self.log10_chance


@dataclass(frozen=True)
class RateEstimate:
    """Observed drop rate over the drawn noise, against the configured rate.

    Attributes:
        configured: The site's configured rate, or None when unknown.
        observed: Dropped / total noise elements, or None without data.
        low: Lower end of the confidence interval.
        high: Upper end of the confidence interval.
        confidence: Confidence level of the interval.
        elements: Noise elements counted.
        effective_elements: Independently drawn elements (noise elements along axes seen
            to be constant count once); the interval uses this.
        verdict: ``ok``, ``mismatch`` or ``unknown``.
    """

    configured: float | None
    observed: float | None
    low: float | None
    high: float | None
    confidence: float
    elements: int
    effective_elements: int
    verdict: str


@dataclass(frozen=True)
class PairCheck:
    """Masks that could be the same object compared for identity.

    Used for gates (``identical``/``distinct``), calls over timesteps (``constant``/
    ``resampled``) and consecutive steps (``fresh``/``stale``); any of them can be
    ``inconclusive``.

    Attributes:
        verdict: The verdict word.
        pairs: Pairs of masks compared.
        identical: Pairs found identical element for element.
        log10_chance: log10 upper bound on the chance of that many identical pairs among
            independently drawn masks (None when nothing was compared).
        source: What was compared, in words.
    """

    verdict: str
    pairs: int
    identical: int
    log10_chance: float | None
    source: str


@dataclass(frozen=True)
class SiteAnalysis:
    """Everything the analysis concluded about one site.

    Attributes:
        site: Site name.
        layer: Layer path / module name.
        layer_class: Layer class name.
        role: ``output``, ``input``, ``recurrent``...
        gate: Gate name or None.
        axes: One :class:`AxisVerdict` per axis, in axis order.
        pattern: One word (``elementwise``, ``time-shared``, ``feature-shared``,
            ``sample``, ``batch-shared``), ``shared:<axes>`` for any other set of shared
            axes, ``inconclusive``, or ``unobserved`` (no masks).
        rate: :class:`RateEstimate`.
        records: Records of the site.
        training_records: Records made in training mode.
        applied_records: Records where a mask was applied.
        steps: Distinct steps with at least one record.
        opaque: Why the site's masks cannot be observed, or None.
        gates: Identity of the masks of sibling gates (None for a site without gates).
        gate_sites: The sibling sites compared.
        over_time: Constant or resampled across timesteps (None when there is no time
            axis and no repeated call within a step).
        freshness: New mask each step, or stale (None with fewer than two steps).
        findings: Findings about this site.
        noise_shape: The configured noise shape (None entries follow the input), or None.
        scale: The multiplier applied to kept elements, or None when unknown.
        extra: The adapter's facts about the site as stored in the run (JSON-able), e.g.
            ``masks_per_call``, ``gates_share_mask``, ``time_axis_by_construction``.
    """

    site: str
    layer: str
    layer_class: str
    role: str
    gate: str | None
    axes: tuple[AxisVerdict, ...]
    pattern: str
    rate: RateEstimate
    records: int
    training_records: int
    applied_records: int
    steps: int
    opaque: str | None
    gates: PairCheck | None
    gate_sites: tuple[str, ...]
    over_time: PairCheck | None
    freshness: PairCheck | None
    findings: tuple[Finding, ...]
    noise_shape: tuple[int | None, ...] | None = None
    scale: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def axis_names(self) -> tuple[str, ...]:
        """Axis names in order."""
        return tuple(a.name for a in self.axes)

    @property
    def shared_axes(self) -> tuple[str, ...]:
        """Axes judged shared."""
        return tuple(a.name for a in self.axes if a.verdict == "shared")

    @property
    def independent_axes(self) -> tuple[str, ...]:
        """Axes judged independent (the mask drops along them)."""
        return tuple(a.name for a in self.axes if a.verdict == "independent")

    @property
    def inconclusive_axes(self) -> tuple[str, ...]:
        """Axes the data cannot decide."""
        return tuple(a.name for a in self.axes if a.verdict == "inconclusive")

    def axis(self, name: str) -> AxisVerdict:
        """The verdict of one axis by name.

        Raises:
            KeyError: The site has no such axis.
        """
        for a in self.axes:
            if a.name == name:
                return a
        raise KeyError(f"Site {self.site!r} has no axis {name!r}; its axes: {self.axis_names}")

    @property
    def severity(self) -> Severity | None:
        """The worst severity among the findings, or None without findings."""
        return _worst(self.findings)


@dataclass(frozen=True)
class RunAnalysis:
    """The analysis of a whole run: one :class:`SiteAnalysis` per site plus run findings.

    Attributes:
        path: The run file, or None for an in-memory run.
        framework: Framework that produced the run.
        complete: The writer closed the file cleanly.
        records_written: Records the writer reported.
        records_dropped: Records not written, by cause.
        threshold: Chance threshold used for every verdict.
        confidence: Confidence level of the rate intervals.
        sites: The analysed sites, in run order.
        findings: Findings about the run as a whole.
        framework_version: Version of that framework, or "" when the run does not say.
    """

    path: str | None
    framework: str
    complete: bool
    records_written: int
    records_dropped: Mapping[str, int]
    threshold: float
    confidence: float
    sites: tuple[SiteAnalysis, ...]
    findings: tuple[Finding, ...]
    framework_version: str = ""

    def __getitem__(self, name: str) -> SiteAnalysis:
        for s in self.sites:
            if s.site == name:
                return s
        raise KeyError(
            f"No site {name!r} in the analysis. Sites: "
            f"{', '.join(s.site for s in self.sites) or '(none)'}"
        )

    def __contains__(self, name: object) -> bool:
        return any(s.site == name for s in self.sites)

    @property
    def site_names(self) -> tuple[str, ...]:
        """Names of the analysed sites."""
        return tuple(s.site for s in self.sites)

    @property
    def all_findings(self) -> tuple[Finding, ...]:
        """Run findings followed by every site's findings."""
        return self.findings + tuple(f for s in self.sites for f in s.findings)

    @property
    def severity(self) -> Severity | None:
        """The worst severity among all findings, or None."""
        return _worst(self.all_findings)


@dataclass(frozen=True)
class SiteDifference:
    """One way two runs' mask structure differs at one site.

    Attributes:
        site: Site name.
        aspect: What differs: ``presence``, ``axes``, ``axis:<name>``, ``pattern``,
            ``rate``, ``gates``, ``over_time``, ``freshness``, ``errors``, and with
            ``diff(..., facts=True)`` ``fact:noise_shape``, ``fact:scale``, ``fact:<key>``.
        a: The first run's value, in words.
        b: The second run's value, in words.
    """

    site: str
    aspect: str
    a: str
    b: str


def _worst(findings: Iterable[Finding]) -> Severity | None:
    worst: Severity | None = None
    for f in findings:
        if worst is None or f.severity.rank > worst.rank:
            worst = f.severity
    return worst


# -- per-site verdicts --------------------------------------------------------------------


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
    _check_args(threshold, confidence)
    scan = scan_site(site, max_bytes=max_bytes, progress=progress)
    return _conclude(site, scan, threshold, confidence)


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


def _check_args(threshold: float, confidence: float) -> None:
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


def _conclude(site: Any, scan: SiteScan, threshold: float, confidence: float,
              gates: PairCheck | None = None, gate_sites: tuple[str, ...] = ()) -> SiteAnalysis:
    name = site.name
    n = len(site)
    rank = scan.rank
    axes = tuple(site.axes)
    training = np.asarray(site.training, dtype=bool)[:n]
    applied = np.asarray(site.applied, dtype=bool)[:n]
    steps_arr = np.asarray(site.steps)[:n]
    extra = dict(getattr(site, "extra", {}) or {})
    findings: list[Finding] = []

    # Shapes of the used records, grouped: (applied shape, noise shape, records), so that
    # nothing here costs memory per record.
    groups = list(scan.groups.items())
    shapes = np.array([g[0][0] for g in groups], dtype=np.int64).reshape(len(groups), rank)
    nshapes = np.array([g[0][1] for g in groups], dtype=np.int64).reshape(len(groups), rank)
    counts = np.array([g[1] for g in groups], dtype=np.int64)
    constant = np.array([v < 0 for v in scan.varies_at], dtype=bool)

    def independent_elements(noise_shapes: np.ndarray) -> np.ndarray:
        """Independently drawn elements per noise shape: axes seen constant count once."""
        return np.prod(np.where(constant[None, :], 1, noise_shapes), axis=1)

    eff = np.where(constant[None, :], 1, nshapes)
    eff_elements = int((independent_elements(nshapes) * counts).sum()) if len(groups) else 0
    rate = _rate(site.rate, scan, eff_elements, confidence)
    low = rate.low if rate.low is not None else 0.0
    high = rate.high if rate.high is not None else 1.0

    verdicts = tuple(
        _axis_verdict(k, axes[k], scan, shapes, nshapes, counts, eff, low, high,
                      threshold, extra, steps_arr)
        for k in range(rank)
    )
    pattern = _pattern(verdicts) if scan.used else "unobserved"

    log_w = math.log10(worst_keep_probability(low, high))
    freshness = _pair_check(scan.fresh, independent_elements, log_w, threshold,
                            ("fresh", "stale"), "each record vs the same call at the previous step")
    over_time = _over_time(verdicts, scan, independent_elements, log_w, threshold)

    # -- findings ----------------------------------------------------------------------
    opaque = getattr(site, "opaque", None)
    configured = site.rate
    if opaque:
        findings.append(Finding("opaque", Severity.WARNING,
                                f"masks cannot be observed: {opaque}", name, {"reason": opaque}))
    elif configured and configured > 0 and not (applied & training).any():
        findings.append(Finding(
            "never-applied", Severity.WARNING,
            f"configured with rate={configured:g} but no mask was applied while training "
            f"({n} records, {int(training.sum())} in training mode)",
            name, {"rate": configured, "records": n}))
    elif n == 0:
        findings.append(Finding("no-records", Severity.INFO, "no records", name))
    if scan.inference_dropping:
        first = scan.inference_dropping[0]
        findings.append(Finding(
            "inference-dropout", Severity.ERROR,
            f"dropout active at inference: {len(scan.inference_dropping)} record(s) made with "
            f"training=False dropped elements (first at step {int(steps_arr[first])})",
            name, {"records": len(scan.inference_dropping), "first_step": int(steps_arr[first])}))
    if rate.verdict == "mismatch":
        findings.append(Finding(
            "rate-mismatch", Severity.ERROR,
            f"observed drop rate {rate.observed:.4g} ({confidence:.1%} interval "
            f"{rate.low:.4g}-{rate.high:.4g}, {rate.elements} elements) does not match the "
            f"configured rate {rate.configured:g}",
            name, {"configured": rate.configured, "observed": rate.observed,
                   "interval": [rate.low, rate.high]}))
    if freshness is not None and freshness.verdict == "stale":
        a, b = scan.fresh.first_pair or (0, 0)
        findings.append(Finding(
            "stale-mask", Severity.ERROR,
            f"mask identical to the previous step's in {freshness.identical} of "
            f"{freshness.pairs} step pairs (first: step {int(steps_arr[a])} -> "
            f"{int(steps_arr[b])}); chance for fresh masks <= 1e{freshness.log10_chance:.0f}",
            name, {"pairs": freshness.pairs, "identical": freshness.identical,
                   "log10_chance": freshness.log10_chance}))
    elif freshness is not None and freshness.verdict == "inconclusive":
        if rate.observed in (0.0, 1.0):
            why = f"every element was {'kept' if rate.observed == 0 else 'dropped'}, so masks cannot differ"
        else:
            why = (f"which chance explains at this mask size and rate (chance "
                   f"{10 ** freshness.log10_chance:.2g})")
        findings.append(Finding(
            "freshness-inconclusive", Severity.INFO,
            f"{freshness.identical} of {freshness.pairs} step pairs drew identical masks, {why}",
            name))
    for v in verdicts:
        if v.verdict == "inconclusive" and v.size > 1 and v.log10_chance is not None:
            findings.append(Finding(
                "axis-inconclusive", Severity.INFO,
                f"cannot tell whether axis {v.name!r} is shared: independent masks look shared "
                f"along it with chance {10 ** v.log10_chance:.2g} (threshold {threshold:g})",
                name, {"axis": v.name, "log10_chance": v.log10_chance}))
        if (v.verdict == "independent" and v.name == "time"
                and extra.get("time_axis_by_construction")):
            findings.append(Finding(
                "construction-contradicted", Severity.WARNING,
                "the site declares one mask for every timestep, but the mask varies along time",
                name))

    return SiteAnalysis(
        site=name, layer=site.layer, layer_class=site.layer_class, role=site.role,
        gate=getattr(site, "gate", None), axes=verdicts, pattern=pattern, rate=rate,
        records=n, training_records=int(training.sum()), applied_records=int(applied.sum()),
        steps=int(np.unique(steps_arr).size), opaque=opaque, gates=gates, gate_sites=gate_sites,
        over_time=over_time, freshness=freshness, findings=tuple(findings),
        **_site_facts(site, extra),
    )


def _site_facts(site: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    """noise_shape, scale and extra in their JSON form, so that a report round trip is lossless."""
    ns = getattr(site, "noise_shape", None)
    scale = getattr(site, "scale", None)
    scale = None if scale is None or not math.isfinite(float(scale)) else float(scale)
    return {
        "noise_shape": None if ns is None else tuple(None if d is None else int(d) for d in ns),
        "scale": scale,
        "extra": json.loads(json.dumps(dict(extra), default=str, sort_keys=True)),
    }


def _rate(configured: float | None, scan: SiteScan, eff_elements: int,
          confidence: float) -> RateEstimate:
    if scan.elements == 0:
        return RateEstimate(configured, None, None, None, confidence, 0, 0, "unknown")
    dropped = scan.elements - scan.kept
    observed = dropped / scan.elements
    low, high = wilson_interval(observed * eff_elements, eff_elements, confidence)
    if configured is None:
        verdict = "unknown"
    else:
        verdict = "ok" if low - 1e-12 <= configured <= high + 1e-12 else "mismatch"
    return RateEstimate(configured, observed, low, high, confidence, scan.elements,
                        eff_elements, verdict)


def _axis_verdict(k: int, name: str, scan: SiteScan, shapes: np.ndarray, nshapes: np.ndarray,
                  counts: np.ndarray, eff: np.ndarray, low: float, high: float, threshold: float,
                  extra: Mapping[str, Any], steps: np.ndarray) -> AxisVerdict:
    """Verdict on one axis from shape groups (applied shape, noise shape, records)."""
    if len(shapes) == 0:
        return AxisVerdict(name, "inconclusive", False, 0, None, "no masks recorded")
    size = int(shapes[:, k].max())
    if scan.varies_at[k] >= 0:
        at = scan.varies_at[k]
        return AxisVerdict(name, "independent", False, size, None,
                           f"the mask varies along {name} (first at step {int(steps[at])})")
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
    repeats = len(log.identical)
    smallest = int(independent_elements(np.array(sorted(log.shapes), dtype=np.int64)).min())
    log_pair = smallest * log_w
    tail = log10_repeat_tail(pairs, repeats, log_pair)
    if repeats == 0:
        return PairCheck(words[0], pairs, 0, 0.0, source)
    if tail < math.log10(threshold):
        return PairCheck(words[1], pairs, repeats, tail, source)
    return PairCheck("inconclusive", pairs, repeats, tail, source)


def _over_time(verdicts: Sequence[AxisVerdict], scan: SiteScan,
               independent_elements: Callable[[np.ndarray], np.ndarray],
               log_w: float, threshold: float) -> PairCheck | None:
    for v in verdicts:
        if v.name == "time" and v.size > 1:
            word = {"shared": "constant", "independent": "resampled"}.get(v.verdict, "inconclusive")
            return PairCheck(word, 0, 0, v.log10_chance, f"time axis: {v.reason}")
    check = _pair_check(scan.calls, independent_elements, log_w, threshold, ("resampled", "constant"),
                        "calls within a step vs call 0")
    if check is not None and 0 < check.identical < check.pairs:
        # One call that differs from call 0 proves the mask is redrawn within the step.
        check = PairCheck("resampled", check.pairs, check.identical, check.log10_chance,
                          check.source)
    return check


# -- the whole run ------------------------------------------------------------------------


def select_sites(names: Sequence[str], patterns: str | Sequence[str] | None) -> list[str]:
    """Site names matching any of the glob ``patterns`` (all names for None), in run order.

    Raises:
        KeyError: A pattern matches no site (the message lists the sites).
    """
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    for pat in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise KeyError(
                f"no site matches {pat!r}; sites: {', '.join(names) or '(none)'}"
            )
        chosen.update(hit)
    return [n for n in names if n in chosen]


def analyze_run(
    run: Any,
    *,
    sites: str | Sequence[str] | None = None,
    threshold: float = THRESHOLD,
    confidence: float = CONFIDENCE,
    max_bytes: int = 16 << 20,
    progress: Callable[[int], None] | None = None,
) -> RunAnalysis:
    """Analyse every site of a run (or those matching ``sites``), with gate comparison.

    Args:
        run: A :class:`dropspy.store.Run` (``dropspy.load(path)``), a path to a run file,
            a :class:`MemoryRun`, or any mapping of site name to a site with the reader API.
        sites: Glob pattern(s) selecting sites; None for all.
        threshold: Largest chance of coincidence that still lets a structure be claimed.
        confidence: Confidence level of the rate intervals.
        max_bytes: Packed bytes per block read.
        progress: Called with the packed bytes of each record consumed (for progress bars).

    Returns:
        The :class:`RunAnalysis`.

    Raises:
        KeyError: A pattern in ``sites`` matches no site.
    """
    _check_args(threshold, confidence)
    if isinstance(run, (str, os.PathLike)):
        from dropspy.store import load

        with load(run) as opened:
            return analyze_run(opened, sites=sites, threshold=threshold, confidence=confidence,
                               max_bytes=max_bytes, progress=progress)
    names = list(getattr(run, "sites", None) or list(run.keys()))
    chosen = select_sites(names, sites)
    groups = _gate_groups(run, names)
    in_group = {n for members in groups.values() for n in members}
    # Gate siblings are scanned with digests, also when only some of them were selected.
    to_scan = [n for n in names if n in chosen or (n in in_group and any(
        m in chosen for g in groups.values() if n in g for m in g))]
    scans = {n: scan_site(run[n], want_digests=n in in_group, max_bytes=max_bytes,
                          progress=progress) for n in to_scan}
    gate_checks: dict[str, tuple[PairCheck, tuple[str, ...]]] = {}
    for members in groups.values():
        if all(m in scans for m in members):
            check = _compare_gates(run, members, scans, threshold, confidence)
            for m in members:
                gate_checks[m] = (check, tuple(x for x in members if x != m))
    results = []
    for n in chosen:
        site = run[n]
        scan = scans[n]
        _verify(site, scan)
        gates, siblings = gate_checks.get(n, (None, ()))
        if gates is None and (getattr(site, "extra", None) or {}).get("gates_share_mask"):
            gates = PairCheck("identical", 0, 0, None, "the framework uses one mask for all gates")
        results.append(_conclude(site, scan, threshold, confidence, gates, siblings))
    return RunAnalysis(
        path=str(run.path) if getattr(run, "path", None) is not None else None,
        framework=str(getattr(run, "framework", "unknown")),
        framework_version=str((getattr(run, "attrs", None) or {}).get("framework_version", "")),
        complete=bool(getattr(run, "complete", True)),
        records_written=int(getattr(run, "records_written", 0)),
        records_dropped=dict(getattr(run, "records_dropped", {}) or {}),
        threshold=threshold, confidence=confidence,
        sites=tuple(results), findings=tuple(_run_findings(run)),
    )


def _verify(site: Any, scan: SiteScan) -> None:
    read = site.noise
    scan.fresh.verify(read)
    scan.calls.verify(read)


_POLICY_CAUSES = {"site_filter", "sampling"}

def _run_findings(run: Any) -> list[Finding]:
    out: list[Finding] = []
    if not getattr(run, "complete", True):
        reason = str(getattr(run, "attrs", {}).get("stop_reason", "") or "")
        out.append(Finding(
            "run-incomplete", Severity.WARNING,
            "the run file was not closed cleanly (recording crashed, was killed or is still "
            "running): results cover the records flushed before that"
            + (f"; writer error: {reason}" if reason else ""), None, {"stop_reason": reason}))
    dropped = {k: int(v) for k, v in (getattr(run, "records_dropped", {}) or {}).items() if v}
    if dropped:
        total = sum(dropped.values())
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
        # Steps or sites left out on purpose by the sampling policy are not losses.
        only_policy = set(dropped) <= _POLICY_CAUSES
        out.append(Finding(
            "records-dropped", Severity.INFO if only_policy else Severity.WARNING,
            f"{total} record(s) were not written ({detail}); the analysis does not see them",
            None, dict(dropped)))
    written = int(getattr(run, "records_written", 0) or 0)
    readable = getattr(run, "records_readable", None)
    if readable is not None and readable < written:
        out.append(Finding(
            "records-unreadable", Severity.WARNING,
            f"the writer reported {written} records but the file holds {readable} readable ones "
            f"(damaged or cut short); the analysis sees {readable}",
            None, {"written": written, "readable": int(readable)}))
    for note in getattr(run, "notes", ()) or ():
        out.append(Finding("note", Severity.INFO, str(note)))
    return out


def _gate_groups(run: Any, names: Sequence[str]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        site = run[n]
        if getattr(site, "gate", None) and not getattr(site, "opaque", None):
            groups.setdefault((site.layer, site.role), []).append(n)
    return {k: v for k, v in groups.items() if len({run[n].gate for n in v}) > 1}


def _compare_gates(run: Any, members: list[str], scans: Mapping[str, SiteScan],
                   threshold: float, confidence: float) -> PairCheck:
    """Compare each gate's masks with the first gate's, record by record (same step, call).

    Records are matched and digests compared with numpy (a long run has millions of small
    gate records); only pairs whose digests agree are read again and compared in full.
    """
    ref = run[members[0]]
    dig_r = scans[members[0]].digests
    keys_r = _keys(ref)
    order = np.argsort(keys_r, kind="stable")
    sorted_r = keys_r[order]
    pairs = identical = 0
    smallest: int | None = None
    worst_w = 0.5
    for other_name in members[1:]:
        other = run[other_name]
        dig_o = scans[other_name].digests
        keys_o = _keys(other)
        pos = np.searchsorted(sorted_r, keys_o)
        found = pos < len(sorted_r)
        found[found] = sorted_r[pos[found]] == keys_o[found]
        j = np.flatnonzero(found)
        i = order[pos[found]]
        ok = (dig_o[j] != 0) & (dig_r[i] != 0)
        i, j = i[ok], j[ok]
        pairs += len(j)
        same = dig_o[j] == dig_r[i]
        # Equal digests are only candidates: identity is decided on every element.
        identical += sum(noises_equal(ref.noise(int(a)), other.noise(int(b)))
                         for a, b in zip(i[same], j[same]))
        if len(j):
            m = int(np.prod(np.asarray(other.noise_shapes)[j], axis=1).min())
            smallest = m if smallest is None else min(smallest, m)
        for scan in (scans[members[0]], scans[other_name]):
            if scan.elements:
                obs = 1 - scan.kept / scan.elements
                lo, hi = wilson_interval(obs * scan.elements, scan.elements, confidence)
                worst_w = max(worst_w, worst_keep_probability(lo, hi))
    source = ("masks of gates " + ", ".join(str(run[m].gate) for m in members)
              + " at the same step and call")
    if pairs == 0:
        return PairCheck("inconclusive", 0, 0, None, source + " (no common records)")
    if identical < pairs:
        return PairCheck("distinct", pairs, identical, None, source)
    tail = log10_repeat_tail(pairs, identical, (smallest or 1) * math.log10(worst_w))
    verdict = "identical" if tail < math.log10(threshold) else "inconclusive"
    return PairCheck(verdict, pairs, identical, tail, source)


def _keys(site: Any) -> np.ndarray:
    """One int64 per record combining step and call (calls are small, steps < 2**40)."""
    steps = np.asarray(site.steps, dtype=np.int64)[:len(site)]
    calls = np.asarray(site.calls, dtype=np.int64)[:len(site)]
    return steps * (1 << 20) + calls


# -- comparing two runs -------------------------------------------------------------------


def diff(a: RunAnalysis, b: RunAnalysis, *, facts: bool = False) -> list[SiteDifference]:
    """Where two runs' mask structure differs, site by site.

    Compares presence, axis names, each axis verdict, pattern, observed rate (intervals that
    do not overlap), gates, over-time and freshness verdicts, and error findings.

    Args:
        a: The first run's analysis.
        b: The second run's analysis.
        facts: Also compare what the adapters stated about each site (aspects
            ``fact:noise_shape``, ``fact:scale`` and ``fact:<key>`` for each key of
            ``extra``). Two runs can agree on every verdict while the frameworks draw
            differently, e.g. Keras 2's cuDNN-eligible LSTM draws 4 input masks and applies
            one (``masks_drawn_per_call``), Keras 3 draws one.

    Returns:
        The differences; empty when the structure (and, with ``facts``, the facts) agree.
    """
    out: list[SiteDifference] = []
    names = list(a.site_names) + [n for n in b.site_names if n not in a]
    for n in names:
        if n not in a or n not in b:
            out.append(SiteDifference(n, "presence", "present" if n in a else "absent",
                                      "present" if n in b else "absent"))
            continue
        x, y = a[n], b[n]
        if x.axis_names != y.axis_names:
            out.append(SiteDifference(n, "axes", ",".join(x.axis_names), ",".join(y.axis_names)))
        else:
            for va, vb in zip(x.axes, y.axes):
                if va.verdict != vb.verdict:
                    out.append(SiteDifference(n, f"axis:{va.name}", va.verdict, vb.verdict))
        if x.pattern != y.pattern:
            out.append(SiteDifference(n, "pattern", x.pattern, y.pattern))
        ra, rb = x.rate, y.rate
        if (ra.low is not None and rb.low is not None
                and (ra.high < rb.low or rb.high < ra.low)):
            out.append(SiteDifference(n, "rate", f"{ra.observed:.4g}", f"{rb.observed:.4g}"))
        for aspect in ("gates", "over_time", "freshness"):
            ca, cb = getattr(x, aspect), getattr(y, aspect)
            wa = ca.verdict if ca is not None else "n/a"
            wb = cb.verdict if cb is not None else "n/a"
            if wa != wb:
                out.append(SiteDifference(n, aspect, wa, wb))
        ea = sorted({f.code for f in x.findings if f.severity == Severity.ERROR})
        eb = sorted({f.code for f in y.findings if f.severity == Severity.ERROR})
        if ea != eb:
            out.append(SiteDifference(n, "errors", ",".join(ea) or "none", ",".join(eb) or "none"))
        if facts:
            out.extend(_diff_facts(n, x, y))
    return out


_ABSENT = object()


def _fact_words(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    return json.dumps(value, sort_keys=True, default=str)


def _diff_facts(name: str, x: SiteAnalysis, y: SiteAnalysis) -> list[SiteDifference]:
    out = []
    na = None if x.noise_shape is None else list(x.noise_shape)
    nb = None if y.noise_shape is None else list(y.noise_shape)
    if na != nb:
        out.append(SiteDifference(name, "fact:noise_shape", _fact_words(na), _fact_words(nb)))
    if (x.scale is None) != (y.scale is None) or (
            x.scale is not None and y.scale is not None
            and not math.isclose(x.scale, y.scale, rel_tol=1e-6)):
        out.append(SiteDifference(name, "fact:scale", _fact_words(x.scale), _fact_words(y.scale)))
    keys = list(x.extra) + [k for k in y.extra if k not in x.extra]
    for k in sorted(keys):
        va, vb = x.extra.get(k, _ABSENT), y.extra.get(k, _ABSENT)
        if va is _ABSENT or vb is _ABSENT or _fact_words(va) != _fact_words(vb):
            out.append(SiteDifference(name, f"fact:{k}", _fact_words(va), _fact_words(vb)))
    return out


# -- in-memory sites ----------------------------------------------------------------------


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
    """

    def __init__(self, name: str, axes: Sequence[str], noises: Sequence[np.ndarray | None], *,
                 rate: float | None = None, shapes: Sequence[Sequence[int]] | None = None,
                 steps: Sequence[int] | None = None, calls: Sequence[int] | None = None,
                 training: Sequence[bool] | None = None, layer: str | None = None,
                 layer_class: str = "Dropout", role: str = "output", gate: str | None = None,
                 extra: Mapping[str, Any] | None = None, opaque: str | None = None) -> None:
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
        for arr, what in ((self.steps, "steps"), (self.calls, "calls"), (self.training, "training")):
            if len(arr) != n:
                raise ValueError(f"Site {name!r}: {len(arr)} {what} for {n} records")

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

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)
