"""dropspy.testing: assertion helpers and the pytest plugin's dropspy_record fixture."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _synth import info, records, write_run

from dropspy.analysis import MemoryRun, MemorySite
from dropspy.errors import ExpectationError
from dropspy.testing import (
    assert_fresh,
    assert_mask_structure,
    assert_no_findings,
    assert_no_inference_dropout,
    assert_rate,
)

AXES3 = ("batch", "time", "feature")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run():
    rng = np.random.default_rng(0)
    stale = rng.random((8, 10, 16)) >= 0.3
    return MemoryRun([
        MemorySite("spatial", AXES3, [rng.random((16, 1, 32)) >= 0.3 for _ in range(3)],
                   rate=0.3, shapes=[(16, 10, 32)] * 3, layer_class="SpatialDropout1D"),
        MemorySite("stale", AXES3, [stale] * 3, rate=0.3),
        MemorySite("eval", ("batch", "feature"), [rng.random((8, 8)) >= 0.5] * 2, rate=0.5,
                   training=[True, False]),
    ])


def test_assert_mask_structure_passes_and_returns_the_site(run):
    site = assert_mask_structure(run, "spatial", shared=["time"], rate=0.3, fresh=True,
                                 pattern="time-shared", over_time="constant")
    assert site.site == "spatial"


def test_assert_mask_structure_states_expected_and_observed_for_each_problem(run):
    with pytest.raises(AssertionError) as err:
        assert_mask_structure(run, "spatial", shared=["feature"], rate=0.5)
    msg = str(err.value)
    assert ("Mask structure mismatch at site 'spatial' "
            "(SpatialDropout1D, axes batch, time, feature)") in msg
    assert "shared axes: expected {feature}, observed {time}" in msg
    assert "rate: expected 0.5, observed 0.3" in msg


def test_assert_mask_structure_on_a_run_file_path(tmp_path):
    path = write_run(tmp_path / "r.h5", [
        (info("spatial"), records("spatial", (16, 10, 32), (16, 1, 32), 0.3))])
    assert_mask_structure(path, "spatial", shared=["time"], rate=0.3)
    assert_mask_structure(str(path), "spat*", independent=["batch"])


def test_unknown_site_fails_the_assertion_with_the_site_list(run):
    with pytest.raises(AssertionError, match="no site matches 'conv'; sites: spatial, stale, eval"):
        assert_mask_structure(run, "conv", rate=0.3)


def test_invalid_arguments_raise_expectation_error(run):
    with pytest.raises(ExpectationError, match="gates"):
        assert_mask_structure(run, "spatial", gates="sometimes")


def test_assert_rate_with_tolerance(run):
    assert_rate(run, "spatial", 0.32, tol=0.05)
    with pytest.raises(AssertionError, match=r"rate: expected 0.4 \+- 0.01"):
        assert_rate(run, "spatial", 0.4, tol=0.01)


def test_assert_fresh_names_the_stale_site(run):
    assert_fresh(run, "spatial")
    with pytest.raises(AssertionError, match="stale: freshness: expected fresh, observed stale"):
        assert_fresh(run)


def test_assert_no_findings_and_no_inference_dropout(run):
    with pytest.raises(AssertionError, match="stale-mask"):
        assert_no_findings(run)
    assert_no_findings(run, ignore=["stale-mask", "inference-dropout"])
    with pytest.raises(AssertionError, match="eval: dropout active at inference"):
        assert_no_inference_dropout(run)


_TEST_FILE = '''
from fake_adapter import SPATIAL, FakeModel
from dropspy.frameworks import register_adapter
from dropspy.testing import assert_mask_structure

register_adapter("fake_adapter", "fake_adapter", "FakeAdapter")


def test_records_into_tmp_path(dropspy_record, tmp_path):
    model = FakeModel(sites=(SPATIAL,))
    with dropspy_record(model, "fit.h5") as rec:
        model.fit(5)
    assert rec.path == tmp_path / "fit.h5"
    assert len(rec.run["spatial"]) == 5
    assert_mask_structure(rec.run, "spatial", shared=["time"], rate=0.25, fresh=True)
    assert rec.analysis()["spatial"].pattern == "time-shared"


def test_wrong_expectation_fails(dropspy_record):
    model = FakeModel(sites=(SPATIAL,))
    with dropspy_record(model) as rec:
        model.fit(3)
    assert_mask_structure(rec.path, "spatial", shared=["feature"])
'''


def test_pytest_plugin_fixture_records_a_model_in_a_test(tmp_path):
    (tmp_path / "test_fake.py").write_text(textwrap.dedent(_TEST_FILE))
    entry_points = importlib.metadata.entry_points(group="pytest11")
    installed = any(ep.name == "dropspy" for ep in entry_points)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    if not installed:
        args[3:3] = ["-p", "dropspy.testing"]
    # The tests' one fake adapter (tests/fake_adapter.py) is importable in the child.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "1 failed, 1 passed" in text
    assert "shared axes: expected {feature}, observed {time}" in text


def test_dropspy_testing_is_reachable_after_import_dropspy_without_pytest():
    import subprocess
    import sys

    code = ("import sys, dropspy; f = dropspy.testing.assert_mask_structure; "
            "print(callable(f), 'pytest' in sys.modules, dropspy.testing.dropspy_record)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.stdout.split() == ["True", "False", "None"]
