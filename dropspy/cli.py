"""The ``dropspy`` command: inspect, check, diff, plot and validate run files.

A thin layer: every command calls library functions that return data, then prints. Errors
the user can fix (a missing file, a bad pattern, a malformed expectation) are one line on
stderr and exit status 2, never a traceback.

Exit status: 0 success; 1 a check failed / runs differ / file invalid; 2 usage or file error.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dropspy._text import safe, text
from dropspy.analysis import (
    THRESHOLD,
    RunAnalysis,
    Severity,
    analyze_run,
    diff,
)
from dropspy.analysis.rules import FINDINGS
from dropspy.errors import DropspyError
from dropspy.records import site_matches

__all__ = ["app", "main"]

app = typer.Typer(
    name="dropspy",
    help="Inspect the dropout masks recorded in a dropspy run file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Show a progress bar only when there is enough mask data for the wait to be noticeable.
_PROGRESS_BYTES = 64 << 20

RunPath = Annotated[Path, typer.Argument(help="Run file written by dropspy.record.",
                                         show_default=False)]
SiteOpt = Annotated[Optional[list[str]], typer.Option(
    "--site", "-s", help="Only sites matching this glob (repeatable).")]
RunSpecs = Annotated[list[str], typer.Argument(
    help="Run file, or a run set: several files, a directory, a glob ('run.rank*.h5'), a "
         "run's base name whose rank files exist, or summaries (*.json) from --summary.",
    show_default=False)]
JobsOpt = Annotated[Optional[int], typer.Option(
    "--jobs", "-j", min=1, help="Processes analysing the files of a set (default: CPU count).")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Merge files that look like different runs (the report still says so).")]
ThresholdOpt = Annotated[float, typer.Option(
    help="Largest chance of coincidence that still lets a structure be claimed.",
    min=1e-300, max=0.5)]


T = TypeVar("T")


class _UserError(Exception):
    """An error the user can fix: printed as one line, exit status 2."""


def _out() -> Console:
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        # A pipe or a CI log with no width given: do not squeeze the table to 80 columns.
        console = Console(highlight=False, width=200, soft_wrap=False)
    return console


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (DropspyError, _UserError, OSError) as exc:
        _die(str(exc))
    except Exception:
        # Anything else is dropspy's own fault, not the user's: say so, with the traceback.
        typer.echo("dropspy: internal error: this is a bug in dropspy; please report it with "
                   "the traceback below.", err=True)
        raise


def _isolated(fn: Callable[[], T], what: str) -> T:
    """``fn()``, which reads run files, in a child process (:mod:`dropspy._isolate`).

    A file that crashes or hangs the HDF5 library itself then ends the command with one line
    naming it (exit 2), never a dead or frozen process.
    """
    from dropspy._isolate import call

    if not Console(stderr=True).is_terminal:
        return call(fn, what)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    # The child's analysis reports the bytes it read; the bar is drawn here, where the
    # terminal (or a test runner's stream) is.
    bar = Progress("analysing", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    task: list[Any] = []

    def show(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task("masks", total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        return call(fn, what, show)
    finally:
        if task:
            bar.stop()


def _die(message: str, code: int = 2) -> None:
    line = safe(" ".join(message.split()))
    typer.echo(f"dropspy: error: {line}", err=True)
    raise typer.Exit(code=code)


def _load(path: Path) -> Any:
    from dropspy.runset import load

    return load(path)


def _analyze(run: Any, sites: list[str] | None, threshold: float) -> RunAnalysis:
    from dropspy.analysis import select_sites

    names = select_sites(list(run.sites), sites)
    # The stored bytes, not the index: the bar must not cost a read of every record's row.
    total = sum(int(getattr(run[n], "stored_bytes", 0)) for n in names)
    if total < _PROGRESS_BYTES:
        return analyze_run(run, sites=sites, threshold=threshold)
    from dropspy._isolate import progress

    advance = progress(total)  # in the isolated child: the parent draws the bar
    if advance is not None:
        return analyze_run(run, sites=sites, threshold=threshold, progress=advance)
    err = Console(stderr=True)
    if not err.is_terminal:
        return analyze_run(run, sites=sites, threshold=threshold)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress("analysing", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("masks", total=total)
        return analyze_run(run, sites=sites, threshold=threshold,
                           progress=lambda nb: bar.advance(task, nb))


def _report(specs: list[str], sites: list[str] | None, threshold: float,
            jobs: int | None = None, force: bool = False) -> RunAnalysis:
    """The report of what the arguments name: one run file, or a run set (files, a glob, a
    directory, a base name with rank siblings, per-file summaries)."""
    from dropspy.analysis import analyze_summaries
    from dropspy.errors import ReportError
    from dropspy.runset import read_summary, resolve_set, summarize_files

    files: list[str] = []
    summaries = []
    unreadable: list[tuple[str, str]] = []
    as_set = len(specs) > 1
    for spec in specs:
        if spec.endswith(".json"):
            try:
                summaries.append(read_summary(spec))
            except (ReportError, OSError) as exc:
                unreadable.append((spec, str(exc)))
            continue
        members = resolve_set(spec)
        if members is None:
            files.append(spec)
        else:
            files.extend(str(m) for m in members)
            as_set = True
    if not as_set and files:
        with _load(Path(files[0])) as run:
            return _analyze(run, sites, threshold)
    if not as_set and summaries:
        return analyze_summaries(summaries, sites=sites, threshold=threshold, as_set=False)
    good, bad = summarize_files(files, jobs=jobs, sites=sites) if files else ([], [])
    return analyze_summaries(summaries + good, sites=sites, threshold=threshold, as_set=True,
                             unreadable=unreadable + bad, force=force)


def _unreadable_members(result: RunAnalysis) -> bool:
    return any(m.error for m in result.members)


@app.command()
def inspect(
    paths: RunSpecs,
    site: SiteOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.",
                                          metavar="")] = False,
    summary: Annotated[bool, typer.Option(
        "--summary", metavar="",
        help="Print one file's small mergeable summary as JSON instead of a report; "
             "'inspect a.json b.json ...' combines summaries into the set's report.")] = False,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    threshold: ThresholdOpt = THRESHOLD,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", metavar="",
                                          help="Also list info findings.")] = False,
) -> None:
    """Every site: its axes (shared ones marked), rates, verdicts and the answer in words.

    A table when the terminal is wide enough, otherwise one block per site. A run set gets
    one report, with each rank's records and rates; exit 1 when a file of the set could not
    be read (the report names it), 2 when none could.
    """
    if summary:
        from dropspy.runset import summarize_file, summary_json

        with _errors():
            if len(paths) != 1 or paths[0].endswith(".json"):
                raise _UserError(f"--summary takes one run file, got {len(paths)} argument(s): "
                                 f"{' '.join(paths)}; run it where each file lies")
            typer.echo(_isolated(lambda: summary_json(summarize_file(paths[0], site or None)),
                                 paths[0]))
        return
    with _errors():
        result = _isolated(lambda: _report(paths, site or None, threshold, jobs, force),
                           " ".join(paths))
    code = 1 if _unreadable_members(result) else 0
    if as_json:
        from dropspy.report import to_json

        typer.echo(to_json(result))
        raise typer.Exit(code=code)
    from dropspy.render import render_inspect

    render_inspect(result, _out(), verbose=verbose)
    raise typer.Exit(code=code)


@app.command()
def check(
    paths: RunSpecs,
    expect: Annotated[Optional[list[str]], typer.Option(
        "--expect", "-e",
        help="'SITE: shared=time,batch rate=0.3 ...' (repeatable). Keys: shared, independent, "
             "pattern, rate, tol, gates, over_time, fresh, ranks.")] = None,
    spec: Annotated[Optional[Path], typer.Option(
        help="Expectations file (TOML or JSON, schemas/expectations.schema.json).")] = None,
    fail_on_errors: Annotated[Optional[bool], typer.Option(
        "--fail-on-errors/--no-fail-on-errors",
        help="Also fail on error findings (stale masks, dropout at inference, rate "
             "mismatch). Default: on, or the spec file's fail_on_errors.")] = None,
    allow_incomplete: Annotated[bool, typer.Option(
        "--allow-incomplete",
        help="Pass on incomplete evidence (a run not closed cleanly, records unreadable or "
             "left out of a damaged file): still listed, as notes.")] = False,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    threshold: ThresholdOpt = THRESHOLD,
) -> None:
    """Exit 0 when every expectation holds, 1 when any fails, 2 on usage or file errors.

    A gate never passes silently on evidence it could not see: a killed run, unreadable
    records or a damaged file fail the check unless ``--allow-incomplete``; with nothing to
    check (no --expect, no --spec, no --fail-on-errors) it exits 2.
    """
    from dropspy.expectations import check_analysis, load_spec, parse_expectation

    with _errors():
        exps = [parse_expectation(e) for e in expect or ()]
        spec_fail = True
        if spec is not None:
            loaded = load_spec(spec)
            exps += loaded.expectations
            spec_fail = loaded.fail_on_errors
        result = _isolated(lambda: _report(paths, None, threshold, jobs, force),
                           " ".join(paths))
        if not exps and fail_on_errors is not True:
            # A CI gate whose expectations went missing must fail, not pass on nothing.
            raise _UserError("nothing to check: give --expect 'SITE: ...', --spec FILE, "
                             "or --fail-on-errors to check the error findings alone")
        names = list(result.site_names)
        for e in exps:
            # A pattern naming no site is a mistake in the expectation (or a renamed
            # layer): a usage error, not a verdict about the masks.
            if not any(site_matches(e.site, n) for n in names):
                raise _UserError(f"expectation {e.text or e.site!r}: no site matches "
                                 f"{e.site!r}; sites: {', '.join(names) or '(none)'}")
    fail_errors = spec_fail if fail_on_errors is None else fail_on_errors
    failures = check_analysis(result, exps)
    incomplete = [f for f in result.all_findings if f.code in _INCOMPLETE]
    errors = [f for f in result.all_findings
              if f.severity == Severity.ERROR and f.code not in _INCOMPLETE]
    for f in failures:
        typer.echo(safe(f"FAIL {f}"))
    failed_exps = {id(f.expectation) for f in failures}
    for e in exps:
        if id(e) not in failed_exps:
            typer.echo(safe(f"ok   {e.text or e.site}"))
    for error in errors:
        prefix = "FAIL" if fail_errors else "note"
        where = f"{error.site}: " if error.site else ""
        typer.echo(safe(f"{prefix} {where}{error.message} [{error.code}]"))
    for missing in incomplete:
        prefix = "note" if allow_incomplete else "FAIL"
        typer.echo(safe(f"{prefix} incomplete evidence: {missing.message} [{missing.code}]"))
    for finding in result.all_findings:
        if finding.code == "records-dropped":  # said, not failed: the file counts them exactly
            typer.echo(safe(f"note {finding.message} [{finding.code}]"))
    failed = (bool(failures) or (fail_errors and bool(errors))
              or (bool(incomplete) and not allow_incomplete))
    n_err = len(errors) if fail_errors else 0
    tail = ""
    if incomplete:
        tail = ", evidence incomplete" + ("" if allow_incomplete else
                                          " (--allow-incomplete to accept)")
    typer.echo(f"{'FAILED' if failed else 'PASSED'}: {len(exps) - len(failed_exps)}/{len(exps)} "
               f"expectations hold, {n_err} error finding(s){tail}")
    raise typer.Exit(code=1 if failed else 0)


# Findings that say the analysis saw less than the run recorded: `check` fails on them
# unless --allow-incomplete (a CI gate must not pass on evidence it could not see).
_INCOMPLETE = frozenset(row.code for row in FINDINGS if row.incomplete)


@app.command(name="diff")
def diff_cmd(
    a: Annotated[str, typer.Argument(help="First run file or run set (a glob, a directory, "
                                          "a base name with rank files).", show_default=False)],
    b: Annotated[str, typer.Argument(help="Second run file or run set.", show_default=False)],
    site: SiteOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print differences as JSON.",
                                             metavar="")] = False,
    facts: Annotated[bool, typer.Option(
        "--facts/--no-facts",
        help="Also compare what the adapters stated about each site (noise shape, scale, "
             "masks drawn and applied per call...).")] = True,
    jobs: JobsOpt = None,
    force: ForceOpt = False,
    threshold: ThresholdOpt = THRESHOLD,
) -> None:
    """Site by site, where two runs' mask structure (and site facts) differ. Exit 1 when they do.

    Either side can be a run set: its verdicts are those over all its ranks.
    """
    with _errors():
        ra, rb = _isolated(lambda: (_report([a], None, threshold, jobs, force),
                                    _report([b], None, threshold, jobs, force)), f"{a} {b}")
        chosen = _present(site, ra, rb)
    diffs = [d for d in diff(ra, rb, facts=facts) if chosen is None or d.site in chosen]
    header = f"A = {a} ({_framework(ra)})   B = {b} ({_framework(rb)})"
    if as_json:
        typer.echo(json.dumps([{"site": d.site, "aspect": d.aspect, "a": d.a, "b": d.b}
                               for d in diffs], indent=2))
    elif not diffs:
        typer.echo(safe(header))
        what = "mask structure or site facts" if facts else "mask structure"
        typer.echo(f"no differences in {what} ({len(ra.sites)} sites)")
    else:
        table = Table(title=text(header), title_justify="left")
        for col in ("site", "aspect", "A", "B"):
            table.add_column(col, overflow="fold")
        for d in diffs:
            # Text, not markup: fact values such as [null, 1, null] would be read as tags.
            table.add_row(*(text(v) for v in (d.site, d.aspect, d.a, d.b)))
        _out().print(table)
    raise typer.Exit(code=1 if diffs else 0)


def _framework(analysis: RunAnalysis) -> str:
    return f"{analysis.framework} {analysis.framework_version or 'version unknown'}"


def _present(patterns: list[str] | None, a: RunAnalysis, b: RunAnalysis) -> set[str] | None:
    """The sites a diff's patterns select; each pattern must match in one of the two runs."""
    if not patterns:
        return None
    names = list(a.site_names) + [n for n in b.site_names if n not in a]
    chosen: set[str] = set()
    for p in patterns:
        hit = {n for n in names if site_matches(p, n)}
        if not hit:
            raise _UserError(f"no site matches {p!r} in either run")
        chosen |= hit
    return chosen


