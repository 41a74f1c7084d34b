"""The examples run end to end (small sizes) and print verdicts that the run files back up.

Each example runs once per module in a subprocess, as a user runs it. Its printed table must
list the same verdicts as its ``verdicts.json``, and each verdict must agree with an
independent reading of the run file it names: the claim restated here as ``dropspy check``
expectations (and ``dropspy inspect --json`` facts), run through the CLI. The tests pin that
the verdicts follow the masks, not which claims hold: that is each framework version's truth.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

typer_testing = pytest.importorskip("typer.testing")
from dropspy.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RUNNER = typer_testing.CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def _start_example(script: str, out: Path) -> subprocess.Popen:
    env = dict(os.environ, DROPSPY_EXAMPLES_SMALL="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(EXAMPLES / script), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)


def _printed_verdicts(stdout: str) -> list[tuple[str, str, str]]:
    """(claim, run file, verdict) for each row of the printed table."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("#") and "verdict" in line)
    v_at, e_at = lines[head].index("verdict"), lines[head].index("what the masks show")
    rows = []
    for line in lines[head + 2:]:
        if not line.strip() or line.startswith("```"):
            break
        if line[:4].strip():
            run = re.match(r"(\S+\.h5):", line[e_at:])
            rows.append((line[:4].strip(), run.group(1) if run else "", line[v_at:e_at].strip()))
    return rows


def _check(path: Path, *expects: str) -> bool:
    """Whether ``dropspy check`` passes every expectation (error findings aside)."""
    args = ["check", str(path), "--no-fail-on-errors"]
    for e in expects:
        args += ["--expect", e]
    result = RUNNER.invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code == 0


def _report(path: Path) -> dict:
    result = RUNNER.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _sites(report: dict, prefix: str) -> list[dict]:
    return [s for s in report["sites"] if s["site"].startswith(prefix)]


def _gate_masks(path: Path, role: str, steps: int | None = None) -> bool:
    """4 masks per call for ``role``, told apart by the analysis, over every timestep."""
    sites = _sites(_report(path), f"lstm/{role}/")
    ok = len(sites) == 4 and _check(path, f"lstm/{role}/*: gates=distinct")
    if ok and steps is not None:
        sizes = {a["size"] for s in sites for a in s["axis_verdicts"] if a["name"] == "time"}
        ok = sizes == {steps}
    return ok


def _eval_off(path: Path, functional: bool) -> bool:
    report = _report(path)
    site = next(s for s in report["sites"] if s["role"] == "output"
                and (s["site"] != "after") == functional)
    assert site["records"] > site["training_records"], "the example records an eval call"
    return not any(f["code"] == "inference-dropout" for f in site["findings"])


# The claims, restated independently of the examples: (claim, run file) -> does it hold?
KERAS_CLAIMS = {
    ("1", "dropout_before_lstm.h5"): lambda p: _check(p, "dropout: shared=none"),
    ("2a", "noise_shape_steps.h5"): lambda p: _check(p, "dropout: shared=batch,feature"),
    ("2b", "noise_shape_features.h5"): lambda p: _check(p, "dropout: shared=batch,time"),
    ("2c", "noise_shape_samples.h5"): lambda p: _check(p, "dropout: shared=time,feature"),
    ("3", "spatial_dropout1d.h5"): lambda p: _check(p, "spatial_dropout1d: shared=time"),
    ("3'", "spatial_dropout1d.h5"): lambda p: _check(p, "spatial_dropout1d: shared=feature"),
    ("4", "dropout_after_lstm.h5"): lambda p: _check(p, "dropout: shared=none"),
    ("5", "lstm_dropout.h5"): lambda p: _gate_masks(p, "input"),
    ("5", "lstm_both.h5"): lambda p: _gate_masks(p, "input"),
    ("5'", "lstm_dropout.h5"): lambda p: _check(p, "lstm/input*: over_time=constant"),
    ("6", "lstm_recurrent_dropout.h5"): lambda p: _gate_masks(p, "recurrent", steps=20),
    ("6", "lstm_both.h5"): lambda p: _gate_masks(p, "recurrent", steps=20),
    ("6'", "lstm_recurrent_dropout.h5"):
        lambda p: _check(p, "lstm/recurrent/*: over_time=resampled"),
}

