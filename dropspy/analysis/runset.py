"""From per-file summaries to one report: a single run, or the files of a run set.

:func:`summarize_run` makes one file's :class:`~dropspy.analysis.summary.RunSummary` (one
streamed pass, bounded memory); :func:`analyze_summaries` merges the summaries of a run's
ranks site by site, compares records across ranks and replicas, and concludes. Analysing the
files in one place and merging summaries made where each file lies give the same report: the
report is always made from summaries.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dropspy.analysis._scan import scan_site
from dropspy.analysis._stats import log10_repeat_tail, wilson_interval, worst_keep_probability
from dropspy.analysis.copies import compare_copies, compare_gates
from dropspy.analysis.results import (
    CONFIDENCE,
    THRESHOLD,
    Finding,
    Member,
    PairCheck,
    RankSite,
    RunAnalysis,
)
from dropspy.analysis.rules import RunEvidence, SetEvidence, run_findings, set_findings
from dropspy.analysis.site import check_args, conclude
from dropspy.analysis.summary import RunSummary, SiteSummary, merge_sites
from dropspy.errors import RunSetError
from dropspy.records import select_sites, site_matches

__all__ = ["summarize_run", "analyze_summaries", "different_runs", "RunSetError"]

# Ranks of one run start within seconds of each other (record() is entered after the process
# group is up); files started further apart are taken for different runs, also under one run
# id: the DDP run id (rendezvous address and port) repeats when a job is launched again.
_START_SPREAD_S = 900.0


def summarize_run(run: Any, *, sites: str | Sequence[str] | None = None,
                  max_bytes: int = 16 << 20,
                  progress: Callable[[int], None] | None = None) -> RunSummary:
    """One file's summary: every site (or those matching ``sites``, plus their sibling gates).

    Patterns that match no site of this file are ignored here (another rank may have it);
    :func:`analyze_summaries` refuses a pattern that matches in no file.
    """
    names = list(getattr(run, "sites", None) or list(run.keys()))
    if sites is not None:
        pats = [sites] if isinstance(sites, str) else list(sites)
        chosen = {n for n in names
                  if any(site_matches(p, n, getattr(run[n], "layer", n)) for p in pats)}
        groups = _gate_groups({n: _facts(run[n]) for n in names})
        for members in groups.values():
            if chosen & set(members):
                chosen.update(members)
        to_scan = [n for n in names if n in chosen]
    else:
        to_scan = names
    summaries = {n: scan_site(run[n], max_bytes=max_bytes, progress=progress) for n in to_scan}
    attrs = dict(getattr(run, "attrs", None) or {})
    readable = getattr(run, "records_readable", None)
    path = getattr(run, "path", None)
    return RunSummary(
        path="" if path is None else str(path), attrs=attrs,
        complete=bool(getattr(run, "complete", True)),
        records_written=int(getattr(run, "records_written", 0) or 0),
        records_readable=-1 if readable is None else int(readable),
        records_dropped={k: int(v) for k, v in
                         dict(getattr(run, "records_dropped", {}) or {}).items()},
        stop_reason=str(attrs.get("stop_reason", "") or ""),
        notes=[str(n) for n in getattr(run, "notes", ()) or ()],
        site_order=names, sites=summaries,
        damage=[str(d) for d in getattr(run, "damage", ()) or ()])


def _facts(site: Any) -> tuple[str, str, str | None, bool]:
    return (str(getattr(site, "layer", site.name)), str(getattr(site, "role", "")),
            getattr(site, "gate", None), bool(getattr(site, "opaque", None)))


def _gate_groups(facts: Mapping[str, tuple[str, str, str | None, bool]]
                 ) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for n, (layer, role, gate, opaque) in facts.items():
        if gate and not opaque:
            groups.setdefault((layer, role), []).append(n)
    return {k: v for k, v in groups.items() if len({facts[n][2] for n in v}) > 1}


def _started(value: Any) -> float | None:
    try:
        return _dt.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (TypeError, ValueError):
        return None


def different_runs(members: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """Why files cannot be one run's ranks, in words (empty when nothing says so).

    Args:
        members: ``(path, root attributes)`` of each file.

    Two files with the same rank; a run id, world size, framework or dropspy version that
    differs; start times more than 15 minutes apart; without a run id, recording
    configurations that differ.
    """
    out = []
    by_rank: dict[int, list[str]] = {}
    for path, attrs in members:
        by_rank.setdefault(_as_int(attrs.get("rank"), 0), []).append(path)
    for r, paths in sorted(by_rank.items()):
        if len(paths) > 1:
            out.append(f"rank {r} appears in {len(paths)} files ({', '.join(paths)})")
    ids = {str(a["run_id"]) for _, a in members if a.get("run_id") not in (None, "")}
    if len(ids) > 1:
        out.append("run ids differ: " + ", ".join(sorted(ids)))
    for key in ("world_size", "framework", "framework_version", "dropspy_version"):
        values = {str(a.get(key, "")) for _, a in members}
        if len(values) > 1:
            out.append(f"{key} differs: " + ", ".join(sorted(values)))
    if not ids:
        # Under one run id, ranks may record differently on purpose (every= per rank).
        configs = {str(a.get("config", "")) for _, a in members}
        if len(configs) > 1:
            out.append("recording configurations differ")
    starts = [t for t in (_started(a.get("started")) for _, a in members) if t is not None]
    if len(starts) > 1 and max(starts) - min(starts) > _START_SPREAD_S:
        out.append(f"start times are {(max(starts) - min(starts)) / 60:.0f} minutes apart")
    return out


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def analyze_summaries(
    summaries: Sequence[RunSummary],
    *,
    sites: str | Sequence[str] | None = None,
    threshold: float = THRESHOLD,
    confidence: float = CONFIDENCE,
    as_set: bool | None = None,
    unreadable: Sequence[tuple[str, str]] = (),
    force: bool = False,
    path: str | None = None,
) -> RunAnalysis:
    """The report of one file or of a run set, from per-file summaries.

    Args:
        summaries: One summary per readable file (any order; ranks sort them).
        sites: Glob pattern(s) selecting sites; None for all.
        threshold: Largest chance of coincidence that still lets a structure be claimed.
        confidence: Confidence level of the rate intervals.
        as_set: Report as a run set (per-rank facts, set findings); default: when there is
            more than one file or an unreadable one.
        unreadable: ``(path, why)`` for files of the set that could not be read.
        force: Merge files that look like different runs (a finding still says so).
        path: What to call the set in the report (default: the file, or the files).

    Raises:
        RunSetError: No readable file, or files of different runs without ``force``.
        SiteNotFoundError: A pattern in ``sites`` matches no site in any file.
    """
    check_args(threshold, confidence)
    if not summaries:
        bad = "; ".join(f"{p}: {why}" for p, why in unreadable)
        raise RunSetError("no readable run file in the set" + (f" ({bad})" if bad else ""))
    members = sorted(summaries, key=lambda m: (m.rank, m.path))
    if as_set is None:
        as_set = len(members) > 1 or bool(unreadable)
    reasons = different_runs([(m.path, m.attrs) for m in members]) if as_set else []
    if reasons and not force:
        raise RunSetError("the files are not one run's ranks: " + "; ".join(reasons)
                          + ". Give the files of one run, or --force to merge them anyway")
    names: list[str] = []
    for m in members:
        names.extend(n for n in m.site_order if n not in names)
    scanned = [n for n in names if any(n in m.sites for m in members)]
    layers = {n: next(m.sites[n].layer for m in members if n in m.sites) for n in scanned}
    chosen = select_sites(scanned, sites, layers)

    gate_checks = _gates(members, scanned, confidence, threshold)
    results = []
    for n in chosen:
        parts = [(m, m.sites[n]) for m in members if n in m.sites]
        merged = merge_sites([p for _, p in parts])
        across = compare_copies([(m.rank, p.sample) for m, p in parts])
        ranks = tuple(_rank_site(m.rank, p) for m, p in parts) if as_set else ()
        gates, siblings = gate_checks.get(n, (None, ()))
        if gates is None and merged.extra.get("gates_share_mask"):
            gates = PairCheck("identical", 0, 0, None, "the framework uses one mask for all gates")
        results.append(conclude(merged, threshold, confidence, gates, siblings, across, ranks))

    findings: list[Finding] = []
    if as_set:
        world = {m.world_size for m in members if m.world_size is not None}
        findings += set_findings(SetEvidence(
            world_size=max(world) if world else None,
            ranks=tuple(sorted({m.rank for m in members})), unreadable=tuple(unreadable),
            sites_differ=_sites_differ(members), different_runs=tuple(reasons), forced=force))
    for m in members:
        prefix = f"rank {m.rank} ({m.path}): " if as_set else ""
        for f in _run_findings(m):
            findings.append(Finding(f.code, f.severity, prefix + f.message, f.site, f.data))

    first = members[0]
    dropped: dict[str, int] = {}
    for m in members:
        for k, v in m.records_dropped.items():
            dropped[k] = dropped.get(k, 0) + int(v)
    if path is None:
        path = (first.path or None) if not as_set else _describe([m.path for m in members]
                                                                 + [p for p, _ in unreadable])
    member_rows: tuple[Member, ...] = ()
    if as_set:
        member_rows = tuple(
            Member(m.path, m.rank, m.world_size, max(m.records_readable, 0), m.complete)
            for m in members) + tuple(Member(p, None, None, 0, False, why)
                                      for p, why in unreadable)
    return RunAnalysis(
        path=path, framework=first.framework,
        framework_version=str(first.attrs.get("framework_version", "") or ""),
        complete=all(m.complete for m in members) and not unreadable,
        records_written=sum(m.records_written for m in members),
        records_dropped=dropped, threshold=threshold, confidence=confidence,
        sites=tuple(results), findings=tuple(findings), members=member_rows,
    )


def _describe(paths: Sequence[str]) -> str:
    import os.path

    dirs = {os.path.dirname(p) for p in paths}
    if len(dirs) == 1:
        where = dirs.pop() or "."
        return (f"run set of {len(paths)} files in {where}: "
                + ", ".join(os.path.basename(p) for p in paths))
    return f"run set of {len(paths)} files: " + ", ".join(paths)


def _rank_site(rank: int, s: SiteSummary) -> RankSite:
    rate = None if not s.elements else (s.elements - s.kept) / s.elements
    return RankSite(rank, s.records, rate, tuple(s.replicas))


def _sites_differ(members: Sequence[RunSummary]
                  ) -> tuple[tuple[int, tuple[str, ...], tuple[str, ...]], ...]:
    every = [set(m.site_order) for m in members]
    union = set().union(*every)
    out = []
    for k, m in enumerate(members):
        others = set().union(*(s for j, s in enumerate(every) if j != k)) if len(every) > 1 \
            else every[k]
        only = tuple(n for n in m.site_order if n not in others)
        lacking = tuple(sorted(union - every[k]))
        if only or lacking:
            out.append((m.rank, only, lacking))
    return tuple(out)


def _run_findings(m: RunSummary) -> list[Finding]:
    return run_findings(RunEvidence(
        complete=m.complete, stop_reason=m.stop_reason, records_written=m.records_written,
        records_readable=None if m.records_readable < 0 else m.records_readable,
        records_dropped=m.records_dropped, notes=tuple(m.notes), damage=tuple(m.damage)))


def _gates(members: Sequence[RunSummary], names: Sequence[str], confidence: float,
           threshold: float) -> dict[str, tuple[PairCheck, tuple[str, ...]]]:
    """Sibling gates compared record by record within each file, counts summed over files."""
    facts: dict[str, tuple[str, str, str | None, bool]] = {}
    for m in members:
        for n, s in m.sites.items():
            facts.setdefault(n, (s.layer, s.role, s.gate, bool(s.opaque)))
    out: dict[str, tuple[PairCheck, tuple[str, ...]]] = {}
    for group in _gate_groups({n: facts[n] for n in names if n in facts}).values():
        pairs = identical = 0
        smallest: int | None = None
        worst_w = 0.5
        for m in members:
            if not all(g in m.sites for g in group):
                continue
            p, i, least = compare_gates([m.sites[g].sample for g in group])
            pairs, identical = pairs + p, identical + i
            if least is not None:
                smallest = least if smallest is None else min(smallest, least)
            for g in group:
                sc = m.sites[g]
                if sc.elements:
                    obs = 1 - sc.kept / sc.elements
                    lo, hi = wilson_interval(obs * sc.elements, sc.elements, confidence)
                    worst_w = max(worst_w, worst_keep_probability(lo, hi))
        gate_words = ", ".join(str(facts[g][2]) for g in group)
        source = f"masks of gates {gate_words} at the same step and call"
        if any(m.sites[g].sample.keys_kept < m.sites[g].sample.keys_total
               for m in members for g in group if g in m.sites):
            source += " (a sample of the keys)"
        if pairs == 0:
            check = PairCheck("inconclusive", 0, 0, None, source + " (no common records)")
        elif identical < pairs:
            check = PairCheck("distinct", pairs, identical, None, source)
        else:
            tail = log10_repeat_tail(pairs, identical, (smallest or 1) * math.log10(worst_w))
            word = "identical" if tail < math.log10(threshold) else "inconclusive"
            check = PairCheck(word, pairs, identical, tail, source)
        for g in group:
            out[g] = (check, tuple(x for x in group if x != g))
    return out