@app.command()
def plot(
    path: Annotated[str, typer.Argument(help="Run file or run set.", show_default=False)],
    site: Annotated[str, typer.Option("--site", "-s", help="Site name (or a glob matching one).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")],
    step: Annotated[Optional[int], typer.Option(help="Step to show (default: the first).")] = None,
    call: Annotated[Optional[int], typer.Option(
        help="Call within the step (default 0); without --step, the first record of that "
             "call.")] = None,
    samples: Annotated[int, typer.Option(help="Samples (batch rows) to show.", min=1, max=16)] = 4,
    rank: Annotated[Optional[int], typer.Option(
        help="For a run set: the rank whose record to show (default: the lowest).")] = None,
    force: ForceOpt = False,
) -> None:
    """Image of one record's applied mask (named axes) and keep rate along each axis."""
    with _errors():
        try:
            from dropspy.plot import png_path
        except ImportError as exc:
            raise _UserError(f"plot needs matplotlib (pip install 'dropspy[plot]'): {exc}") from exc
        try:
            png_path(output)  # refused before the file is read
        except ValueError as exc:
            raise _UserError(str(exc)) from None
        written = _isolated(lambda: _plot(path, site, output, step, call, samples, rank, force),
                            path)
    typer.echo(safe(f"wrote {written}"))


