"""Assertions on recorded masks, and a pytest plugin that records a model inside a test.

The helpers fail with an ``AssertionError`` that states expected vs observed for every
property that does not hold (as ``torch.testing.assert_close`` does), using the same rules as
``dropspy check`` (:mod:`dropspy.expectations`).

This module is a pytest plugin (entry point ``pytest11: dropspy``): importing it imports no
framework; the ``dropspy_record`` fixture imports the recorder, and through it the model's
framework adapter, only when a test calls it.

Example:
    >>> def test_spatial_dropout_shares_time(dropspy_record):          # doctest: +SKIP
    ...     with dropspy_record(model) as rec:
    ...         model.fit(x, y, epochs=1, verbose=0)
    ...     assert_mask_structure(rec.path, "spatial_dropout1d", shared=["time"], rate=0.3)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dropspy.analysis import (
    THRESHOLD,
    RunAnalysis,
    Severity,
    SiteAnalysis,
    analyze_run,
    select_sites,
)
from dropspy.errors import SiteNotFoundError
from dropspy.expectations import Expectation, check_site

# The fixture needs pytest; the assertion helpers do not. ``dropspy.testing`` is reachable from
# a plain script (``import dropspy; dropspy.testing.assert_...``), which must not pay for
# importing pytest: the fixture is defined only when pytest is already loaded, as it always is
# when pytest loads this module as its plugin (entry point ``pytest11: dropspy``).
pytest: Any = sys.modules.get("pytest")

__all__ = [
    "analyze",
    "assert_mask_structure",
    "assert_rate",
    "assert_fresh",
    "assert_no_findings",
    "assert_no_inference_dropout",
    "Recorder",
    "RecordedRun",
    "dropspy_record",
]

RunLike = Any  # a Run, a path to a run file, a RunAnalysis, or a MemoryRun


def analyze(run: RunLike, *, sites: str | Sequence[str] | None = None,
            threshold: float = THRESHOLD) -> RunAnalysis:
    """The :class:`RunAnalysis` of ``run``, which may be a path, a Run or an analysis already."""
    if isinstance(run, RunAnalysis):
        return run
    from dropspy.runset import opened

    with opened(run) as r:
        return analyze_run(r, sites=sites, threshold=threshold)


def _sites(run: RunLike, site: str) -> tuple[RunAnalysis, list[SiteAnalysis]]:
    """The analysis and the matching sites; a pattern that matches nothing fails the test."""
    __tracebackhide__ = True
    names = list(run.site_names) if isinstance(run, RunAnalysis) else _names(run)
    try:
        select_sites(names, site)
    except SiteNotFoundError as exc:
        raise AssertionError(f"dropspy: {exc}") from None
    result = analyze(run, sites=site)
    return result, [result[n] for n in select_sites(result.site_names, site)]


def _names(run: RunLike) -> list[str]:
    from dropspy.runset import opened

    with opened(run) as r:
        return list(getattr(r, "sites", None) or list(r.keys()))


def assert_mask_structure(
    run: RunLike,
    site: str,
    *,
    shared: Sequence[str] | None = None,
    independent: Sequence[str] | None = None,
    pattern: str | None = None,
    rate: float | None = None,
    tol: float | None = None,
    gates: str | None = None,
    over_time: str | None = None,
    fresh: bool | None = None,
    ranks: str | None = None,
) -> SiteAnalysis:
    """Assert the recorded masks of ``site`` have the given structure.

    Every argument left None is not checked. ``site`` may be a glob; every matching site
    must satisfy the expectation.

    Args:
        run: A :class:`dropspy.store.Run`, a run set, a path to either, or a
            :class:`RunAnalysis`.
        site: Site name or glob.
        shared: Exactly the shared axes (every other axis of size > 1 must be independent).
        independent: Axes that must be independent.
        pattern: One-word pattern, e.g. ``"time-shared"``.
        rate: Expected drop rate: inside the 99.9% interval of the observed rate, or within
            ``tol`` of it.
        tol: Absolute tolerance for ``rate``.
        gates: ``"identical"`` or ``"distinct"``.
        over_time: ``"constant"`` or ``"resampled"``.
        fresh: True: a new mask every step; False: stale.
        ranks: ``"independent"`` or ``"identical"``: masks of different ranks/replicas at
            the same step and call (a run set, or replicas in one file).

    Returns:
        The :class:`SiteAnalysis` of the (first) matching site, for further checks.

    Raises:
        AssertionError: A property does not hold; the message lists each with expected
            and observed values.
        ExpectationError: The arguments themselves are invalid.
    """
    __tracebackhide__ = True
    exp = Expectation(site=site, shared=None if shared is None else tuple(shared),
                      independent=None if independent is None else tuple(independent),
                      pattern=pattern, rate=rate, tol=tol, gates=gates, over_time=over_time,
                      fresh=fresh, ranks=ranks)
    _, matched = _sites(run, site)
    lines = []
    for s in matched:
        problems = check_site(exp, s)
        if problems:
            lines.append(f"Mask structure mismatch at site {s.site!r} ({s.layer_class}, axes "
                         f"{', '.join(s.axis_names)}):")
            lines += [f"  {p}" for p in problems]
    if lines:
        raise AssertionError("\n".join(lines))
    return matched[0]


def assert_rate(run: RunLike, site: str, rate: float, *, tol: float | None = None) -> SiteAnalysis:
    """Assert the observed drop rate of ``site`` is consistent with ``rate`` (see above)."""
    __tracebackhide__ = True
    return assert_mask_structure(run, site, rate=rate, tol=tol)


def assert_fresh(run: RunLike, site: str = "*") -> None:
    """Assert every matching site draws a new mask at every step (no stale masks)."""
    __tracebackhide__ = True
    _, matched = _sites(run, site)
    stale = [(s.site, s.freshness) for s in matched
             if s.freshness is not None and s.freshness.verdict == "stale"]
    if stale:
        raise AssertionError("Stale masks (identical to the previous step's):\n" + "\n".join(
            f"  {name}: freshness: expected fresh, observed stale "
            f"({check.identical} of {check.pairs} step pairs identical)"
            for name, check in stale))


def assert_no_findings(run: RunLike, severity: str = "error", *,
                       ignore: Sequence[str] = ()) -> None:
    """Assert the analysis has no finding of ``severity`` or worse.

    Args:
        run: See :func:`assert_mask_structure`.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        ignore: Finding codes to leave out, e.g. ``["opaque"]``.
    """
    __tracebackhide__ = True
    floor = Severity(severity).rank
    result = analyze(run)
    bad = [f for f in result.all_findings if f.severity.rank >= floor and f.code not in ignore]
    if bad:
        raise AssertionError(
            f"Expected no {severity} findings (or worse), observed {len(bad)}:\n" + "\n".join(
                f"  {f.severity.value}: {f.site + ': ' if f.site else ''}{f.message} [{f.code}]"
                for f in bad))


def assert_no_inference_dropout(run: RunLike) -> None:
    """Assert no record made with training=False dropped anything."""
    __tracebackhide__ = True
    result = analyze(run)
    bad = [f for f in result.all_findings if f.code == "inference-dropout"]
    if bad:
        raise AssertionError("Expected dropout off at inference, observed:\n" + "\n".join(
            f"  {f.site}: {f.message}" for f in bad))


class RecordedRun:
    """A recording made by the ``dropspy_record`` fixture; a context manager.

    Attributes:
        path: The run file.
        recording: The underlying :class:`dropspy.recorder.Recording` while active.
    """

    def __init__(self, model: Any, path: Path, kwargs: dict[str, Any]) -> None:
        self.model = model
        self.path = path
        self._kwargs = kwargs
        self.recording: Any = None
        self._run: Any = None

    def __enter__(self) -> RecordedRun:
        from dropspy.recorder import record  # imports the framework adapter only now

        self.recording = record(self.model, self.path, **self._kwargs)
        self.recording.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.recording.__exit__(*exc)

    @property
    def run(self) -> Any:
        """The run file, opened for reading (kept open until the fixture's teardown)."""
        if self._run is None:
            from dropspy.runset import load

            self._run = load(self.path)
        return self._run

    def analysis(self, **kwargs: Any) -> RunAnalysis:
        """The :class:`RunAnalysis` of the recorded run."""
        return analyze_run(self.run, **kwargs)

    def close(self) -> None:
        """Close the run file if it was opened."""
        if self._run is not None:
            self._run.close()
            self._run = None


class Recorder:
    """What the ``dropspy_record`` fixture returns: call it to record a model into tmp_path."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.recordings: list[RecordedRun] = []

    def __call__(self, model: Any, name: str = "run.h5", **kwargs: Any) -> RecordedRun:
        """A :class:`RecordedRun` recording ``model`` into ``<tmp_path>/<name>``.

        Args:
            model: The Keras or torch model.
            name: File name inside the test's temporary directory.
            **kwargs: Passed to :func:`dropspy.record` (every, steps, sites, ...).
        """
        rec = RecordedRun(model, self.directory / name, kwargs)
        self.recordings.append(rec)
        return rec

    def close(self) -> None:
        """Close every run file opened through the recordings."""
        for rec in self.recordings:
            rec.close()


def _fixture(tmp_path: Path) -> Iterator[Recorder]:
    """Record a model inside a test: ``with dropspy_record(model) as rec: ...``; then
    ``rec.path``, ``rec.run`` and ``rec.analysis()``. Files go to the test's ``tmp_path``."""
    recorder = Recorder(tmp_path)
    yield recorder
    recorder.close()


if pytest is not None:
    dropspy_record = pytest.fixture(name="dropspy_record")(_fixture)
else:  # a plain script: no pytest, no fixture
    dropspy_record = None


def pytest_configure(config: Any) -> None:
    """Register the plugin's marker."""
    config.addinivalue_line(
        "markers", "dropspy: test records dropout masks with the dropspy_record fixture")
