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

from dropspy.analysis.copies import Copies
from dropspy.analysis.results import (
    AxisVerdict,
    Finding,
    PairCheck,
    RateEstimate,
    Severity,
)
from dropspy.records import POLICY_CAUSES

__all__ = ["SiteEvidence", "RunEvidence", "SetEvidence", "FindingRule", "FINDINGS",
           "site_findings", "run_findings", "set_findings"]


@dataclass(frozen=True)
class SiteEvidence:
    """What the site rules read: the site's facts, its summary's counts and the verdicts."""

    name: str
    records: int
    training_records: int
    applied_training: int
    configured: float | None
    opaque: str | None
    extra: Mapping[str, Any]
    inference_records: int
    inference_first_step: int | None
    fresh_first: tuple[int, int] | None
    rate: RateEstimate
    axes: tuple[AxisVerdict, ...]
    freshness: PairCheck | None
    threshold: float
    confidence: float
    across: PairCheck | None = None
    across_detail: Copies | None = None


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


@dataclass(frozen=True)
class SetEvidence:
    """What the run-set rules read: the files of the set and how they disagree.

    Attributes:
        world_size: The ranks the files say the run had (None when they do not say).
        ranks: The ranks present.
        unreadable: (path, why) of each file that could not be read.
        sites_differ: (rank, sites only in it, sites it lacks) for ranks whose sites differ
            from the others'.
        different_runs: Why the files look like different runs (empty when they agree).
        forced: The user merged them anyway (``--force``).
    """

    world_size: int | None
    ranks: tuple[int, ...]
    unreadable: tuple[tuple[str, str], ...] = ()
    sites_differ: tuple[tuple[int, tuple[str, ...], tuple[str, ...]], ...] = ()
    different_runs: tuple[str, ...] = ()
    forced: bool = False


def _opaque(e: SiteEvidence) -> list[Finding]:
    if not e.opaque:
        return []
    return [Finding("opaque", Severity.WARNING, f"masks cannot be observed: {e.opaque}", e.name,
                    {"reason": e.opaque})]


def _never_applied(e: SiteEvidence) -> list[Finding]:
    if e.opaque or not e.configured or e.configured <= 0 or e.applied_training:
        return []
    return [Finding(
        "never-applied", Severity.WARNING,
        f"configured with rate={e.configured:g} but no mask was applied while training "
        f"({e.records} records, {e.training_records} in training mode)",
        e.name, {"rate": e.configured, "records": e.records})]


def _no_records(e: SiteEvidence) -> list[Finding]:
    if e.opaque or (e.configured and e.configured > 0) or e.records:
        return []
    return [Finding("no-records", Severity.INFO, "no records", e.name)]


