"""A whole run: every selected site, the gate comparison between sibling sites, run findings."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dropspy.analysis._scan import SiteScan, noises_equal, scan_site
from dropspy.analysis._stats import (
    log10_repeat_tail,
    wilson_interval,
    worst_keep_probability,
)
from dropspy.analysis.results import CONFIDENCE, THRESHOLD, PairCheck, RunAnalysis
from dropspy.analysis.rules import RunEvidence, run_findings
from dropspy.analysis.site import check_args, conclude
from dropspy.records import select_sites

__all__ = ["analyze_run"]


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
        run: A :class:`dropspy.store.Run` (``dropspy.load(path)``; ``run.report()`` is the
            same call), a :class:`MemoryRun`, or any mapping of site name to a site with the
            reader API. The analysis does no I/O of its own: open a path with
            :func:`dropspy.load`.
        sites: Glob pattern(s) selecting sites; None for all.
        threshold: Largest chance of coincidence that still lets a structure be claimed.
        confidence: Confidence level of the rate intervals.
        max_bytes: Packed bytes per block read.
        progress: Called with the packed bytes of each record consumed (for progress bars).

    Returns:
        The :class:`RunAnalysis`.

    Raises:
        SiteNotFoundError: A pattern in ``sites`` matches no site (also a ``KeyError``).
    """
    check_args(threshold, confidence)
    names = list(getattr(run, "sites", None) or list(run.keys()))
    chosen = select_sites(names, sites, {n: getattr(run[n], "layer", n) for n in names})
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
        results.append(conclude(site, scan, threshold, confidence, gates, siblings))
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



def _run_findings(run: Any) -> list[Any]:
    attrs = getattr(run, "attrs", None) or {}
    readable = getattr(run, "records_readable", None)
    return run_findings(RunEvidence(
        complete=bool(getattr(run, "complete", True)),
        stop_reason=str(attrs.get("stop_reason", "") or ""),
        records_written=int(getattr(run, "records_written", 0) or 0),
        records_readable=None if readable is None else int(readable),
        records_dropped=dict(getattr(run, "records_dropped", {}) or {}),
        notes=tuple(getattr(run, "notes", ()) or ()),
        damage=tuple(getattr(run, "damage", ()) or ()),
    ))


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


