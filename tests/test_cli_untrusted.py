"""The CLI on run files crafted to attack the terminal: file text is printed, never obeyed."""

from __future__ import annotations

import numpy as np
import pytest
from _synth import info, records, write_run
from typer.testing import CliRunner

from dropspy.cli import app

runner = CliRunner()
EVIL = "[link=http://evil.example]x[/link][/bold]\x1b]8;;http://evil\x07\x1b[2J\u202e"


@pytest.fixture(scope="module")
def evil_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("evil")
    return write_run(d / "evil.h5", [
        (info(EVIL, layer_class="Drop\x1b[31mout"), records(EVIL, (8, 4, 6), (8, 1, 6), 0.3)),
    ], notes=["note \x1b[2J" + EVIL], meta={"framework": "fw\x1b[5m[bold]"})


@pytest.mark.parametrize("args", [["inspect", "-v"], ["check", "-e", "*: rate=0.9"],
                                  ["diff"], ["validate"]])
def test_file_text_reaches_the_terminal_as_literal_escaped_text(evil_path, args):
    cmd = [args[0], str(evil_path), *args[1:]]
    if args[0] == "diff":
        cmd.append(str(evil_path))
    result = runner.invoke(app, cmd)
    assert result.exit_code in (0, 1), result.output
    out = result.output
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    if args[0] in ("inspect", "check"):
        assert "\\x1b[2J" in out
    if args[0] == "inspect":
        assert "[link=http://evil.example]x[/link][/bold]" in out.replace("\n", "")


def _set_status(path, **fields):
    import json

    import h5py

    with h5py.File(path, "r+") as f:
        status = json.loads(bytes(f["status"][0]).rstrip(b"\0"))
        status.update(fields)
        f["status"][0] = json.dumps(status).encode()


@pytest.fixture
def killed_path(tmp_path):
    path = write_run(tmp_path / "killed.h5", [
        (info("d"), records("d", (16, 4, 8), (16, 1, 8), 0.3, steps=6))])
    _set_status(path, closed_cleanly=0, records_written=20)
    return path


def test_check_fails_on_incomplete_evidence_unless_allowed(killed_path):
    result = runner.invoke(app, ["check", str(killed_path), "-e", "d: shared=time"])
    assert result.exit_code == 1, result.output
    assert "FAIL incomplete evidence" in result.output and "[run-incomplete]" in result.output
    assert "[records-unreadable]" in result.output
    assert result.output.strip().splitlines()[-1].startswith("FAILED: 1/1 expectations hold")
    allowed = runner.invoke(app, ["check", str(killed_path), "-e", "d: shared=time",
                                  "--allow-incomplete"])
    assert allowed.exit_code == 0, allowed.output
    assert "note incomplete evidence" in allowed.output
    assert "PASSED" in allowed.output and "evidence incomplete" in allowed.output


def test_check_passes_a_complete_run_without_incomplete_notes(tmp_path):
    path = write_run(tmp_path / "ok.h5", [
        (info("d"), records("d", (16, 4, 8), (16, 1, 8), 0.3, steps=6))])
    result = runner.invoke(app, ["check", str(path), "-e", "d: shared=time"])
    assert result.exit_code == 0, result.output
    assert "incomplete" not in result.output


@pytest.fixture(scope="module")
def two_call_path(tmp_path_factory):
    from dropspy.records import Record

    d = tmp_path_factory.mktemp("calls")
    recs = []
    for s in range(3):
        for c in range(2):
            noise = np.zeros((4, 6), bool)
            noise[:, c] = True  # call c keeps feature c only: tells the calls apart
            recs.append(Record("d", s, c, True, (4, 6), noise=noise))
    return write_run(d / "calls.h5", [(info("d", axes=("batch", "feature")), recs)])


def test_plot_to_a_directory_is_one_line_exit_2(tmp_path, two_call_path):
    result = runner.invoke(app, ["plot", str(two_call_path), "-s", "d", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plot_without_suffix_writes_png_and_says_the_real_name(tmp_path, two_call_path):
    result = runner.invoke(app, ["plot", str(two_call_path), "-s", "d", "-o",
                                 str(tmp_path / "noext")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {tmp_path / 'noext.png'}"
    assert (tmp_path / "noext.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = runner.invoke(app, ["plot", str(two_call_path), "-s", "d", "-o",
                              str(tmp_path / "m.jpg")])
    assert bad.exit_code == 2 and "expected a .png file name" in bad.stderr


def test_plot_call_without_step_picks_that_call(tmp_path, two_call_path):
    from dropspy.plot import find_record
    from dropspy.runset import load

    with load(two_call_path) as run:
        site = run["d"]
        i = find_record(site, None, 1)
        assert (int(site.steps[i]), int(site.calls[i])) == (0, 1)
        assert site.mask(i)[:, 1].all() and not site.mask(i)[:, 0].any()
    result = runner.invoke(app, ["plot", str(two_call_path), "-s", "d", "--call", "1", "-o",
                                 str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    missing = runner.invoke(app, ["plot", str(two_call_path), "-s", "d", "--call", "7", "-o",
                                  str(tmp_path / "c.png")])
    assert missing.exit_code == 2 and "at call 7" in missing.stderr


@pytest.mark.parametrize("text, suffix", [("[" * 100_000 + "]" * 100_000, ".json"),
                                          ("a = " + "[" * 100_000 + "]" * 100_000, ".toml")])
def test_deeply_nested_spec_file_is_one_line_exit_2(tmp_path, evil_path, text, suffix):
    spec = tmp_path / f"spec{suffix}"
    spec.write_text(text)
    result = runner.invoke(app, ["check", str(evil_path), "--spec", str(spec)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "nested" in result.stderr


def test_spec_that_is_a_fifo_is_refused_without_blocking(tmp_path, evil_path):
    import os

    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    result = runner.invoke(app, ["check", str(evil_path), "--spec", str(fifo)])
    assert result.exit_code == 2 and "expected a spec file" in result.stderr
