"""The dropspy command: every subcommand, exit codes, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _synth import (
    KERAS2_CUDNN_LSTM_INPUT,
    KERAS3_LSTM_INPUT,
    info,
    lstm_input_run,
    records,
    write_run,
)
from typer.testing import CliRunner

from dropspy.cli import app
from dropspy.records import Record
from dropspy.report import load_schema

runner = CliRunner()


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return write_run(d / "run.h5", [
        (info("spatial", layer_class="SpatialDropout1D"),
         records("spatial", (16, 10, 32), (16, 1, 32), 0.3)),
        (info("plain"), records("plain", (16, 10, 32), (16, 10, 32), 0.3, seed=1)),
        (info("lstm/input/i", layer="lstm", layer_class="LSTM", role="input", gate="i"),
         records("lstm/input/i", (8, 5, 4), (8, 1, 4), 0.3, seed=2)),
        (info("lstm/input/f", layer="lstm", layer_class="LSTM", role="input", gate="f"),
         records("lstm/input/f", (8, 5, 4), (8, 1, 4), 0.3, seed=3)),
    ])


@pytest.fixture(scope="module")
def bad_run_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_bad")
    noise = np.random.default_rng(3).random((16, 10, 32)) >= 0.3
    stale = [Record("stale", s, 0, True, (16, 10, 32), noise=noise) for s in range(3)]
    evals = records("plain", (16, 10, 32), (16, 10, 32), 0.3, seed=1, steps=2)
    evals.append(Record("plain", 2, 0, False, (16, 10, 32), noise=noise))
    return write_run(d / "bad.h5", [(info("stale"), stale), (info("plain"), evals)])


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dropspy: error: ")
    assert "Traceback" not in result.output + result.stderr
    for n in needles:
        assert n in lines[0]


def test_inspect_prints_one_row_per_site_with_its_answer_in_words(run_path):
    result = runner.invoke(app, ["inspect", str(run_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for site in ("spatial", "plain", "lstm/input/i", "lstm/input/f"):
        assert any(line.startswith(site + " ") for line in lines), site
    assert "batch [time] feature" in result.stdout
    said = {line.split("  ")[0]: " ".join(line.split()[len(line.split("  ")[0].split()):])
            for line in lines[lines.index("In words:") + 1:] if "  " in line}
    assert said["spatial"] == ("drops whole features, per sample; the same features at every "
                               "time step")
    assert said["plain"] == "drops single elements, no axis shared; a new mask at each time step"
    assert said["lstm/input/i, f"] == ("drops whole features, per sample; the same features "
                                       "at every time step; 2 different masks, one per gate")


def test_inspect_json_validates_against_the_report_schema(run_path):
    jsonschema = pytest.importorskip("jsonschema")
    result = runner.invoke(app, ["inspect", str(run_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.Draft202012Validator(load_schema("report")).validate(data)
    sites = {s["site"]: s for s in data["sites"]}
    assert sites["spatial"]["shared_axes"] == ["time"]
    assert sites["plain"]["pattern"] == "elementwise"


def test_inspect_site_glob_selects_sites(run_path):
    result = runner.invoke(app, ["inspect", str(run_path), "--json", "--site", "lstm/*"])
    assert result.exit_code == 0, result.output
    sites = [s["site"] for s in json.loads(result.stdout)["sites"]]
    assert sites == ["lstm/input/i", "lstm/input/f"]


def test_inspect_lists_error_findings_under_the_table(bad_run_path):
    result = runner.invoke(app, ["inspect", str(bad_run_path)])
    assert result.exit_code == 0, result.output
    assert "stale-mask" in result.stdout
    assert "dropout active at inference" in result.stdout


def test_inspect_unknown_site_pattern_is_one_line_exit_2(run_path):
    _one_line_error(runner.invoke(app, ["inspect", str(run_path), "--site", "conv*"]),
                    "no site matches 'conv*'")


@pytest.mark.parametrize("command", ["inspect", "check", "validate"])
def test_missing_file_is_one_line_exit_2(tmp_path, command):
    _one_line_error(runner.invoke(app, [command, str(tmp_path / "nope.h5")]), "no such file")


def test_non_run_file_is_one_line_exit_2(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("not hdf5 at all")
    _one_line_error(runner.invoke(app, ["inspect", str(p)]), "not an HDF5 file")


def test_check_passes_with_exit_0_when_expectations_hold(run_path):
    result = runner.invoke(app, ["check", str(run_path),
                                 "--expect", "spatial: shared=time rate=0.3",
                                 "-e", "lstm/input/*: gates=distinct over_time=constant"])
    assert result.exit_code == 0, result.output
    assert "PASSED: 2/2 expectations hold" in result.stdout


def test_check_fails_with_exit_1_and_expected_vs_observed(run_path):
    result = runner.invoke(app, ["check", str(run_path), "--expect", "plain: shared=time"])
    assert result.exit_code == 1, result.output
    assert "shared axes: expected {time}, observed {}" in result.stdout
    assert "FAILED: 0/1" in result.stdout


def test_check_fails_on_error_findings_unless_told_not_to(bad_run_path):
    strict = runner.invoke(app, ["check", str(bad_run_path), "--fail-on-errors"])
    assert strict.exit_code == 1, strict.output
    assert "stale-mask" in strict.stdout and "inference-dropout" in strict.stdout
    holds = "plain: independent=time"
    strict = runner.invoke(app, ["check", str(bad_run_path), "-e", holds])
    assert strict.exit_code == 1, strict.output
    lenient = runner.invoke(app, ["check", str(bad_run_path), "-e", holds, "--no-fail-on-errors"])
    assert lenient.exit_code == 0, lenient.output


def test_check_bad_expectation_is_one_line_exit_2(run_path):
    _one_line_error(runner.invoke(app, ["check", str(run_path), "--expect", "spatial: rate=lots"]),
                    "Received: rate='lots'")


def test_check_expectation_naming_no_site_is_one_line_exit_2(run_path):
    _one_line_error(runner.invoke(app, ["check", str(run_path), "-e", "conv*: rate=0.3"]),
                    "no site matches 'conv*'", "sites: spatial, plain")


def test_check_spec_file(tmp_path, run_path, bad_run_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('[[expect]]\nsite = "spatial"\nshared = ["time"]\nrate = 0.3\n')
    ok = runner.invoke(app, ["check", str(run_path), "--spec", str(spec)])
    assert ok.exit_code == 0, ok.output
    lenient = tmp_path / "lenient.json"
    lenient.write_text(json.dumps({"fail_on_errors": False,
                                   "expect": [{"site": "plain", "rate": 0.3}]}))
    result = runner.invoke(app, ["check", str(bad_run_path), "--spec", str(lenient)])
    assert result.exit_code == 0, result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[[expect]\n")
    _one_line_error(runner.invoke(app, ["check", str(run_path), "--spec", str(broken)]),
                    "not valid TOML")


def test_diff_same_run_exit_0_different_runs_exit_1(run_path, bad_run_path):
    same = runner.invoke(app, ["diff", str(run_path), str(run_path)])
    assert same.exit_code == 0, same.output
    assert "no differences" in same.stdout
    other = runner.invoke(app, ["diff", str(run_path), str(bad_run_path), "--json"])
    assert other.exit_code == 1, other.output
    diffs = {(d["site"], d["aspect"]): d for d in json.loads(other.stdout)}
    assert diffs[("spatial", "presence")]["b"] == "absent"
    assert diffs[("stale", "presence")]["a"] == "absent"
    assert diffs[("plain", "errors")]["b"] == "inference-dropout"


@pytest.fixture(scope="module")
def keras2_keras3_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_facts")
    return (lstm_input_run(d / "k2.h5", KERAS2_CUDNN_LSTM_INPUT,
                           {"framework": "tf_keras", "framework_version": "2.17.0"},
                           noise_shape=(None, None, None)),
            lstm_input_run(d / "k3.h5", KERAS3_LSTM_INPUT,
                           {"framework": "keras", "framework_version": "3.6.0"},
                           noise_shape=(None, 1, None)))


def test_diff_shows_site_facts_and_each_runs_framework_version(keras2_keras3_paths):
    k2, k3 = keras2_keras3_paths
    result = runner.invoke(app, ["diff", str(k2), str(k3)])
    assert result.exit_code == 1, result.output
    assert "(tf_keras 2.17.0)" in result.stdout and "(keras 3.6.0)" in result.stdout
    assert "fact:masks_drawn_per_call" in result.stdout
    assert "[null, 1, null]" in result.stdout   # printed as text, not eaten as rich markup
    as_json = runner.invoke(app, ["diff", str(k2), str(k3), "--json"])
    assert as_json.exit_code == 1
    diffs = {(d["site"], d["aspect"]): (d["a"], d["b"]) for d in json.loads(as_json.stdout)}
    assert diffs == {("lstm/input", "fact:masks_drawn_per_call"): ("4", "1"),
                     ("lstm/input", "fact:tf_keras_path"): ('"cudnn-eligible"', "absent"),
                     ("lstm/input", "fact:noise_shape"): ("[null, null, null]", "[null, 1, null]")}


def test_diff_no_facts_compares_mask_structure_only(keras2_keras3_paths):
    k2, k3 = keras2_keras3_paths
    result = runner.invoke(app, ["diff", str(k2), str(k3), "--no-facts"])
    assert result.exit_code == 0, result.output
    assert "no differences in mask structure (1 sites)" in result.stdout
    assert "(tf_keras 2.17.0)" in result.stdout


def test_diff_with_site_glob_matching_neither_run_is_exit_2(run_path, bad_run_path):
    _one_line_error(runner.invoke(app, ["diff", str(run_path), str(bad_run_path), "-s", "zzz*"]),
                    "no site matches 'zzz*' in either run")


def test_plot_writes_a_png(tmp_path, run_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "mask.png"
    result = runner.invoke(app, ["plot", str(run_path), "--site", "lstm/input/i", "--step", "1",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_missing_step_is_one_line_exit_2(tmp_path, run_path):
    pytest.importorskip("matplotlib")
    _one_line_error(runner.invoke(app, ["plot", str(run_path), "--site", "plain", "--step", "99",
                                        "-o", str(tmp_path / "x.png")]),
                    "no mask at step 99")


def test_plot_glob_matching_several_sites_is_exit_2(tmp_path, run_path):
    _one_line_error(runner.invoke(app, ["plot", str(run_path), "--site", "lstm/*",
                                        "-o", str(tmp_path / "x.png")]), "matches 2 sites")


def test_validate_accepts_a_run_file(run_path):
    result = runner.invoke(app, ["validate", str(run_path)])
    assert result.exit_code == 0, result.output
    assert "valid run file" in result.stdout


def test_python_dash_m_dropspy_runs_as_a_subprocess(run_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    ok = subprocess.run([sys.executable, "-m", "dropspy", "check", str(run_path),
                         "-e", "spatial: pattern=time-shared"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "PASSED" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dropspy", "inspect", str(run_path) + ".missing"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "dropspy", "plot", str(run_path), "--bogus"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert usage.returncode == 2
    assert usage.stderr.splitlines() == [
        "dropspy: error: No such option: --bogus (see dropspy --help)"]
    helped = subprocess.run([sys.executable, "-m", "dropspy", "--help"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert helped.returncode == 0 and "inspect" in helped.stdout


def test_inspect_with_a_progress_bar_prints_the_same_report(monkeypatch, run_path):
    import rich.console

    import dropspy.cli

    plain = runner.invoke(app, ["inspect", str(run_path), "--json"])
    monkeypatch.setattr(dropspy.cli, "_PROGRESS_BYTES", 0)
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    with_bar = runner.invoke(app, ["inspect", str(run_path), "--json"])
    assert with_bar.exit_code == 0, with_bar.output
    assert json.loads(with_bar.stdout) == json.loads(plain.stdout)
    assert "analysing" in with_bar.stderr


def test_check_with_no_expectation_is_exit_2_nothing_to_check(run_path):
    _one_line_error(runner.invoke(app, ["check", str(run_path)]), "nothing to check")


def test_inspect_on_a_run_filtered_to_nothing_shows_the_drop_causes_without_v(tmp_path):
    path = write_run(tmp_path / "typo.h5", [], dropped={"site_filter": 6},
                     notes=["2 site(s) left out by sites=['dropuot*']: enc.dropout, dec.dropout"])
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "This run holds no dropout site: the record(sites=...) patterns left every site" \
        in " ".join(result.stdout.split())
    assert "site_filter: 6" in result.stdout
    assert "left out by sites=['dropuot*']: enc.dropout, dec.dropout" in result.stdout


def test_json_and_verbose_show_as_flags_in_help():
    result = runner.invoke(app, ["inspect", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    line = next(x for x in result.stdout.splitlines() if "--json" in x)
    assert "<bool>" not in line and "Print the report as JSON." in line