def _plot(path: str, site: str, output: Path, step: int | None, call: int | None,
          samples: int, rank: int | None, force: bool) -> Any:
    """Load the run (set) and draw one record: what ``plot`` does in its child process."""
    from dropspy.plot import plot_site
    from dropspy.runset import load

    with load(path, force=force) as loaded:
        from dropspy.analysis import select_sites
        from dropspy.runset import RunSet

        if isinstance(loaded, RunSet):
            run = loaded.rank(loaded.ranks[0] if rank is None else rank)
        elif rank is not None and int(loaded.attrs.get("rank", 0)) != rank:
            raise _UserError(f"--rank {rank}: {path} holds rank "
                             f"{loaded.attrs.get('rank', 0)} (give the run set)")
        else:
            run = loaded
        names = select_sites(list(run.sites), site)
        if len(names) != 1:
            raise _UserError(f"--site {site!r} matches {len(names)} sites "
                             f"({', '.join(names)}); give one")
        return plot_site(run, names[0], output, step=step, call=call, samples=samples)


@app.command()
def validate(path: RunPath) -> None:
    """Check the file against schemas/run.schema.json. Exit 1 when it has problems."""
    from dropspy.store import validate_file

    with _errors():
        problems = _isolated(lambda: validate_file(path), str(path))
    for p in problems:
        typer.echo(safe(p))
    if problems:
        typer.echo(f"{path}: {len(problems)} problem(s)")
        raise typer.Exit(code=1)
    typer.echo(f"{path}: valid run file")


def main() -> None:
    """Entry point of the ``dropspy`` console script.

    Usage errors (a missing argument, an unknown option) are one line on stderr with exit
    status 2, like every other error, instead of click's boxed usage text.
    """
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        # typer vendors click, so its exception classes are matched by what they offer.
        kind = type(exc).__name__
        if kind == "Abort":
            typer.echo("dropspy: aborted", err=True)
            raise SystemExit(1) from None
        fmt = getattr(exc, "format_message", None)
        status = getattr(exc, "exit_code", None)
        if fmt is None or not isinstance(status, int):
            raise
        if kind != "NoArgsIsHelpError":  # the help text was printed already
            typer.echo(f"dropspy: error: {' '.join(str(fmt()).split())} (see dropspy --help)",
                       err=True)
        raise SystemExit(status) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
