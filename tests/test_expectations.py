"""Expectation strings and spec files: parsing, errors, and judging analyses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dropspy.analysis import MemoryRun, MemorySite, analyze_run
from dropspy.errors import ExpectationError
from dropspy.expectations import (
    Expectation,
    check_analysis,
    check_site,
    load_spec,
    parse_expectation,
)
from dropspy.report import load_schema

AXES3 = ("batch", "time", "feature")


def test_parse_expectation_reads_every_key():
    e = parse_expectation("lstm/input/*: shared=time,batch independent=feature "
                          "pattern=shared:batch,time rate=0.3 tol=0.02 gates=distinct "
                          "over-time=constant fresh=true")
    assert e == Expectation(site="lstm/input/*", shared=("time", "batch"),
                            independent=("feature",), pattern="shared:batch,time", rate=0.3,
                            tol=0.02, gates="distinct", over_time="constant", fresh=True,
                            text=e.text)


@pytest.mark.parametrize("text", ["x: shared=", "x: shared=none"])
def test_empty_shared_means_no_shared_axis(text):
    assert parse_expectation(text).shared == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no colon here", "expected 'SITE: key=value"),
        ("x: rate=abc", "expected rate to be a number. Received: rate='abc'"),
        ("x: rate=1.5", "between 0 and 1. Received: rate=1.5"),
        ("x: colour=red", "unknown key(s) colour"),
        ("x: gates=some", "one of identical, distinct. Received: gates='some'"),
        ("x: fresh=maybe", "fresh=true or fresh=false"),
        ("x: rate", "expected key=value, found 'rate'"),
        ("x:", "nothing to check"),
        ("x: tol=0.1", "tol= is given without rate="),
        ("x: shared=ti me", "expected key=value"),
        ("x: rate=0.1 rate=0.2", "rate given twice"),
    ],
)
def test_bad_expectation_strings_say_what_was_received(text, message):
    with pytest.raises(ExpectationError) as info:
        parse_expectation(text)
    assert message in str(info.value)


def _analysis():
    rng = np.random.default_rng(0)
    return analyze_run(MemoryRun([
        MemorySite("spatial", AXES3, [rng.random((16, 1, 32)) >= 0.3 for _ in range(3)],
                   rate=0.3, shapes=[(16, 10, 32)] * 3),
        MemorySite("plain", AXES3, [rng.random((16, 10, 32)) >= 0.3 for _ in range(3)], rate=0.3),
    ]))


def test_check_site_passes_the_true_structure_and_states_both_sides_otherwise():
    a = _analysis()
    every = parse_expectation("spatial: shared=time rate=0.3 fresh=true "
                              "pattern=time-shared over_time=constant")
    assert check_site(every, a["spatial"]) == []
    problems = check_site(parse_expectation("plain: shared=time rate=0.5"), a["plain"])
    assert problems[0].startswith("shared axes: expected {time}, observed {} (time is independent)")
    assert problems[1].startswith("rate: expected 0.5, observed 0.")
    assert check_site(parse_expectation("spatial: shared=time,feature"), a["spatial"])
    assert check_site(parse_expectation("spatial: rate=0.35 tol=0.1"), a["spatial"]) == []
    assert "has no axis 'height'" in check_site(parse_expectation("spatial: shared=height"),
                                                a["spatial"])[0]
    assert check_site(parse_expectation("spatial: gates=distinct"), a["spatial"]) == [
        "gates: expected distinct, observed n/a (nothing to compare)"]


def test_check_analysis_applies_globs_and_reports_unmatched_patterns():
    a = _analysis()
    fails = check_analysis(a, [parse_expectation("*: independent=batch"),
                               parse_expectation("conv*: rate=0.3"),
                               parse_expectation("*: pattern=elementwise")])
    assert [(f.expectation.site, f.site) for f in fails] == [("conv*", None), ("*", "spatial")]
    assert "no site matches" in fails[0].problems[0]


def test_spec_files_in_toml_and_json_load_the_same(tmp_path):
    toml = tmp_path / "spec.toml"
    toml.write_text('fail_on_errors = false\n[[expect]]\nsite = "spatial"\nshared = ["time"]\n'
                    'rate = 0.3\n[[expect]]\nsite = "plain"\nfresh = true\n')
    data = {"fail_on_errors": False,
            "expect": [{"site": "spatial", "shared": ["time"], "rate": 0.3},
                       {"site": "plain", "fresh": True}]}
    js = tmp_path / "spec.json"
    js.write_text(json.dumps(data))
    a, b = load_spec(toml), load_spec(js)
    shared_a = [e.shared for e in a.expectations]
    assert shared_a == [e.shared for e in b.expectations] == [("time",), None]
    assert a.fail_on_errors is False and b.fail_on_errors is False
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(load_schema("expectations")).validate(data)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "expect = [", "not valid TOML"),
        ("bad.json", "{", "not valid JSON"),
        ("empty.json", "{}", "non-empty list 'expect'"),
        ("extra.json", '{"expect": [{"site": "x", "rate": 0.1}], "colour": 1}',
         "unknown key(s) colour"),
        ("entry.json", '{"expect": [{"site": "x", "rate": "high"}]}',
         "expected rate to be a number"),
    ],
)
def test_bad_spec_files_raise_one_clear_error(tmp_path, name, text, message):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ExpectationError, match=None) as info:
        load_spec(p)
    assert message in str(info.value)


def test_missing_spec_file_is_an_expectation_error(tmp_path):
    with pytest.raises(ExpectationError, match="cannot read spec file"):
        load_spec(tmp_path / "nope.toml")
