"""The analysis' result types: findings, verdicts, per-site and per-run results, differences.

Plain frozen dataclasses; the report module turns them into JSON and back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dropspy.errors import SiteNotFoundError

__all__ = [
    "THRESHOLD",
    "CONFIDENCE",
    "PATTERNS",
    "Severity",
    "Finding",
    "AxisVerdict",
    "RateEstimate",
    "PairCheck",
    "SiteAnalysis",
    "RunAnalysis",
    "SiteDifference",
    "RankSite",
    "Member",
    "worst",
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
class RankSite:
    """One site in one rank's file of a run set.

    Attributes:
        rank: The rank.
        records: Records of the site in that file.
        rate_observed: Dropped / noise elements in that file, or None without masks.
        replicas: Replica ids with records in that file.
    """

    rank: int
    records: int
    rate_observed: float | None
    replicas: tuple[int, ...] = ()


@dataclass(frozen=True)
class Member:
    """One file of a run set.

    Attributes:
        path: The file (or the summary it came from).
        rank: Its rank (the root attribute ``rank``; 0 when absent).
        world_size: The ranks the run had, when the file says.
        records: Readable records.
        complete: The writer closed it cleanly.
        error: Why it could not be read, or None.
    """

    path: str
    rank: int | None
    world_size: int | None
    records: int
    complete: bool
    error: str | None = None


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
        ranks: In a run set, the site in each rank's file (records, observed rate).
        replicas: Replica ids with records (``(0,)`` for a single-device process).
        across: Records of other ranks/replicas compared with the first rank/replica's at the
            same step and call: ``identical``, ``partial``, ``independent`` or
            ``inconclusive``; None when only one rank and replica has records.
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
    ranks: tuple[RankSite, ...] = ()
    replicas: tuple[int, ...] = ()
    across: PairCheck | None = None

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
        raise SiteNotFoundError(
            f"Site {self.site!r} has no axis {name!r}; its axes: {self.axis_names}")

    @property
    def severity(self) -> Severity | None:
        """The worst severity among the findings, or None without findings."""
        return worst(self.findings)


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
        members: The files of a run set, one per rank (empty for a single file).
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
    members: tuple[Member, ...] = ()

    def __getitem__(self, name: str) -> SiteAnalysis:
        for s in self.sites:
            if s.site == name:
                return s
        raise SiteNotFoundError(
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
        return worst(self.all_findings)


@dataclass(frozen=True)
class SiteDifference:
    """One way two runs' mask structure differs at one site.

    Attributes:
        site: Site name.
        aspect: What differs: ``presence``, ``axes``, ``axis:<name>``, ``pattern``,
            ``rate``, ``gates``, ``over_time``, ``freshness``, ``across``, ``errors``, and with
            ``diff(..., facts=True)`` ``fact:noise_shape``, ``fact:scale``, ``fact:<key>``.
        a: The first run's value, in words.
        b: The second run's value, in words.
    """

    site: str
    aspect: str
    a: str
    b: str


def worst(findings: Iterable[Finding]) -> Severity | None:
    """The worst severity among ``findings``, or None when there are none."""
    out: Severity | None = None
    for f in findings:
        if out is None or f.severity.rank > out.rank:
            out = f.severity
    return out
