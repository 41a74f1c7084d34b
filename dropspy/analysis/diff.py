"""Comparing two runs' analyses site by site."""

from __future__ import annotations

import json
import math
from typing import Any

from dropspy.analysis.results import RunAnalysis, Severity, SiteAnalysis, SiteDifference

__all__ = ["diff"]


def diff(a: RunAnalysis, b: RunAnalysis, *, facts: bool = False) -> list[SiteDifference]:
    """Where two runs' mask structure differs, site by site.

    Compares presence, axis names, each axis verdict, pattern, observed rate (intervals that
    do not overlap), gates, over-time and freshness verdicts, masks across ranks/replicas
    (``across``), and error findings.

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
        if (ra.low is not None and rb.low is not None and ra.high is not None
                and rb.high is not None and (ra.high < rb.low or rb.high < ra.low)):
            out.append(SiteDifference(n, "rate", f"{ra.observed:.4g}", f"{rb.observed:.4g}"))
        for aspect in ("gates", "over_time", "freshness", "across"):
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


