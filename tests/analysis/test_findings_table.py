"""The findings table is one list: FINDINGS in analysis/rules.py, docs/analysis.md, the schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dropspy.analysis.results import Severity
from dropspy.analysis.rules import FINDINGS

ROOT = Path(__file__).resolve().parents[2]


def _docs_table(text: str | None = None) -> dict[str, str]:
    """code -> severity from the table under '## Findings' in docs/analysis.md."""
    if text is None:
        text = (ROOT / "docs" / "analysis.md").read_text(encoding="utf-8")
    section = text.split("\n## Findings\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue  # the header, the rule line, prose
        for code in re.findall(r"`([^`]+)`", cells[0]):
            assert code not in rows, f"{code} has two rows in docs/analysis.md"
            rows[code] = cells[1]
    return rows


def _report_schema() -> dict:
    return json.loads((ROOT / "dropspy" / "schemas" / "report.schema.json").read_text())


def _code_schema(schema: dict) -> dict:
    """The schema of a finding's ``code`` (wherever the report schema defines findings)."""
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and "code" in props and "severity" in props:
                found.append(props["code"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert found, "the report schema defines no finding with a code"
    return found[0]


def test_every_finding_code_is_listed_once_in_the_table():
    codes = [row.code for row in FINDINGS]
    assert len(codes) == len(set(codes)), codes
    assert all(row.severity in tuple(Severity) for row in FINDINGS)


def test_docs_list_the_same_findings_with_the_same_severities():
    table = {row.code: row.severity.value for row in FINDINGS}
    docs = _docs_table()
    assert sorted(set(docs) - set(table)) == [], "in docs/analysis.md, not in FINDINGS"
    assert sorted(set(table) - set(docs)) == [], "in FINDINGS, not in docs/analysis.md"
    assert {c: docs[c] for c in table} == table


def test_the_report_schema_accepts_every_finding_code():
    code = _code_schema(_report_schema())
    if "enum" in code:
        assert sorted(code["enum"]) == sorted(row.code for row in FINDINGS)
    else:
        pattern = re.compile(code["pattern"])
        for row in FINDINGS:
            assert pattern.fullmatch(row.code), row.code


def test_the_report_schema_names_the_same_severities():
    severity = None

    def walk(node: object) -> None:
        nonlocal severity
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and "code" in props and "severity" in props:
                severity = severity or props["severity"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(_report_schema())
    assert severity is not None and sorted(severity["enum"]) == sorted(s.value for s in Severity)


def test_the_docs_parser_reads_a_planted_table():
    # The comparison above is only as good as the parser: it must see every row and code.
    planted = ("# x\n\n## Findings\n\nprose `not-a-code`\n\n| code | severity | when |\n"
               "|---|---|---|\n| `a-b` | error | when `c` |\n| `d`, `e` | info | |\n\n"
               "## Next\n\n| `f` | warning | outside the section |\n")
    assert _docs_table(planted) == {"a-b": "error", "d": "info", "e": "info"}
    assert len(_docs_table()) == len(FINDINGS) >= 10