def _inference_dropout(e: SiteEvidence) -> list[Finding]:
    hits = e.inference_records
    if not hits:
        return []
    first = e.inference_first_step
    return [Finding(
        "inference-dropout", Severity.ERROR,
        f"dropout active at inference: {hits} record(s) made with training=False dropped "
        f"elements (first at step {first})",
        e.name, {"records": hits, "first_step": first})]


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
    a, b = e.fresh_first or (0, 0)
    return [Finding(
        "stale-mask", Severity.ERROR,
        f"mask identical to the previous step's in {f.identical} of {f.pairs} step pairs "
        f"(first: step {a} -> {b}); chance for fresh masks "
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


def _identical_across_ranks(e: SiteEvidence) -> list[Finding]:
    c, d = e.across, e.across_detail
    if c is None or d is None or c.verdict not in ("identical", "partial"):
        return []
    who = "ranks" if d.kind == "ranks" else "replicas" if d.kind == "replicas" else "copies"
    detail = ", ".join(f"{k}: {i}/{n}" for k, (i, n) in d.by_copy.items())
    return [Finding(
        "identical-across-ranks", Severity.WARNING,
        f"{c.identical} of {c.pairs} records are identical across {who} at the same step and "
        f"call ({detail}); chance for independent masks <= 1e{c.log10_chance:.0f}. Each "
        f"{who[:-1]} drops the same units of its own data: seed each {who[:-1]} differently "
        f"(e.g. torch.manual_seed(base + rank)), unless this is intended",
        e.name, {"pairs": c.pairs, "identical": c.identical, "log10_chance": c.log10_chance,
                 "kind": d.kind, "by_copy": {k: list(v) for k, v in d.by_copy.items()}})]


def _rank_unreadable(e: SetEvidence) -> list[Finding]:
    return [Finding("rank-unreadable", Severity.ERROR,
                    f"{path} could not be read and is left out of the report: {why}", None,
                    {"path": path, "reason": why}) for path, why in e.unreadable]


def _rank_missing(e: SetEvidence) -> list[Finding]:
    if e.world_size is None:
        return []
    missing = sorted(set(range(e.world_size)) - set(e.ranks))
    if not missing:
        return []
    return [Finding(
        "rank-missing", Severity.WARNING,
        f"the run had {e.world_size} ranks but the set holds files of {len(e.ranks)}; missing "
        f"rank(s): {', '.join(map(str, missing))}", None,
        {"world_size": e.world_size, "missing": missing})]


def _rank_sites_differ(e: SetEvidence) -> list[Finding]:
    out = []
    for rank, extra, lacking in e.sites_differ:
        words = []
        if extra:
            words.append("only it has " + ", ".join(extra))
        if lacking:
            words.append("it lacks " + ", ".join(lacking))
        out.append(Finding(
            "rank-sites-differ", Severity.WARNING,
            f"rank {rank} has different sites from the other ranks: {'; '.join(words)}", None,
            {"rank": rank, "only_here": list(extra), "missing_here": list(lacking)}))
    return out


def _ranks_from_different_runs(e: SetEvidence) -> list[Finding]:
    if not e.different_runs:
        return []
    return [Finding(
        "ranks-from-different-runs", Severity.ERROR,
        "the files look like different runs (" + "; ".join(e.different_runs) + "), merged "
        "anyway because of --force", None, {"reasons": list(e.different_runs)})]


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
        scope: ``site``, ``run`` or ``set`` (the files of a run set).
        rule: The function that makes the finding from the evidence.
        when: One line: when the finding is made (the docs table says the same).
        incomplete: The finding says the analysis saw less than the run recorded;
            ``dropspy check`` fails on it unless ``--allow-incomplete``.
    """

    code: str
    severity: Severity
    scope: str
    rule: Callable[[Any], list[Finding]]
    when: str
    incomplete: bool = False


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
    FindingRule("identical-across-ranks", Severity.WARNING, "site", _identical_across_ranks,
                "records of different ranks/replicas are identical at the same step and call "
                "beyond chance"),
    FindingRule("rank-unreadable", Severity.ERROR, "set", _rank_unreadable,
                "a file of a run set could not be read; the others are reported",
                incomplete=True),
    FindingRule("rank-missing", Severity.WARNING, "set", _rank_missing,
                "the files say the run had more ranks than the set holds", incomplete=True),
    FindingRule("rank-sites-differ", Severity.WARNING, "set", _rank_sites_differ,
                "a rank's file has sites the others lack, or lacks some they have"),
    FindingRule("ranks-from-different-runs", Severity.ERROR, "set", _ranks_from_different_runs,
                "files of different runs merged with --force"),
    FindingRule("run-incomplete", Severity.WARNING, "run", _run_incomplete,
                "the writer did not close the file cleanly", incomplete=True),
    FindingRule("records-dropped", Severity.WARNING, "run", _records_dropped,
                "records were not written; info when only the sampling policy left them out"),
    FindingRule("records-unreadable", Severity.WARNING, "run", _records_unreadable,
                "the file holds fewer readable records than the writer reported",
                incomplete=True),
    FindingRule("file-damaged", Severity.ERROR, "run", _file_damaged,
                "the reader left out records whose index the file contradicts; the damage is "
                "named", incomplete=True),
    FindingRule("note", Severity.INFO, "run", _note, "a message the recorder stored"),
)


def site_findings(evidence: SiteEvidence) -> list[Finding]:
    """Every site rule applied to one site's evidence, in table order."""
    return [f for row in FINDINGS if row.scope == "site" for f in row.rule(evidence)]


def run_findings(evidence: RunEvidence) -> list[Finding]:
    """Every run rule applied to the run's evidence, in table order."""
    return [f for row in FINDINGS if row.scope == "run" for f in row.rule(evidence)]


def set_findings(evidence: SetEvidence) -> list[Finding]:
    """Every run-set rule applied to the set's evidence, in table order."""
    return [f for row in FINDINGS if row.scope == "set" for f in row.rule(evidence)]
