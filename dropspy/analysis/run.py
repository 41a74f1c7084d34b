"""A whole run: every selected site, the gate comparison between sibling sites, run findings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dropspy.analysis.results import CONFIDENCE, THRESHOLD, RunAnalysis
from dropspy.analysis.runset import analyze_summaries, summarize_run
from dropspy.analysis.site import check_args
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
            reader API. A run set (``dropspy.load`` of several files) has its own
            ``report()``. The analysis does no I/O of its own: open a path with
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
    if getattr(run, "is_run_set", False):
        # A run set's ranks are summarised file by file, then merged (dropspy.runset).
        return run.report(sites=sites, threshold=threshold,  # type: ignore[no-any-return]
                          confidence=confidence)
    if sites is not None:  # a pattern must match here (by name or layer); all sites need none
        names = list(getattr(run, "sites", None) or list(run.keys()))
        select_sites(names, sites, {n: getattr(run[n], "layer", n) for n in names})
    summary = summarize_run(run, sites=sites, max_bytes=max_bytes, progress=progress)
    return analyze_summaries([summary], sites=sites, threshold=threshold,
                             confidence=confidence, as_set=False,
                             path=None if getattr(run, "path", None) is None else str(run.path))
