"""Report JSON: valid against schemas/report.schema.json and a lossless round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _synth import info, records, write_run

from dropspy.analysis import MemoryRun, MemorySite, analyze_run
from dropspy.report import from_dict, from_json, load_schema, to_dict, to_json
from dropspy.runset import load

jsonschema = pytest.importorskip("jsonschema")

AXES3 = ("batch", "time", "feature")


def _rich_run() -> MemoryRun:
    """A run with every kind of finding, verdict and None the report must carry."""
    rng = np.random.default_rng(0)
    stale = rng.random((8, 10, 16)) >= 0.3
    gates = [MemorySite(f"lstm/input/{g}", AXES3, [rng.random((8, 1, 16)) >= 0.3 for _ in range(3)],
                        rate=0.3, shapes=[(8, 12, 16)] * 3, layer="lstm", layer_class="LSTM",
                        role="input", gate=g,
                        extra={"masks_per_call": 4, "gates": tuple("ifco"),
                               "time_axis_by_construction": True}) for g in "ifco"]
    return MemoryRun(gates + [
        MemorySite("stale", AXES3, [stale] * 3, rate=0.3),
        MemorySite("wrong_rate", ("batch", "feature"), [rng.random((64, 64)) >= 0.5], rate=0.1),
        MemorySite("eval", ("batch", "feature"), [rng.random((8, 8)) >= 0.5] * 2, rate=0.5,
                   training=[True, False]),
        MemorySite("tiny", AXES3, [np.broadcast_to(rng.random((2, 1, 2)) >= 0.05, (2, 2, 2))],
                   rate=0.05),
        MemorySite("never", ("batch", "feature"), [], rate=0.5),
        MemorySite("cudnn", AXES3, [], rate=0.2, opaque="fused kernel"),
        MemorySite("unknown_rate", ("feature",), [rng.random(32) >= 0.5], rate=None),
    ], complete=False, records_dropped={"queue_full": 3}, notes=["a note"])


@pytest.fixture(scope="module")
def analysis():
    return analyze_run(_rich_run())


def test_report_validates_against_the_schema(analysis):
    data = json.loads(to_json(analysis))
    jsonschema.Draft202012Validator(load_schema("report")).validate(data)
    codes = {f["code"] for s in data["sites"] for f in s["findings"]} | {
        f["code"] for f in data["findings"]}
    assert {"stale-mask", "rate-mismatch", "inference-dropout", "never-applied", "opaque",
            "axis-inconclusive", "run-incomplete", "records-dropped", "note"} <= codes


def test_report_has_the_fields_scripts_rely_on(analysis):
    data = to_dict(analysis)
    site = {s["site"]: s for s in data["sites"]}["lstm/input/i"]
    assert site["shared_axes"] == ["time"]
    assert site["independent_axes"] == ["batch", "feature"]
    assert site["pattern"] == "time-shared"
    assert site["gates"]["verdict"] == "distinct"
    assert site["rate_configured"] == 0.3
    assert 0 <= site["rate_interval"][0] <= site["rate_observed"] <= site["rate_interval"][1]
    assert data["summary"]["error"] == 3


def test_report_round_trips_to_an_equal_analysis(analysis):
    assert from_json(to_json(analysis)) == analysis
    assert from_dict(to_dict(analysis)).sites[0].findings == analysis.sites[0].findings


def test_schema_rejects_a_report_with_a_bad_verdict(analysis):
    data = to_dict(analysis)
    data["sites"][0]["axis_verdicts"][0]["verdict"] = "probably"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(load_schema("report")).validate(data)


def test_from_dict_rejects_what_is_not_a_report():
    with pytest.raises(ValueError, match="Not a dropspy report"):
        from_dict({"format": "something"})
    with pytest.raises(ValueError, match="format_version"):
        from_dict({"format": "dropspy.report", "format_version": 99})


def _tf_keras_like_run(path):
    """A run file with the facts a Keras 2 adapter states about a cuDNN-eligible LSTM."""
    extra = {"masks_per_call": 1, "masks_drawn_per_call": 4, "masks_applied_per_call": 1,
             "gates_share_mask": True, "tf_keras_path": "cudnn-eligible",
             "time_axis_by_construction": True}
    site = info("lstm/input", rate=0.3, layer="lstm", layer_class="LSTM", role="input",
                noise_shape=(None, 1, None), scale=1 / 0.7, extra=extra)
    return write_run(path, [(site, records("lstm/input", (8, 5, 6), (8, 1, 6), 0.3))],
                     meta={"framework": "tf_keras", "framework_version": "2.17.0"})


def test_report_carries_site_facts_and_framework_version(tmp_path):
    data = to_dict(analyze_run(load(_tf_keras_like_run(tmp_path / "run.h5"))))
    jsonschema.Draft202012Validator(load_schema("report")).validate(data)
    assert (data["framework"], data["framework_version"]) == ("tf_keras", "2.17.0")
    facts = data["sites"][0]["facts"]
    assert facts["noise_shape"] == [None, 1, None]
    assert facts["scale"] == pytest.approx(1 / 0.7)
    assert facts["extra"]["masks_drawn_per_call"] == 4
    assert facts["extra"]["masks_applied_per_call"] == 1
    assert facts["extra"]["tf_keras_path"] == "cudnn-eligible"
    assert facts["extra"]["gates_share_mask"] is True


def test_report_with_site_facts_round_trips_to_an_equal_analysis(tmp_path, analysis):
    from_file = analyze_run(load(_tf_keras_like_run(tmp_path / "run.h5")))
    assert from_json(to_json(from_file)) == from_file
    site = from_json(to_json(from_file)).sites[0]
    assert (site.noise_shape, site.extra["masks_drawn_per_call"]) == ((None, 1, None), 4)
    assert from_json(to_json(analysis))["lstm/input/i"].extra["gates"] == list("ifco")


def test_report_without_facts_still_loads():
    data = to_dict(analyze_run(_rich_run()))
    del data["framework_version"]
    for s in data["sites"]:
        del s["facts"]
    jsonschema.Draft202012Validator(load_schema("report")).validate(data)
    old = from_dict(data)
    assert old.framework_version == "" and old.sites[0].extra == {}
