"""What ``dropspy inspect`` prints for a person: a table, the answer in words, the findings.

The answer line of each site ("drops whole features, per sample; the same features at every
time step") is written from the analysis' verdicts alone (axes, gates, over time, freshness,
findings), never from what a model is known to do, so on another framework version it says
that version's truth.

Layout follows the terminal: the table when it fits in full, otherwise one compact block per
site; a site name or a word is never broken across lines (long values wrap at spaces).
Everything that came from the run file is printed as :class:`rich.text.Text` through
:func:`dropspy._text.text`, never as markup.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from dropspy._text import safe, text
from dropspy.analysis import RunAnalysis, Severity, SiteAnalysis

__all__ = ["answer", "render_inspect", "records_words"]

_PLURAL = {"batch": "samples", "time": "time steps", "feature": "features",
           "channel": "channels", "height": "rows", "width": "columns", "depth": "depth slices",
           "gate": "gates"}
_SINGULAR = {"batch": "sample", "time": "time step", "feature": "feature", "channel": "channel",
             "height": "row", "width": "column", "depth": "depth slice", "gate": "gate"}

LEGEND = ("axes: [x] shared (by the noise shape), [x]* shared (observed), x? undecided, "
          "x dropped independently")

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}


def _plural(axis: str) -> str:
    return _PLURAL.get(axis, f"{axis} positions")


def _singular(axis: str) -> str:
    return _SINGULAR.get(axis, f"{axis} position")


def _and(words: Sequence[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _what_is_dropped(indep: list[str], shared: list[str]) -> list[str]:
    """Clauses about which units the mask drops and along which axes it repeats."""
    units = [a for a in indep if a != "batch"]
    spread = [a for a in shared if a != "batch"]
    if not units:
        head = "drops whole samples" if "batch" in indep else (
            "keeps or drops the whole input at once")
        return [head]
    if not spread:
        clauses = ["drops single elements, no axis shared"]
        if "batch" in shared:
            clauses = ["drops single elements, the same ones for every sample"]
        if "time" in units:
            clauses.append("a new mask at each time step")
        return clauses
    what = _plural(units[0]) if len(units) == 1 else f"({', '.join(units)}) positions"
    head = f"drops whole {what}"
    if "batch" in indep:
        head += ", per sample"
    elif "batch" in shared:
        head += ", the same for every sample"
    clauses = [head]
    if "time" in spread:
        clauses.append(f"the same {what} at every time step")
    others = [a for a in spread if a != "time"]
    if others:
        one = _singular(units[0]) if len(units) == 1 else "position"
        clauses.append(f"all {_and([_plural(a) for a in others])} of a {one} together")
    if "time" in units and units != ["time"]:
        clauses.append("a new mask at each time step")
    return clauses


def _gate_count(s: SiteAnalysis) -> int:
    gates = s.extra.get("gates") if isinstance(s.extra, dict) else None
    if isinstance(gates, (list, tuple)) and gates:
        return len(gates)
    return len(s.gate_sites) + 1


def answer(s: SiteAnalysis) -> str:
    """The site's masks in the words a person asks in, from the analysis' verdicts.

    Example: ``"drops whole features, per sample; the same features at every time step"``.
    """
    if s.opaque:
        return f"masks cannot be observed: {s.opaque}"
    if s.applied_records == 0:
        if s.records == 0:
            return "no mask was recorded"
        mode = " (all in inference mode)" if s.training_records == 0 else ""
        return f"no mask was applied in {s.records} recorded call(s){mode}"
    informative = [a for a in s.axes if a.size > 1]
    undecided = [a.name for a in informative if a.verdict == "inconclusive"]
    indep = [a.name for a in informative if a.verdict == "independent"]
    shared = [a.name for a in informative if a.verdict == "shared"]
    if undecided:
        verb = "is" if len(undecided) == 1 else "are"
        clauses = [f"too few masks to tell whether {_and(undecided)} {verb} shared"]
    else:
        clauses = _what_is_dropped(indep, shared)
    if s.gates is not None:
        n = _gate_count(s)
        clauses.append({"identical": f"one mask shared by all {n} gates",
                        "distinct": f"{n} different masks, one per gate"}.get(
            s.gates.verdict, "undecided whether the gates share a mask"))
    time_known = any(a.name == "time" for a in informative)
    if s.over_time is not None and not time_known:
        clauses.append({"constant": "the same mask at every call within a step",
                        "resampled": "a new mask at each call within a step"}.get(
            s.over_time.verdict, "undecided whether calls within a step share a mask"))
    if s.freshness is not None and s.freshness.verdict == "stale":
        clauses.append("the SAME mask at every training step (stale)")
    if any(f.code == "inference-dropout" for f in s.findings):
        clauses.append("still drops at inference")
    return "; ".join(clauses)


def records_words(s: SiteAnalysis) -> str:
    """``'8 training'``, ``'8 training + 1 eval'``, with the steps when calls repeat in a step."""
    evals = s.records - s.training_records
    words = f"{s.training_records} training" + (f" + {evals} eval" if evals else "")
    if s.records > s.steps:
        words += f", {s.steps} steps"
    return words


def _axes_text(s: SiteAnalysis) -> Text:
    t = Text()
    for k, a in enumerate(s.axes):
        if k:
            t.append(" ")
        if a.verdict == "shared":
            t.append(f"[{safe(a.name)}]" + ("" if a.by_construction else "*"), style="bold cyan")
        elif a.verdict == "inconclusive":
            t.append(f"{safe(a.name)}?", style="yellow")
        else:
            t.append(safe(a.name))
    return t


def _rate_text(s: SiteAnalysis, words: bool = False) -> Text:
    r = s.rate
    cfg = "?" if r.configured is None else f"{r.configured:g}"
    seen = "-" if r.observed is None else f"{r.observed:.3f}"
    style = {"ok": "green", "mismatch": "bold red"}.get(r.verdict, "")
    return Text(f"{cfg} set, {seen} seen" if words else f"{cfg} / {seen}", style=style)


def _verdict_text(s: SiteAnalysis) -> Text:
    bad = [f for f in s.findings if f.severity != Severity.INFO]
    if not bad:
        return Text("ok", style="green")
    codes = sorted({f.code for f in bad})
    style = "bold red" if any(f.severity == Severity.ERROR for f in bad) else "yellow"
    return Text(", ".join(codes), style=style)


def _gates_word(s: SiteAnalysis) -> str:
    if s.gates is None:
        return "-"
    n = _gate_count(s)
    return {"identical": f"1 for {n}", "distinct": f"{n} masks"}.get(s.gates.verdict, "?")


def _over_time_word(s: SiteAnalysis) -> str:
    if s.over_time is None:
        return "-"
    return {"constant": "same", "resampled": "new"}.get(s.over_time.verdict, "?")


def _fresh_word(s: SiteAnalysis) -> str:
    if s.freshness is None:
        return "-"
    return {"fresh": "yes", "stale": "NO"}.get(s.freshness.verdict, "?")


def _title(result: RunAnalysis) -> Text:
    version = f" {result.framework_version}" if result.framework_version else ""
    return text(f"{result.path or 'run'} ({result.framework}{version})", style="bold")


def _table(result: RunAnalysis) -> Table:
    # No vertical rules and no edge padding: ~20 columns narrower than a boxed table, so
    # that a typical run fits 100-120 columns.
    table = Table(title=_title(result), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("site", "class", "axes", "rate set/seen", "gates", "over time", "fresh",
                "records", "verdict"):
        table.add_column(col, no_wrap=True)
    for s in result.sites:
        if s.opaque:
            table.add_row(text(s.site), text(s.layer_class), text(" ".join(s.axis_names)),
                          "-", "-", "-", "-", "0", Text("opaque", style="yellow"))
            continue
        table.add_row(text(s.site), text(s.layer_class), _axes_text(s), _rate_text(s),
                      _gates_word(s), _over_time_word(s), _fresh_word(s), records_words(s),
                      _verdict_text(s))
    return table


def _answer_groups(sites: Sequence[SiteAnalysis]) -> list[tuple[str, str]]:
    """(site names, answer): sibling gate sites with the same answer share one line."""
    out: list[tuple[str, str, tuple[str, str] | None]] = []
    for s in sites:
        line = answer(s)
        key = (s.layer, s.role) if s.gate else None
        if out and key is not None and out[-1][2] == key and out[-1][1] == line:
            out[-1] = (f"{out[-1][0]}, {safe(s.gate)}", line, key)
        else:
            out.append((safe(s.site), line, key))
    return [(names, line) for names, line, _ in out]


def _answers(result: RunAnalysis) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column()
    for names, line in _answer_groups(result.sites):
        grid.add_row(Text(names), text(line))
    return grid


def _facts(s: SiteAnalysis) -> list[Text]:
    """``key value`` items of a block; each is kept whole on one line."""
    axes = text(" ".join(s.axis_names)) if s.opaque else _axes_text(s)
    items = [Text.assemble(("axes ", "dim"), axes)]
    if s.opaque:
        return items
    items.append(Text.assemble(("drop rate ", "dim"), _rate_text(s, words=True)))
    for key, word in (("gates", _gates_word(s)), ("over time", _over_time_word(s)),
                      ("fresh", _fresh_word(s))):
        if word != "-":
            items.append(Text.assemble((f"{key} ", "dim"), word))
    items.append(Text.assemble(("records ", "dim"), records_words(s)))
    return items


def _pack(items: Sequence[Text], width: int) -> list[Text]:
    """Lines of ``items`` joined by `` · ``, breaking only between items."""
    lines: list[Text] = []
    for item in items:
        if lines and lines[-1].cell_len + 3 + item.cell_len <= width:
            lines[-1].append(" · ", style="dim")
            lines[-1].append_text(item)
        else:
            lines.append(item.copy())
    return lines


def _block(s: SiteAnalysis, width: int) -> RenderableType:
    """One site: name, class and verdict; the answer in words; the facts."""
    head = text(s.site, style="bold")
    head.append(Text("  "))
    head.append(text(s.layer_class, style="dim"))
    head.append(Text("  "))
    head.append(Text("opaque", style="yellow") if s.opaque else _verdict_text(s))
    body = [text(answer(s)), *_pack(_facts(s), width - 2)]
    return Group(head, *(Padding(line, (0, 0, 0, 2)) for line in body))


def _empty_sentence(result: RunAnalysis) -> Text:
    dropped = {k: v for k, v in result.records_dropped.items() if v}
    filtered = dropped.get("site_filter", 0) or any(
        f.code == "note" and "left out by sites=" in f.message for f in result.findings)
    if not result.sites and filtered:
        line = ("This run holds no dropout site: the record(sites=...) patterns left every "
                "site of the model out (the sites it has are named below).")
    elif not result.sites:
        line = ("This run holds no dropout site: dropspy found no dropout in the model while "
                "it recorded (no dropout layer or call, or training did not run inside "
                "record()).")
    else:
        line = (f"This run holds {len(result.sites)} site(s) but no record: no mask was "
                f"written.")
    if dropped:
        causes = ", ".join(f"{safe(k)}: {v}" for k, v in sorted(dropped.items()))
        line += f" Records not written, by cause: {causes}."
    return Text(line, style="bold yellow")


def _natural_width(console: Console, table: Table) -> int:
    """Columns the table needs with no cell squeezed (``console.measure`` caps at the width)."""
    return Measurement.get(console, console.options.update_width(1 << 16), table).maximum


def _across_word(s: SiteAnalysis) -> Text:
    c = s.across
    if c is None:
        return Text("-")
    style = {"identical": "yellow", "partial": "yellow", "independent": "green"}.get(c.verdict,
                                                                                   "")
    return Text(f"{c.verdict} ({c.identical}/{c.pairs} same)", style=style)


def _ranks_cells(s: SiteAnalysis) -> tuple[str, str, str, str, Text]:
    """ranks, replicas, records per rank, rate per rank, same masks (in words)."""
    ranks = ",".join(str(r.rank) for r in s.ranks) or "-"
    replicas = ",".join(str(r) for r in s.replicas) or "-"
    records = " ".join(str(r.records) for r in s.ranks) or str(s.records)
    rates = " ".join("-" if r.rate_observed is None else f"{r.rate_observed:.3f}"
                     for r in s.ranks) or "-"
    return ranks, replicas, records, rates, _across_word(s)


def _ranks_title(result: RunAnalysis) -> Text:
    files = ", ".join(f"rank {m.rank}" if m.error is None else f"{safe(m.path)} unreadable"
                      for m in result.members)
    return Text(f"Ranks: {files}" if files else "Replicas", style="bold")


def _ranks_table(result: RunAnalysis) -> Table:
    """Per site: the ranks and replicas present, records and drop rate per rank, and whether
    ranks/replicas drew the same masks."""
    table = Table(title=_ranks_title(result), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("site", "ranks", "replicas", "records/rank", "rate/rank", "same masks"):
        table.add_column(col, no_wrap=True)
    for s in result.sites:
        table.add_row(text(s.site), *_ranks_cells(s))
    return table


def _print_ranks(result: RunAnalysis, console: Console) -> None:
    table = _ranks_table(result)
    if _natural_width(console, table) <= console.width:
        console.print(table)
        return
    # Too narrow: one block per site, broken only between items.
    console.print(_ranks_title(result))
    for s in result.sites:
        ranks, replicas, records, rates, same = _ranks_cells(s)
        items = [Text.assemble(("ranks ", "dim"), ranks),
                 Text.assemble(("replicas ", "dim"), replicas),
                 Text.assemble(("records/rank ", "dim"), records),
                 Text.assemble(("rate/rank ", "dim"), rates),
                 Text.assemble(("same masks ", "dim"), same)]
        console.print(text(s.site, style="bold"))
        for line in _pack(items, console.width - 2):
            console.print(Padding(line, (0, 0, 0, 2)))


def render_inspect(result: RunAnalysis, console: Console, *, verbose: bool = False) -> None:
    """Print the report of ``result`` for a person, laid out for ``console``'s width.

    Args:
        result: The run's analysis.
        console: Where to print; its width picks table or blocks.
        verbose: Also list info findings (always listed for a run without records).
    """
    empty = sum(s.records for s in result.sites) == 0
    if empty:
        console.print(_title(result))
        console.print(_empty_sentence(result))
    else:
        table = _table(result)
        if _natural_width(console, table) <= console.width:
            console.print(table)
            console.print(Text(LEGEND, style="dim"))
            console.print()
            console.print(Text("In words:", style="bold"))
            console.print(_answers(result))
        else:
            # Too narrow for the table: rich would break names and words inside cells.
            console.print(_title(result))
            for s in result.sites:
                console.print(_block(s, console.width))
            console.print(Text(LEGEND, style="dim"))
    if result.members or any(site.across is not None for site in result.sites):
        console.print()
        _print_ranks(result, console)
    for f in result.all_findings:
        if f.severity == Severity.INFO and not (verbose or empty):
            continue
        where = f"{f.site}: " if f.site else ""
        console.print(text(f"{f.severity.value}: {where}{f.message} [{f.code}]",
                           style=_STYLE[f.severity]))
