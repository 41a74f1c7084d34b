"""Expectations about mask structure: parsed from strings or spec files, checked on analyses.

One place for the rules that both ``dropspy check`` and ``dropspy.testing`` apply, so that a
CI gate and a unit test can never disagree about what "shared=time rate=0.3" means. (Kept out
of ``report.py``: parsing user input and judging it is a different concept from serialising.)

Semantics:
    - ``shared=time,batch``: exactly these axes are shared: each is ``shared``, and every
      other axis of size > 1 is ``independent`` (``inconclusive`` fails: a gate must be sure).
      ``shared=`` or ``shared=none`` means no axis is shared.
    - ``independent=feature``: each listed axis is ``independent``.
    - ``pattern=time-shared``: the site's one-word pattern.
    - ``rate=0.3``: the *observed* drop rate is consistent with 0.3 (its confidence interval
      contains 0.3), or within ``tol`` of it when ``tol=`` is given.
    - ``gates=identical|distinct``, ``over_time=constant|resampled``, ``fresh=true|false``.
    - ``ranks=identical|independent``: records of different ranks/replicas at the same step
      and call (a run set, or replicas in one file).
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dropspy.analysis import RunAnalysis, SiteAnalysis, select_sites
from dropspy.errors import ExpectationError, SiteNotFoundError

__all__ = [
    "Expectation",
    "Spec",
    "Failure",
    "parse_expectation",
    "expectation_from_mapping",
    "load_spec",
    "check_site",
    "check_analysis",
]

_KEYS = ("shared", "independent", "pattern", "rate", "tol", "gates", "over_time", "fresh",
         "ranks")
_CHOICES = {"gates": ("identical", "distinct"), "over_time": ("constant", "resampled"),
            "ranks": ("identical", "independent")}
_TRUE = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class Expectation:
    """What the masks of the sites matching ``site`` must look like (None: not checked).

    Attributes:
        site: Site name or glob pattern.
        shared: Exactly the shared axes.
        independent: Axes that must be independent.
        pattern: Expected one-word pattern.
        rate: Expected drop rate.
        tol: Absolute tolerance on the rate (default: the confidence interval decides).
        gates: ``identical`` or ``distinct``.
        over_time: ``constant`` or ``resampled``.
        fresh: True for a new mask every step, False for a stale one.
        ranks: ``identical`` or ``independent`` masks across ranks/replicas.
        text: The expectation as the user wrote it.
    """

    site: str
    shared: tuple[str, ...] | None = None
    independent: tuple[str, ...] | None = None
    pattern: str | None = None
    rate: float | None = None
    tol: float | None = None
    gates: str | None = None
    over_time: str | None = None
    fresh: bool | None = None
    ranks: str | None = None
    text: str = ""

    def __post_init__(self) -> None:
        where = f"Invalid expectation {self.text or self.site!r}"
        if not self.site:
            raise ExpectationError(f"{where}: empty site pattern")
        for key in ("rate", "tol"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float))
                                          and not isinstance(value, bool)
                                          and math.isfinite(value) and 0 <= value <= 1):
                raise ExpectationError(
                    f"{where}: expected {key} to be a number between 0 and 1. "
                    f"Received: {key}={value!r}")
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise ExpectationError(
                    f"{where}: expected {key} to be one of {', '.join(allowed)}. "
                    f"Received: {key}={value!r}")
        if self.tol is not None and self.rate is None:
            raise ExpectationError(f"{where}: tol= is given without rate=")
        if all(getattr(self, k) is None for k in _KEYS):
            raise ExpectationError(
                f"{where}: nothing to check; give at least one of {', '.join(_KEYS)}")


@dataclass(frozen=True)
class Spec:
    """A spec file: expectations and whether error findings fail the check."""

    expectations: tuple[Expectation, ...]
    fail_on_errors: bool = True


@dataclass(frozen=True)
class Failure:
    """An expectation that does not hold at one site (``site`` None: no site matched)."""

    expectation: Expectation
    site: str | None
    problems: tuple[str, ...]

    def __str__(self) -> str:
        head = (f"site {self.site!r}" if self.site is not None
                else f"pattern {self.expectation.site!r}")
        what = self.expectation.text or self.expectation.site
        return f"{head} ({what}): " + "; ".join(self.problems)


def _axes(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [] if value.strip().lower() in ("", "none", "-") else value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ExpectationError(
            f"{where}: expected {key} to be a list of axis names or a comma-separated string. "
            f"Received: {key}={value!r}")
    out = tuple(s.strip() for s in items)
    if any(not s or not re.fullmatch(r"[A-Za-z_][\w-]*", s) for s in out):
        raise ExpectationError(f"{where}: bad axis name in {key}={value!r}")
    return out


def expectation_from_mapping(data: Mapping[str, Any], text: str = "") -> Expectation:
    """Build an :class:`Expectation` from a mapping (one entry of a spec file).

    Raises:
        ExpectationError: Unknown keys or bad values (the message says which).
    """
    where = f"Invalid expectation {text or dict(data)!r}"
    unknown = sorted(set(data) - set(_KEYS) - {"site"})
    if unknown:
        raise ExpectationError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected site and any of "
            f"{', '.join(_KEYS)}")
    site = data.get("site")
    if not isinstance(site, str) or not site:
        raise ExpectationError(
            f"{where}: expected a site name or glob pattern. Received: site={site!r}")
    kw: dict[str, Any] = {"site": site, "text": text}
    for key in ("shared", "independent"):
        if key in data:
            kw[key] = _axes(data[key], key, where)
    for key in ("rate", "tol"):
        if key in data:
            value = data[key]
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ExpectationError(
                        f"{where}: expected {key} to be a number. Received: {key}={data[key]!r}"
                    ) from None
            kw[key] = value
    for key in ("pattern", "gates", "over_time", "ranks"):
        if key in data:
            if not isinstance(data[key], str):
                raise ExpectationError(
                    f"{where}: expected {key} to be a string. Received: {data[key]!r}")
            kw[key] = data[key]
    if "fresh" in data:
        value = data["fresh"]
        if isinstance(value, str):
            if value.lower() not in _TRUE:
                raise ExpectationError(
                    f"{where}: expected fresh=true or fresh=false. Received: {value!r}")
            value = _TRUE[value.lower()]
        if not isinstance(value, bool):
            raise ExpectationError(
                f"{where}: expected fresh to be true or false. Received: {value!r}")
        kw["fresh"] = value
    return Expectation(**kw)


def parse_expectation(text: str) -> Expectation:
    """Parse ``'SITE: key=value key=value ...'``.

    The site is everything before the first colon followed by a space (patterns such as
    ``shared:height,width`` in values keep their colon). Keys: shared, independent, pattern,
    rate, tol, gates, over_time (or over-time), fresh, ranks.

    Example:
        >>> parse_expectation("lstm/input/*: shared=time rate=0.3").shared
        ('time',)

    Raises:
        ExpectationError: The string is malformed (the message shows what was received).
    """
    m = re.match(r"^\s*(?P<site>.+?):(?:\s+(?P<rest>.*))?$", text)
    if m is None or not m.group("site").strip():
        raise ExpectationError(
            f"Invalid expectation {text!r}: expected 'SITE: key=value ...', e.g. "
            f"'spatial_dropout1d: shared=time rate=0.3'")
    data: dict[str, Any] = {"site": m.group("site").strip()}
    for token in (m.group("rest") or "").split():
        key, eq, value = token.partition("=")
        key = key.replace("-", "_")
        if not eq:
            raise ExpectationError(
                f"Invalid expectation {text!r}: expected key=value, found {token!r}")
        if key in data:
            raise ExpectationError(f"Invalid expectation {text!r}: {key} given twice")
        data[key] = value
    return expectation_from_mapping(data, text=text.strip())


_MAX_SPEC_BYTES = 1 << 20


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read a spec file (TOML or JSON, by suffix; ``schemas/expectations.schema.json``).

    TOML form::

        fail_on_errors = true
        [[expect]]
        site = "spatial_dropout1d"
        shared = ["time"]
        rate = 0.3

    Raises:
        ExpectationError: The file is missing, unparsable, or an entry is malformed.
    """
    from dropspy._h5read import loads

    p = Path(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SPEC_BYTES:
            # A FIFO would block the read; a spec is a few lines.
            raise ExpectationError(f"{p}: expected a spec file (a regular file of at most "
                                   f"{_MAX_SPEC_BYTES} bytes)")
        raw = p.read_bytes()
    except OSError as exc:
        raise ExpectationError(f"{p}: cannot read spec file: {exc.strerror or exc}") from exc
    try:
        if p.suffix.lower() == ".json":
            data = loads(raw.decode("utf-8"), _MAX_SPEC_BYTES)  # nesting bounded
        else:
            data = _toml(raw.decode("utf-8"))
    except RecursionError:
        raise ExpectationError(f"{p}: not valid TOML: nested too deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise ExpectationError(f"{p}: not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExpectationError(
            f"{p}: expected a table/object at the top, found {type(data).__name__}")
    unknown = sorted(set(data) - {"expect", "fail_on_errors"})
    if unknown:
        raise ExpectationError(
            f"{p}: unknown key(s) {', '.join(unknown)}; expected expect, fail_on_errors")
    entries = data.get("expect")
    if (not isinstance(entries, list) or not entries
            or not all(isinstance(e, dict) for e in entries)):
        raise ExpectationError(f"{p}: expected a non-empty list 'expect' of tables/objects")
    fail = data.get("fail_on_errors", True)
    if not isinstance(fail, bool):
        raise ExpectationError(
            f"{p}: expected fail_on_errors to be true or false. Received: {fail!r}")
    exps = []
    for i, entry in enumerate(entries):
        try:
            exps.append(expectation_from_mapping(entry, text=f"{p.name}: expect[{i}]"))
        except ExpectationError as exc:
            raise ExpectationError(f"{p}: {exc}") from exc
    return Spec(tuple(exps), fail)


def _toml(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def _fmt(axes: Iterable[str]) -> str:
    return "{" + ", ".join(axes) + "}"


def check_site(exp: Expectation, site: SiteAnalysis) -> list[str]:
    """Problems of one site against one expectation, each 'what: expected X, observed Y'."""
    problems: list[str] = []
    names = site.axis_names
    for key in ("shared", "independent"):
        listed = getattr(exp, key)
        for axis in listed or ():
            if axis not in names:
                problems.append(f"{key}: site has no axis {axis!r} (its axes: {', '.join(names)})")
    if problems:
        return problems
    if exp.shared is not None:
        want = set(exp.shared)
        wrong = [a for a in site.axes
                 if (a.name in want and a.verdict != "shared")
                 or (a.name not in want and a.size > 1 and a.verdict != "independent")]
        if wrong:
            detail = ", ".join(f"{a.name} is {a.verdict}" for a in wrong)
            problems.append(f"shared axes: expected {_fmt(exp.shared)}, observed "
                            f"{_fmt(site.shared_axes)} ({detail})")
    if exp.independent is not None:
        wrong = [site.axis(n) for n in exp.independent if site.axis(n).verdict != "independent"]
        if wrong:
            problems.append(f"independent axes: expected {_fmt(exp.independent)} independent, "
                            f"observed " + ", ".join(f"{a.name} {a.verdict}" for a in wrong))
    if exp.pattern is not None and site.pattern != exp.pattern:
        problems.append(f"pattern: expected {exp.pattern}, observed {site.pattern}")
    if exp.rate is not None:
        r = site.rate
        if r.observed is None:
            problems.append(f"rate: expected {exp.rate:g}, observed none (no masks recorded)")
        elif exp.tol is not None:
            if abs(r.observed - exp.rate) > exp.tol + 1e-12:
                problems.append(f"rate: expected {exp.rate:g} +- {exp.tol:g}, "
                                f"observed {r.observed:.4g}")
        elif (r.low is not None and r.high is not None
              and not (r.low - 1e-12 <= exp.rate <= r.high + 1e-12)):
            problems.append(f"rate: expected {exp.rate:g}, observed {r.observed:.4g} "
                            f"({r.confidence:.1%} interval {r.low:.4g}-{r.high:.4g})")
    for key in ("gates", "over_time"):
        want = getattr(exp, key)
        if want is not None:
            got = getattr(site, key)
            observed = "n/a (nothing to compare)" if got is None else got.verdict
            if got is None or got.verdict != want:
                problems.append(f"{key}: expected {want}, observed {observed}")
    if exp.ranks is not None:
        got = site.across
        if got is None or got.verdict != exp.ranks:
            observed = ("n/a (one rank and replica)" if got is None
                        else f"{got.verdict} ({got.identical} of {got.pairs} identical)")
            problems.append(f"ranks: expected {exp.ranks}, observed {observed}")
    if exp.fresh is not None:
        fresh = "fresh" if exp.fresh else "stale"
        got = site.freshness
        if got is None or got.verdict != fresh:
            observed = "n/a (fewer than two steps)" if got is None else got.verdict
            problems.append(f"freshness: expected {fresh}, observed {observed}")
    return problems


def check_analysis(analysis: RunAnalysis, expectations: Sequence[Expectation]) -> list[Failure]:
    """Every expectation against every site it matches.

    Returns:
        The failures; empty when every expectation holds. A pattern that matches no site is a
        failure too.
    """
    failures: list[Failure] = []
    names = analysis.site_names
    for exp in expectations:
        try:
            matched = select_sites(names, exp.site)
        except SiteNotFoundError:
            failures.append(Failure(exp, None, (
                f"no site matches; sites: {', '.join(names) or '(none)'}",)))
            continue
        for name in matched:
            problems = check_site(exp, analysis[name])
            if problems:
                failures.append(Failure(exp, name, tuple(problems)))
    return failures
