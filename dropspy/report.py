"""The analysis as plain data: :class:`~dropspy.analysis.RunAnalysis` <-> JSON.

The JSON form is what ``dropspy inspect --json`` prints; it is valid against
``schemas/report.schema.json`` and turns back into the same ``RunAnalysis`` with
:func:`from_dict`, so a report saved in CI can be checked or diffed later without the run file.

Example:
    >>> text = to_json(analyze_run(dropspy.load("run.h5")))   # doctest: +SKIP
    >>> from_json(text).sites[0].pattern                       # doctest: +SKIP
    'time-shared'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import resources
from typing import Any

from dropspy._version import __version__
from dropspy.analysis import (
    AxisVerdict,
    Finding,
    Member,
    PairCheck,
    RankSite,
    RateEstimate,
    RunAnalysis,
    Severity,
    SiteAnalysis,
)
from dropspy.errors import ReportError

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "to_dict",
    "to_json",
    "from_dict",
    "from_json",
    "load_schema",
]

REPORT_FORMAT = "dropspy.report"
REPORT_VERSION = 1


def load_schema(name: str = "report") -> dict[str, Any]:
    """A JSON Schema shipped with dropspy: ``report``, ``expectations``, ``run`` or ``summary``."""
    text = resources.files("dropspy").joinpath(f"schemas/{name}.schema.json").read_text("utf-8")
    return json.loads(text)


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _finding(f: Finding) -> dict[str, Any]:
    return {"code": f.code, "severity": str(f.severity), "message": f.message, "site": f.site,
            "data": json.loads(json.dumps(dict(f.data), default=str))}


def _pair(p: PairCheck | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {"verdict": p.verdict, "pairs": p.pairs, "identical": p.identical,
            "log10_chance": _num(p.log10_chance), "source": p.source}


def _site(s: SiteAnalysis) -> dict[str, Any]:
    r = s.rate
    return {
        "site": s.site,
        "layer": s.layer,
        "layer_class": s.layer_class,
        "role": s.role,
        "gate": s.gate,
        "axes": list(s.axis_names),
        "shared_axes": list(s.shared_axes),
        "independent_axes": list(s.independent_axes),
        "inconclusive_axes": list(s.inconclusive_axes),
        "axis_verdicts": [
            {"name": a.name, "verdict": a.verdict, "by_construction": a.by_construction,
             "size": a.size, "log10_chance": _num(a.log10_chance), "reason": a.reason}
            for a in s.axes
        ],
        "pattern": s.pattern,
        "rate_configured": _num(r.configured),
        "rate_observed": _num(r.observed),
        "rate_interval": None if r.low is None else [_num(r.low), _num(r.high)],
        "rate_confidence": r.confidence,
        "rate_verdict": r.verdict,
        "rate_elements": r.elements,
        "rate_effective_elements": r.effective_elements,
        "records": s.records,
        "training_records": s.training_records,
        "applied_records": s.applied_records,
        "steps": s.steps,
        "opaque": s.opaque,
        "gates": _pair(s.gates),
        "gate_sites": list(s.gate_sites),
        "over_time": _pair(s.over_time),
        "freshness": _pair(s.freshness),
        "severity": None if s.severity is None else str(s.severity),
        "findings": [_finding(f) for f in s.findings],
        "replicas": list(s.replicas),
        "across": _pair(s.across),
        "ranks": [{"rank": r.rank, "records": r.records, "rate_observed": _num(r.rate_observed),
                   "replicas": list(r.replicas)} for r in s.ranks],
        "facts": {
            "noise_shape": None if s.noise_shape is None else list(s.noise_shape),
            "scale": _num(s.scale),
            "extra": json.loads(json.dumps(dict(s.extra), default=str)),
        },
    }


def to_dict(analysis: RunAnalysis) -> dict[str, Any]:
    """The analysis as JSON-able data, valid against ``schemas/report.schema.json``.

    Args:
        analysis: The result of :func:`dropspy.analysis.analyze_run`.

    Returns:
        A dict of plain lists, strings, numbers, booleans and None.
    """
    every = analysis.all_findings
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "dropspy_version": __version__,
        "path": analysis.path,
        "framework": analysis.framework,
        "framework_version": analysis.framework_version,
        "complete": analysis.complete,
        "records_written": analysis.records_written,
        "records_dropped": {k: int(v) for k, v in analysis.records_dropped.items()},
        "threshold": analysis.threshold,
        "confidence": analysis.confidence,
        "summary": {sev.value: sum(1 for f in every if f.severity == sev) for sev in Severity},
        "findings": [_finding(f) for f in analysis.findings],
        "members": [{"path": m.path, "rank": m.rank, "world_size": m.world_size,
                     "records": m.records, "complete": m.complete, "error": m.error}
                    for m in analysis.members],
        "sites": [_site(s) for s in analysis.sites],
    }


def to_json(analysis: RunAnalysis, *, indent: int | None = 2) -> str:
    """The analysis as a JSON string (see :func:`to_dict`)."""
    return json.dumps(to_dict(analysis), indent=indent, allow_nan=False)


def _finding_from(d: Mapping[str, Any]) -> Finding:
    return Finding(d["code"], Severity(d["severity"]), d["message"], d.get("site"),
                   dict(d.get("data") or {}))


def _pair_from(d: Mapping[str, Any] | None) -> PairCheck | None:
    if d is None:
        return None
    return PairCheck(d["verdict"], d["pairs"], d["identical"], d.get("log10_chance"), d["source"])


def _site_from(d: Mapping[str, Any]) -> SiteAnalysis:
    interval = d.get("rate_interval") or [None, None]
    rate = RateEstimate(d["rate_configured"], d["rate_observed"], interval[0], interval[1],
                        d.get("rate_confidence", 0.999), d.get("rate_elements", 0),
                        d.get("rate_effective_elements", 0), d.get("rate_verdict", "unknown"))
    facts = d.get("facts") or {}  # reports written before dropspy carried site facts lack it
    axes = tuple(AxisVerdict(a["name"], a["verdict"], a["by_construction"], a["size"],
                             a.get("log10_chance"), a["reason"]) for a in d["axis_verdicts"])
    return SiteAnalysis(
        site=d["site"], layer=d["layer"], layer_class=d["layer_class"], role=d["role"],
        gate=d.get("gate"), axes=axes, pattern=d["pattern"], rate=rate, records=d["records"],
        training_records=d.get("training_records", 0), applied_records=d.get("applied_records", 0),
        steps=d["steps"], opaque=d.get("opaque"), gates=_pair_from(d.get("gates")),
        gate_sites=tuple(d.get("gate_sites", ())), over_time=_pair_from(d.get("over_time")),
        freshness=_pair_from(d.get("freshness")),
        findings=tuple(_finding_from(f) for f in d.get("findings", ())),
        noise_shape=None if facts.get("noise_shape") is None else tuple(facts["noise_shape"]),
        scale=facts.get("scale"), extra=dict(facts.get("extra") or {}),
        replicas=tuple(d.get("replicas", ())), across=_pair_from(d.get("across")),
        ranks=tuple(RankSite(r["rank"], r["records"], r.get("rate_observed"),
                             tuple(r.get("replicas", ()))) for r in d.get("ranks", ())),
    )


def from_dict(data: Mapping[str, Any]) -> RunAnalysis:
    """Rebuild a :class:`RunAnalysis` from :func:`to_dict` output.

    Raises:
        ReportError: ``data`` is not a dropspy report of a known version.
    """
    if data.get("format") != REPORT_FORMAT:
        raise ReportError(
            f"Not a dropspy report: 'format' is {data.get('format')!r}, expected {REPORT_FORMAT!r}"
        )
    if data.get("format_version") != REPORT_VERSION:
        raise ReportError(
            f"Unsupported report format_version {data.get('format_version')!r}; this dropspy "
            f"reads version {REPORT_VERSION}"
        )
    try:
        return RunAnalysis(
            path=data.get("path"), framework=data.get("framework", "unknown"),
            framework_version=data.get("framework_version", ""),
            complete=data.get("complete", True), records_written=data.get("records_written", 0),
            records_dropped=dict(data.get("records_dropped") or {}),
            threshold=data["threshold"], confidence=data["confidence"],
            sites=tuple(_site_from(s) for s in data["sites"]),
            findings=tuple(_finding_from(f) for f in data.get("findings", ())),
            members=tuple(Member(m["path"], m.get("rank"), m.get("world_size"),
                                 m.get("records", 0), m.get("complete", False), m.get("error"))
                          for m in data.get("members", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"Malformed dropspy report: {type(exc).__name__}: {exc}") from exc


def from_json(text: str) -> RunAnalysis:
    """Rebuild a :class:`RunAnalysis` from :func:`to_json` output."""
    return from_dict(json.loads(text))
