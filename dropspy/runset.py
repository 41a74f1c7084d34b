"""Run sets: the files of one training run across ranks, read and analysed as one run.

A distributed run leaves one file per rank (``run.rank0.h5``, ``run.rank1.h5``...). A set is
named by a directory, a glob (``'run.rank*.h5'``), or the run's base name when rank siblings
exist (``run.h5`` -> ``run.rank*.h5``). :func:`dropspy.load` gives a :class:`RunSet` for
those: a mapping of site name to :class:`SetSite` (the site's records of every rank), with
per-rank access (``runset.rank(1)``, ``site.rank(1)``).

Analysis is per file and mergeable (:mod:`dropspy.analysis.runset`): :func:`analyze_files`
summarises the files in parallel processes, then merges. A file that cannot be read is left
out and named; files of different runs are refused unless ``force=True``.

:func:`load` (``dropspy.load``) lives here, not in :mod:`dropspy.store`: it opens a file or a
set, so it needs both, while the single-file reader needs nothing of sets (no import circle).
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dropspy.analysis.results import CONFIDENCE, THRESHOLD, RunAnalysis
from dropspy.analysis.runset import analyze_summaries, different_runs, summarize_run
from dropspy.analysis.summary import RunSummary
from dropspy.errors import DropspyError, RunSetError, SiteNotFoundError
from dropspy.store import Run

__all__ = ["load", "opened", "RunSet", "SetSite", "resolve_set", "analyze_files", "summarize_file",
           "summarize_files", "summary_json", "read_summary", "RunSetError"]

_GLOB = set("*?[")


def resolve_set(spec: str | os.PathLike[str]) -> list[Path] | None:
    """The files of the run set ``spec`` names, or None when it names one run file.

    A directory: its ``*.h5`` files. A pattern with ``*``, ``?`` or ``[``: the files it
    matches. A path that does not exist but whose rank siblings do (``run.h5`` with
    ``run.rank0.h5``...): those. Anything else: None (a single file, or a missing one, which
    the reader reports).

    Raises:
        RunSetError: A directory with no run file, or a pattern that matches nothing.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.h5") if p.is_file())
        if not files:
            raise RunSetError(f"{path}: is a directory with no run files (*.h5) in it")
        return files
    if path.exists():
        return None
    if _GLOB & set(text):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        if not files:
            raise RunSetError(f"{text}: no file matches")
        return files
    siblings = sorted(p for p in path.parent.glob(f"{glob.escape(path.stem)}.rank*{path.suffix}")
                      if p.is_file())
    return siblings or None


class SetSite:
    """One site over the ranks of a run set: the reader API over all ranks' records, in rank
    order, plus per-rank access.

    Attributes mirror :class:`dropspy.store.Site` (facts from the lowest rank that has the
    site); ``record_ranks`` gives each record's rank.
    """

    def __init__(self, name: str, parts: Sequence[tuple[int, Any]]) -> None:
        self.name = name
        self._parts = list(parts)
        first = self._parts[0][1]
        for attr in ("layer", "layer_class", "role", "gate", "axes", "rate", "scale",
                     "noise_shape", "opaque", "extra"):
            setattr(self, attr, getattr(first, attr, None))
        self._starts = np.cumsum([0] + [len(s) for _, s in self._parts])

    @property
    def ranks(self) -> tuple[int, ...]:
        """Ranks whose files have this site."""
        return tuple(r for r, _ in self._parts)

    def rank(self, rank: int) -> Any:
        """This site in one rank's file (a :class:`dropspy.store.Site`)."""
        for r, s in self._parts:
            if r == rank:
                return s
        raise SiteNotFoundError(f"site {self.name!r} has no records of rank {rank}; ranks: "
                                f"{', '.join(map(str, self.ranks))}")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"<SetSite {self.name!r} ranks={self.ranks} records={len(self)}>"

    def _cat(self, attr: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(s, attr)) for _, s in self._parts])

    @property
    def steps(self) -> np.ndarray:
        return self._cat("steps")

    @property
    def calls(self) -> np.ndarray:
        return self._cat("calls")

    @property
    def training(self) -> np.ndarray:
        return self._cat("training")

    @property
    def applied(self) -> np.ndarray:
        return self._cat("applied")

    @property
    def shapes(self) -> np.ndarray:
        return self._cat("shapes")

    @property
    def noise_shapes(self) -> np.ndarray:
        return self._cat("noise_shapes")

    @property
    def replicas(self) -> np.ndarray:
        return self._cat("replicas")

    @property
    def record_ranks(self) -> np.ndarray:
        """The rank of each record."""
        return np.concatenate([np.full(len(s), r, np.int64) for r, s in self._parts])

    def _locate(self, i: int) -> tuple[Any, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Site {self.name!r}: record {i} out of range (it has {n} records)")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._parts[k][1], i - int(self._starts[k])

    def noise(self, i: int) -> np.ndarray | None:
        """The drawn keep-noise of record ``i`` (records numbered across ranks, rank order)."""
        site, j = self._locate(i)
        return site.noise(j)  # type: ignore[no-any-return]

    def mask(self, i: int) -> np.ndarray | None:
        """The applied keep-mask of record ``i`` (records numbered across ranks)."""
        site, j = self._locate(i)
        return site.mask(j)  # type: ignore[no-any-return]

    def masks(self, step: int, call: int | None = None,
              rank: int | None = None) -> list[np.ndarray | None]:
        """Applied masks of one step (optionally one call, one rank), in rank order."""
        out: list[np.ndarray | None] = []
        for r, s in self._parts:
            if rank is None or r == rank:
                out.extend(s.masks(step, call))
        return out


class RunSet(Mapping[str, SetSite]):
    """The files of one run's ranks, opened for reading as one run.

    A read-only mapping of site name to :class:`SetSite`. Files that cannot be read are left
    out and listed in :attr:`unreadable`; :meth:`report` names them in its findings.

    Args:
        paths: The files.
        force: Accept files that look like different runs (the report still says so).

    Raises:
        RunSetError: No file is readable, or the files are of different runs (without
            ``force``).
    """

    #: Lets :func:`dropspy.analysis.analyze_run` and the testing helpers tell a set apart.
    is_run_set = True

    def __init__(self, paths: Sequence[str | os.PathLike[str]], *, force: bool = False) -> None:
        self.paths = [Path(p) for p in paths]
        self.force = force
        self.unreadable: list[tuple[str, str]] = []
        runs = []
        for p in self.paths:
            try:
                runs.append(Run(p))
            except (DropspyError, OSError) as exc:
                self.unreadable.append((str(p), str(exc)))
        if not runs:
            raise RunSetError("no readable run file in the set ("
                              + "; ".join(why for _, why in self.unreadable) + ")")
        self.runs = sorted(runs, key=lambda r: (_rank(r.attrs), str(r.path)))
        self.different = different_runs([(str(r.path), r.attrs) for r in self.runs])
        if self.different and not force:
            self.close()
            raise RunSetError("the files are not one run's ranks: " + "; ".join(self.different)
                              + ". Give the files of one run, or force=True (--force) to "
                              "merge them anyway")
        names: list[str] = []
        for r in self.runs:
            names.extend(n for n in r.sites if n not in names)
        self._names = names
        self.path = self.paths[0].parent if self.paths else None

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks of the readable files, in order."""
        return tuple(_rank(r.attrs) for r in self.runs)

    def rank(self, rank: int) -> Any:
        """One rank's file (a :class:`dropspy.store.Run`)."""
        for r in self.runs:
            if _rank(r.attrs) == rank:
                return r
        raise SiteNotFoundError(f"the set has no file of rank {rank}; ranks: "
                                f"{', '.join(map(str, self.ranks))}")

    @property
    def sites(self) -> tuple[str, ...]:
        """Names of the sites of every rank, in first-seen order."""
        return tuple(self._names)

    @property
    def framework(self) -> str:
        return self.runs[0].framework  # type: ignore[no-any-return]

    def __getitem__(self, name: str) -> SetSite:
        parts = [(_rank(r.attrs), r[name]) for r in self.runs if name in r.sites]
        if not parts:
            raise SiteNotFoundError(f"No site {name!r} in the run set. Sites: "
                                    f"{', '.join(self._names) or '(none)'}")
        return SetSite(name, parts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"<RunSet ranks={self.ranks} sites={len(self)} unreadable={len(self.unreadable)}>"

    def report(self, *, sites: str | Sequence[str] | None = None,
               threshold: float = THRESHOLD, confidence: float = CONFIDENCE) -> RunAnalysis:
        """The set analysed as one run (``dropspy inspect`` on the set)."""
        summaries = [summarize_run(r, sites=sites) for r in self.runs]
        return analyze_summaries(summaries, sites=sites, threshold=threshold,
                                 confidence=confidence, as_set=True,
                                 unreadable=self.unreadable, force=self.force)

    def close(self) -> None:
        """Close every file."""
        for r in self.runs:
            r.close()

    def __enter__(self) -> RunSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rank(attrs: Mapping[str, Any]) -> int:
    try:
        return int(attrs.get("rank", 0))
    except (TypeError, ValueError):
        return 0


def summarize_file(path: str | os.PathLike[str], sites: Sequence[str] | None = None,
                   max_bytes: int = 16 << 20,
                   progress: Callable[[int], None] | None = None) -> RunSummary:
    """Open one run file, summarise it (see :func:`dropspy.analysis.summarize_run`), close."""
    with Run(path) as run:
        return summarize_run(run, sites=sites, max_bytes=max_bytes, progress=progress)


def _summarize_or_error(path: str, sites: Sequence[str] | None,
                        max_bytes: int) -> RunSummary | tuple[str, str]:
    try:
        return summarize_file(path, sites, max_bytes)
    except (DropspyError, OSError) as exc:
        return (path, str(exc))


def summarize_files(paths: Sequence[str | os.PathLike[str]], *, jobs: int | None = None,
                    sites: Sequence[str] | None = None, max_bytes: int = 16 << 20
                    ) -> tuple[list[RunSummary], list[tuple[str, str]]]:
    """Summaries of the readable files, and ``(path, why)`` of the others.

    With ``jobs`` > 1 (default: the CPU count) and several files, files are summarised in
    that many processes; memory is one file's bound times the jobs.
    """
    names = [os.fspath(p) for p in paths]
    jobs = os.cpu_count() or 1 if jobs is None else max(1, jobs)
    if jobs == 1 or len(names) == 1:
        results = [_summarize_or_error(p, sites, max_bytes) for p in names]
    else:
        import multiprocessing

        # A fresh interpreter per worker: forking a process that holds HDF5 state is unsafe.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(names)), mp_context=ctx) as pool:
            results = list(pool.map(_summarize_or_error, names, [sites] * len(names),
                                    [max_bytes] * len(names)))
    good = [r for r in results if isinstance(r, RunSummary)]
    bad = [r for r in results if not isinstance(r, RunSummary)]
    return good, bad


def analyze_files(paths: Sequence[str | os.PathLike[str]], *, jobs: int | None = None,
                  sites: Sequence[str] | None = None, threshold: float = THRESHOLD,
                  confidence: float = CONFIDENCE, force: bool = False,
                  summaries: Sequence[RunSummary] = (),
                  unreadable: Sequence[tuple[str, str]] = ()) -> RunAnalysis:
    """The files (and ready summaries) of a run set analysed as one run.

    Raises:
        RunSetError: Nothing readable, or files of different runs without ``force``.
        SiteNotFoundError: A pattern in ``sites`` matches no site in any file.
    """
    good, bad = summarize_files(paths, jobs=jobs, sites=sites) if paths else ([], [])
    return analyze_summaries(list(summaries) + good, sites=sites, threshold=threshold,
                             confidence=confidence, as_set=True,
                             unreadable=list(unreadable) + bad, force=force)


def summary_json(summary: RunSummary) -> str:
    """A file's summary as JSON (what ``dropspy inspect --summary`` prints)."""
    import json

    from dropspy.analysis.summary import to_dict

    return json.dumps(to_dict(summary), separators=(",", ":"), allow_nan=False)


def read_summary(path: str | os.PathLike[str]) -> RunSummary:
    """A summary written by ``dropspy inspect --summary``.

    Raises:
        ReportError: The file is not a dropspy summary, or is malformed.
        OSError: It cannot be read.
    """

    from dropspy._h5read import loads
    from dropspy.analysis.summary import from_dict
    from dropspy.errors import ReportError

    if not Path(path).is_file():  # a FIFO would block the read
        raise ReportError(f"{path}: not a regular file, expected a summary (.json)")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = loads(text, 1 << 30)  # nesting and numbers bounded, as in run files
    except ValueError as exc:
        raise ReportError(f"{path}: not JSON: {exc}") from None
    try:
        return from_dict(data)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None


def set_or_run(spec: str | os.PathLike[str], *, force: bool = False) -> Any:
    """What :func:`dropspy.load` opens: a :class:`RunSet` for a set, else a ``Run``."""
    files = resolve_set(spec)
    if files is None:
        return Run(spec)
    return RunSet(files, force=force)


def load(path: str | os.PathLike[str], *, force: bool = False) -> Any:
    """Open a run file, or the files of a run set, for reading.

    Args:
        path: A run file written by :func:`dropspy.record`; or a run set: a directory, a
            glob (``"run.rank*.h5"``), or a run's base name whose rank files exist
            (``"run.h5"`` when ``run.rank0.h5``... are there).
        force: For a set, merge files that look like different runs.

    Returns:
        The :class:`dropspy.store.Run`, a read-only mapping of site names to sites; for a
        set, a :class:`RunSet` (sites merge the ranks; ``.rank(r)`` gives one).

    Raises:
        RunFileError: The path is missing, not a file, not HDF5, not a run, of a newer
            format version, or damaged; a glob matches nothing; no file of a set is
            readable; the files are of different runs (without ``force``). The message
            names the path and the problem.
    """
    return set_or_run(path, force=force)


@contextlib.contextmanager
def opened(run: Any) -> Iterator[Any]:
    """``run`` itself, or, for a path, the run file (or run set) loaded for the ``with`` block
    and closed.

    The one place where "a path or a run" is turned into a run (testing helpers, the CLI).
    """
    if isinstance(run, (str, os.PathLike)):
        with load(run) as r:
            yield r
    else:
        yield run
