"""The findings: one small rule function per finding code, and the table that lists them.

A rule reads the evidence gathered for one site (:class:`SiteEvidence`) or one run
(:class:`RunEvidence`) and returns the findings it makes (usually none or one). Adding a
finding is: one rule function here, one row in :data:`FINDINGS`, one row in docs/analysis.md
(a test holds the table, the docs and the report schema together).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dropspy.analysis._scan import SiteScan
from dropspy.analysis.results import (
    AxisVerdict,
    Finding,
    PairCheck,
    RateEstimate,
    Severity,
)
from dropspy.records import POLICY_CAUSES

__all__ = ["SiteEvidence", "RunEvidence", "FindingRule", "FINDINGS", "site_findings",
           "run_findings"]


@dataclass(frozen=True)
class SiteEvidence:
    """What the site rules read: the site's facts, its scan and the verdicts drawn from it."""

    name: str
    records: int
    configured: float | None
    opaque: str | None
    training: np.ndarray
    applied: np.ndarray
    steps: np.ndarray
    extra: Mapping[str, Any]
    scan: SiteScan
    rate: RateEstimate
    axes: tuple[AxisVerdict, ...]
    freshness: PairCheck | None
    threshold: float
    confidence: float


@dataclass(frozen=True)
class RunEvidence:
    """What the run rules read: the run's status as the reader gives it."""

    complete: bool
    stop_reason: str
    records_written: int
    records_readable: int | None
    records_dropped: Mapping[str, int]
    notes: Sequence[str] = field(default_factory=tuple)
    #: What the reader had to leave out of a damaged file, one message per problem.
    damage: Sequence[str] = field(default_factory=tuple)


def _opaque(e: SiteEvidence) -> list[Finding]:
    if not e.opaque:
        return []
    return [Finding("opaque", Severity.WARNING, f"masks cannot be observed: {e.opaque}", e.name,
                    {"reason": e.opaque})]


def _never_applied(e: SiteEvidence) -> list[Finding]:
    if e.opaque or not e.configured or e.configured <= 0 or (e.applied & e.training).any():
        return []
    return [Finding(
        "never-applied", Severity.WARNING,
        f"configured with rate={e.configured:g} but no mask was applied while training "
        f"({e.records} records, {int(e.training.sum())} in training mode)",
        e.name, {"rate": e.configured, "records": e.records})]


def _no_records(e: SiteEvidence) -> list[Finding]:
    if e.opaque or (e.configured and e.configured > 0) or e.records:
        return []
    return [Finding("no-records", Severity.INFO, "no records", e.name)]


def _inference_dropout(e: SiteEvidence) -> list[Finding]:
    hits = e.scan.inference_dropping
    if not hits:
        return []
    first = int(e.steps[hits[0]])
    return [Finding(
        "inference-dropout", Severity.ERROR,
        f"dropout active at inference: {len(hits)} record(s) made with training=False dropped "
        f"elements (first at step {first})",
        e.name, {"records": len(hits), "first_step": first})]


def _rate_mismatch(e: SiteEvidence) -> list[Finding]:
    r = e.rate
    if r.verdict != "mismatch":
        return []
    return [Finding(
        "rate-mismatch", Severity.ERROR,
        f"observed drop rate {r.observed:.4g} ({e.confidence:.1%} interval "
        f"{r.low:.4g}-{r.high:.4g}, {r.elements} elements) does not match the configured rate "
        f"{r.configured:g}",
        e.name, {"configured": r.configured, "observed": r.observed, "interval": [r.low, r.high]})]


def _stale_mask(e: SiteEvidence) -> list[Finding]:
    f = e.freshness
    if f is None or f.verdict != "stale":
        return []
    a, b = e.scan.fresh.first_pair or (0, 0)
    return [Finding(
        "stale-mask", Severity.ERROR,
        f"mask identical to the previous step's in {f.identical} of {f.pairs} step pairs "
        f"(first: step {int(e.steps[a])} -> {int(e.steps[b])}); chance for fresh masks "
        f"<= 1e{f.log10_chance:.0f}",
        e.name, {"pairs": f.pairs, "identical": f.identical, "log10_chance": f.log10_chance})]


def _freshness_inconclusive(e: SiteEvidence) -> list[Finding]:
    f = e.freshness
    if f is None or f.verdict != "inconclusive":
        return []
    if e.rate.observed in (0.0, 1.0):
        kept = "kept" if e.rate.observed == 0 else "dropped"
        why = f"every element was {kept}, so masks cannot differ"
    else:
        why = (f"which chance explains at this mask size and rate (chance "
               f"{10 ** (f.log10_chance or 0.0):.2g})")
    return [Finding(
        "freshness-inconclusive", Severity.INFO,
        f"{f.identical} of {f.pairs} step pairs drew identical masks, {why}", e.name)]


def _axis_inconclusive(e: SiteEvidence) -> list[Finding]:
    return [Finding(
        "axis-inconclusive", Severity.INFO,
        f"cannot tell whether axis {v.name!r} is shared: independent masks look shared along it "
        f"with chance {10 ** v.log10_chance:.2g} (threshold {e.threshold:g})",
        e.name, {"axis": v.name, "log10_chance": v.log10_chance})
        for v in e.axes
        if v.verdict == "inconclusive" and v.size > 1 and v.log10_chance is not None]


