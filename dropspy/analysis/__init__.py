"""What the recorded masks say: axis sharing, rates, gates, timesteps, freshness, inference.

Pure numpy: no I/O beyond the reader API of :class:`dropspy.store.Site`, no printing. Every
result is a frozen dataclass (:mod:`.results`); every problem is a :class:`Finding` made by
one rule of :mod:`.rules`. The analysis streams each site's records once, so memory stays
bounded whatever the size of the run.

- :mod:`.results`: the result types.
- :mod:`.site`: per-site verdicts (axes, pattern, rate, freshness, over time).
- :mod:`.rules`: one rule function per finding, and the :data:`~.rules.FINDINGS` table.
- :mod:`.run`: a whole run, with the gate comparison.
- :mod:`.diff`: two runs compared.
- :mod:`.memory`: sites and runs held in memory.
- :mod:`.summary`: the small, mergeable per-file summary a scan leaves.
- :mod:`.runset`: summaries of one file or of a run set's ranks merged into one report.
- :mod:`.copies`: records compared across ranks and replicas.

Example:
    >>> run = dropspy.load("run.h5")                      # doctest: +SKIP
    >>> result = analyze_run(run)                          # doctest: +SKIP
    >>> result["spatial_dropout1d"].shared_axes            # doctest: +SKIP
    ('time',)
"""

from __future__ import annotations

from dropspy.analysis.diff import diff
from dropspy.analysis.memory import MemoryRun, MemorySite
from dropspy.analysis.results import (
    CONFIDENCE,
    PATTERNS,
    THRESHOLD,
    AxisVerdict,
    Finding,
    Member,
    PairCheck,
    RankSite,
    RateEstimate,
    RunAnalysis,
    Severity,
    SiteAnalysis,
    SiteDifference,
)
from dropspy.analysis.rules import FINDINGS
from dropspy.analysis.run import analyze_run
from dropspy.analysis.runset import RunSetError, analyze_summaries, summarize_run
from dropspy.analysis.site import analyze_masks, analyze_site
from dropspy.records import select_sites

__all__ = [
    "THRESHOLD",
    "CONFIDENCE",
    "PATTERNS",
    "FINDINGS",
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
    "RunSetError",
    "summarize_run",
    "analyze_summaries",
    "analyze_site",
    "analyze_run",
    "analyze_masks",
    "select_sites",
    "diff",
    "MemorySite",
    "MemoryRun",
]
