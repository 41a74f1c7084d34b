"""What the writer does to the path it is given: replace only its own runs, appear whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from dropspy.errors import RunFileError
from dropspy.records import Record, SiteInfo
from dropspy.runset import load
from dropspy.writer import RunWriter


def _write(path, value=1.0):
    with RunWriter(path, {"framework": "test"}) as w:
        w.declare_site(SiteInfo("d", "d", "Dropout", "output", ("batch",), value))
        w.submit([Record("d", 0, 0, True, (8,), noise=np.ones(8, bool))])


def _leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("make, what", [
    (lambda p: p.write_text("my notes\n"), "not a dropspy run file"),
    (lambda p: h5py.File(p, "w").close(), "HDF5 file that is not a dropspy run"),
    (lambda p: (_write(p), p.write_bytes(p.read_bytes()[:3000])), "cannot read as its own run"),
], ids=["text", "plain-hdf5", "damaged-run"])
def test_writer_refuses_to_replace_a_file_that_is_not_a_dropspy_run(tmp_path, make, what):
    path = tmp_path / "notes.txt"
    make(path)
    before = path.read_bytes()
    with pytest.raises(RunFileError, match=what) as info:
        RunWriter(path, {"framework": "test"})
    assert str(path) in str(info.value) and "Delete it or record to another path" in str(
        info.value)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_writer_refuses_a_directory(tmp_path):
    with pytest.raises(RunFileError, match="is a directory"):
        RunWriter(tmp_path, {"framework": "test"})


def test_writer_replaces_an_existing_run_and_an_empty_file(tmp_path):
    path = tmp_path / "run.h5"
    _write(path, 0.25)
    _write(path, 0.75)
    assert load(path)["d"].rate == 0.75
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    _write(empty, 0.5)
    assert load(empty)["d"].rate == 0.5
    assert _leftovers(tmp_path) == []


_CHILD = textwrap.dedent(
    """
    import sys, time
    from dropspy.writer import RunWriter
    print("go", flush=True)
    w = RunWriter(sys.argv[1], {"framework": "test"})
    time.sleep(30)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("delay_ms", [0, 2, 5, 10, 20, 40])
def test_sigkill_while_creating_leaves_nothing_or_a_run_that_opens(tmp_path, delay_ms):
    path = tmp_path / "run.h5"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(),
                                                       os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout.readline().strip() == "go"
    time.sleep(delay_ms / 1000)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    if path.exists():
        with load(path) as run:
            assert run.sites == () and not run.complete
    _write(path)  # a later writer removes what a killed one left under a hidden name
    assert _leftovers(tmp_path) == []


def test_record_refuses_a_path_holding_another_file_and_leaves_it_alone(tmp_path):
    from fake_adapter import FakeModel

    import dropspy
    from dropspy.frameworks import _REGISTRY, register_adapter

    entry = ("dropspy", "fake_adapter", "FakeAdapter")
    register_adapter(*entry)
    try:
        notes = tmp_path / "notes.txt"
        notes.write_text("do not lose me\n")
        model = FakeModel()
        with pytest.raises(RunFileError, match="dropspy replaces only its own run files"):
            with dropspy.record(model, notes):
                model.train_step()
        assert notes.read_text() == "do not lose me\n"
        with dropspy.record(model, tmp_path / "run.h5"):  # the model was left unhooked
            model.train_step()
        with dropspy.record(model, tmp_path / "run.h5"):  # an earlier run: replaced
            model.train_step()
            model.train_step()
        assert dropspy.load(tmp_path / "run.h5").records_written == 4
    finally:
        _REGISTRY.remove(entry)


def test_writer_removes_temporaries_of_dead_writers_only(tmp_path):
    path = tmp_path / "run.h5"
    dead = tmp_path / ".run.h5.4194303.tmp"  # above any pid this machine hands out
    alive = tmp_path / f".run.h5.{os.getppid()}.tmp"
    other = tmp_path / ".other.h5.4194303.tmp"
    for p in (dead, alive, other):
        p.write_bytes(b"\x89HDF")
    _write(path)
    assert not dead.exists() and alive.exists() and other.exists()