def _construction_contradicted(e: SiteEvidence) -> list[Finding]:
    if not e.extra.get("time_axis_by_construction"):
        return []
    return [Finding(
        "construction-contradicted", Severity.WARNING,
        "the site declares one mask for every timestep, but the mask varies along time", e.name)
        for v in e.axes if v.verdict == "independent" and v.name == "time"]


def _run_incomplete(e: RunEvidence) -> list[Finding]:
    if e.complete:
        return []
    reason = e.stop_reason
    return [Finding(
        "run-incomplete", Severity.WARNING,
        "the run file was not closed cleanly (recording crashed, was killed or is still "
        "running): results cover the records flushed before that"
        + (f"; writer error: {reason}" if reason else ""), None, {"stop_reason": reason})]


def _records_dropped(e: RunEvidence) -> list[Finding]:
    dropped = {k: int(v) for k, v in e.records_dropped.items() if v}
    if not dropped:
        return []
    total = sum(dropped.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
    # Steps or sites left out on purpose by the sampling policy are not losses.
    only_policy = set(dropped) <= POLICY_CAUSES
    return [Finding(
        "records-dropped", Severity.INFO if only_policy else Severity.WARNING,
        f"{total} record(s) were not written ({detail}); the analysis does not see them",
        None, dict(dropped))]


def _records_unreadable(e: RunEvidence) -> list[Finding]:
    if e.records_readable is None or e.records_readable >= e.records_written:
        return []
    return [Finding(
        "records-unreadable", Severity.WARNING,
        f"the writer reported {e.records_written} records but the file holds "
        f"{e.records_readable} readable ones (damaged or cut short); the analysis sees "
        f"{e.records_readable}",
        None, {"written": e.records_written, "readable": e.records_readable})]


def _file_damaged(e: RunEvidence) -> list[Finding]:
    return [Finding("file-damaged", Severity.ERROR,
                    f"the run file is damaged, records were left out: {d}", None, {"damage": d})
            for d in e.damage]


def _note(e: RunEvidence) -> list[Finding]:
    return [Finding("note", Severity.INFO, str(n)) for n in e.notes]


@dataclass(frozen=True)
class FindingRule:
    """One row of the findings table.

    Attributes:
        code: The finding's stable code.
        severity: Its usual severity (``records-dropped`` is info when only the sampling
            policy left records out).
        scope: ``site`` or ``run``.
        rule: The function that makes the finding from the evidence.
        when: One line: when the finding is made (the docs table says the same).
    """

    code: str
    severity: Severity
    scope: str
    rule: Callable[[Any], list[Finding]]
    when: str


#: Every finding dropspy makes, in report order. docs/analysis.md and the report schema are
#: tested against this table.
FINDINGS: tuple[FindingRule, ...] = (
    FindingRule("opaque", Severity.WARNING, "site", _opaque,
                "the framework applies the mask inside a fused kernel; the reason is given"),
    FindingRule("never-applied", Severity.WARNING, "site", _never_applied,
                "configured with rate > 0, but no mask applied while training"),
    FindingRule("no-records", Severity.INFO, "site", _no_records, "the site has no records"),
    FindingRule("inference-dropout", Severity.ERROR, "site", _inference_dropout,
                "a record made with training=False dropped something"),
    FindingRule("rate-mismatch", Severity.ERROR, "site", _rate_mismatch,
                "the configured rate is outside the observed rate's interval"),
    FindingRule("stale-mask", Severity.ERROR, "site", _stale_mask,
                "masks repeat across steps beyond chance"),
    FindingRule("freshness-inconclusive", Severity.INFO, "site", _freshness_inconclusive,
                "masks repeat across steps, but chance explains it"),
    FindingRule("axis-inconclusive", Severity.INFO, "site", _axis_inconclusive,
                "an axis looks shared, but independent masks would too with some chance"),
    FindingRule("construction-contradicted", Severity.WARNING, "site",
                _construction_contradicted,
                "a site declared one mask for every timestep, but the mask varies along time"),
    FindingRule("run-incomplete", Severity.WARNING, "run", _run_incomplete,
                "the writer did not close the file cleanly"),
    FindingRule("records-dropped", Severity.WARNING, "run", _records_dropped,
                "records were not written; info when only the sampling policy left them out"),
    FindingRule("records-unreadable", Severity.WARNING, "run", _records_unreadable,
                "the file holds fewer readable records than the writer reported"),
    FindingRule("file-damaged", Severity.ERROR, "run", _file_damaged,
                "the reader left out records whose index the file contradicts; the damage is "
                "named"),
    FindingRule("note", Severity.INFO, "run", _note, "a message the recorder stored"),
)


def site_findings(evidence: SiteEvidence) -> list[Finding]:
    """Every site rule applied to one site's evidence, in table order."""
    return [f for row in FINDINGS if row.scope == "site" for f in row.rule(evidence)]


def run_findings(evidence: RunEvidence) -> list[Finding]:
    """Every run rule applied to the run's evidence, in table order."""
    return [f for row in FINDINGS if row.scope == "run" for f in row.rule(evidence)]