TORCH_CLAIMS = {
    ("T1", "dropout_before_lstm.h5"): lambda p: _check(p, "before: shared=none"),
    ("T2", "dropout_after_lstm.h5"): lambda p: _check(p, "after: shared=none"),
    ("T3", "dropout1d_channels.h5"): lambda p: _check(p, "before: shared=time"),
    ("T4", "locked_dropout.h5"): lambda p: _check(p, "before*: shared=time"),
    ("T5", "lstm_two_layers.h5"): lambda p: _check(p, "lstm/between_layers: rate=0.3"),
    ("T5'", "lstm_two_layers.h5"): lambda p: _check(p, "lstm/between_layers: over_time=constant"),
    ("T6", "lstm_one_layer.h5"): lambda p: _check(p, "lstm/between_layers: rate=0.5"),
    ("T7a", "eval_functional.h5"): lambda p: _eval_off(p, functional=False),
    ("T7b", "eval_functional.h5"): lambda p: _eval_off(p, functional=True),
}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Both examples, started together (they spend most of their time on one core each)."""
    scripts = {"keras": ("tensorflow", "dropout_around_lstm.py"),
               "torch": ("torch", "torch_lstm_dropout.py")}
    started = {}
    for name, (module, script) in scripts.items():
        if importlib.util.find_spec(module) is not None:
            out = tmp_path_factory.mktemp(script[:-3])
            started[name] = (_start_example(script, out), out)
    done = {}
    for name, (proc, out) in started.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out)
    return done


@pytest.fixture(scope="module")
def keras_example(ran):
    if "keras" not in ran:
        pytest.skip("tensorflow is not installed")
    return ran["keras"]


@pytest.fixture(scope="module")
def torch_example(ran):
    if "torch" not in ran:
        pytest.skip("torch is not installed")
    return ran["torch"]


@pytest.fixture(params=["keras", "torch"])
def example(request):
    return request.param, request.getfixturevalue(f"{request.param}_example")


def test_example_exits_0_and_prints_what_verdicts_json_holds(example):
    name, (proc, out) = example
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((out / "verdicts.json").read_text())
    printed = _printed_verdicts(proc.stdout)
    assert printed == [(v["claim"], v["run"], v["verdict"]) for v in saved["verdicts"]]
    claims = KERAS_CLAIMS if name == "keras" else TORCH_CLAIMS
    assert [(c, r) for c, r, _ in printed] == list(claims), "every claim, once, in order"
    assert {v for _, _, v in printed} <= {"holds", "does not hold", "inconclusive"}


@pytest.mark.parametrize("key", list(KERAS_CLAIMS), ids=[f"{c}-{r}" for c, r in KERAS_CLAIMS])
def test_keras_verdict_matches_the_analysis_of_its_run_file(keras_example, key):
    proc, out = keras_example
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = {(c, r): v for c, r, v in _printed_verdicts(proc.stdout)}
    holds = KERAS_CLAIMS[key](out / key[1])
    assert (printed[key] == "holds") == holds, f"{key}: printed {printed[key]}, analysis {holds}"


@pytest.mark.parametrize("key", list(TORCH_CLAIMS), ids=[f"{c}-{r}" for c, r in TORCH_CLAIMS])
def test_torch_verdict_matches_the_analysis_of_its_run_file(torch_example, key):
    proc, out = torch_example
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = {(c, r): v for c, r, v in _printed_verdicts(proc.stdout)}
    holds = TORCH_CLAIMS[key](out / key[1])
    assert (printed[key] == "holds") == holds, f"{key}: printed {printed[key]}, analysis {holds}"


def test_example_writes_an_overview_picture_and_valid_run_files(example):
    name, (proc, out) = example
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png = out / "overview.png"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5_000
    for run_file in sorted(out.glob("*.h5")):
        result = RUNNER.invoke(app, ["validate", str(run_file)])
        assert result.exit_code == 0, f"{run_file.name}: {result.output}"


def _readme_section(name: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    assert begin in text and end in text, f"README lost its {name} markers"
    return text[text.index(begin) + len(begin):text.index(end)]


def test_readme_main_command_installs_and_runs_the_seed_example():
    block = re.search(r"```\n(.*?)\n```", _readme_section("main-command"), re.S)
    assert block, "the main-command section holds one command in a code block"
    steps = [s.strip() for s in block.group(1).split("&&")]
    assert any(s.startswith("pip install -e") for s in steps), steps
    assert steps[-1] == "python examples/dropout_around_lstm.py", steps
    assert (ROOT / steps[-1].split()[-1]).is_file()


def test_readme_findings_show_the_seed_table_and_a_committed_picture():
    section = _readme_section("findings")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section):
        assert (ROOT / image).read_bytes()[:8] == PNG, image
    assert "docs/" in section and "#    claim" in section


def test_readme_findings_table_is_what_the_seed_example_prints_here(keras_example):
    proc, out = keras_example
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((out / "verdicts.json").read_text())
    section = _readme_section("findings")
    # verdicts.json names the backend's engine ("TensorFlow 2.21.0") since the example takes
    # --backend; the README's findings name the versions they were recorded on.
    engine = saved["engine"].replace("TensorFlow ", "")
    if f"Keras {saved['keras_version']} / TensorFlow {engine}" not in section:
        pytest.skip("the README's findings were recorded on other versions")
    assert _printed_verdicts(section) == _printed_verdicts(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_lstm_example_gives_the_same_verdicts_on_the_jax_and_torch_backends(
        backend, keras_example, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = dict(os.environ, DROPSPY_EXAMPLES_SMALL="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(EXAMPLES / "dropout_around_lstm.py"), "--out",
                           str(tmp_path), "--backend", backend, "--no-pictures"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads((tmp_path / "verdicts.json").read_text())
    ours = json.loads((keras_example[1] / "verdicts.json").read_text())
    assert theirs["backend"] == backend and ours["backend"] == "tensorflow"

    def claims(saved):
        return [(v["claim"], v["verdict"]) for v in saved["verdicts"]]

    assert len(claims(ours)) == 13
    assert claims(theirs) == claims(ours)
