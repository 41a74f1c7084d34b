"""The isolated child: a crash or a hang inside a watched HDF5 call becomes one RunFileError."""

from __future__ import annotations

import ctypes
import os
import time

import pytest

from dropspy import _isolate
from dropspy.errors import RunFileError, SiteNotFoundError

pytestmark = pytest.mark.skipif(not _isolate.available(), reason="needs os.fork")


def _crash() -> None:
    with _isolate.watched("run.h5", "/sites/000001/step dimension 0 label"):
        ctypes.string_at(0)  # what HDF5 did on a damaged global heap: SIGSEGV


def _hang() -> None:
    with _isolate.watched("run.h5", "/sites/000000/bits"):
        time.sleep(60)


def test_a_crash_in_the_child_is_one_error_naming_the_object():
    with pytest.raises(RunFileError) as info:
        _isolate.call(_crash, "run.h5")
    message = str(info.value)
    assert message.startswith("run.h5: /sites/000001/step dimension 0 label: ")
    assert "crashed the HDF5 library (SIGSEGV" in message


def test_a_hang_inside_a_watched_call_is_stopped_at_the_deadline(monkeypatch):
    monkeypatch.setattr(_isolate, "HDF5_CALL_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(RunFileError, match=r"run.h5: /sites/000000/bits: HDF5 did not answer "
                                           r"within 0.5 s"):
        _isolate.call(_hang, "run.h5")
    assert time.monotonic() - start < 10


def test_the_deadline_can_be_raised_for_slow_storage(monkeypatch):
    monkeypatch.setattr(_isolate, "HDF5_CALL_SECONDS", 0.2)
    monkeypatch.setenv(_isolate.DEADLINE_ENV, "30")

    def slow_read() -> str:
        with _isolate.watched("run.h5", "/sites/000000/bits"):
            time.sleep(0.6)  # a network filesystem's hiccup, not a hang
        return "read"

    assert _isolate.call(slow_read, "run.h5") == "read"
    monkeypatch.setenv(_isolate.DEADLINE_ENV, "not a number")  # ignored: the default holds
    with pytest.raises(RunFileError, match="did not answer within 0.2 s"):
        _isolate.call(slow_read, "run.h5")


def test_slow_python_work_outside_hdf5_calls_has_no_deadline(monkeypatch):
    monkeypatch.setattr(_isolate, "HDF5_CALL_SECONDS", 0.2)

    def slow() -> int:
        time.sleep(0.6)  # analysis between reads: not a hang
        with _isolate.watched("run.h5", "/status"):
            pass
        return os.getpid()

    assert _isolate.call(slow, "run.h5") != os.getpid()


def test_results_and_dropspy_errors_come_back_as_they_are():
    assert _isolate.call(lambda: {"sites": [1, 2]}, "x") == {"sites": [1, 2]}

    def missing() -> None:
        raise SiteNotFoundError("No site 'a' in run.h5")

    with pytest.raises(SiteNotFoundError, match="No site 'a'"):
        _isolate.call(missing, "run.h5")


def test_progress_reported_in_the_child_reaches_the_parent():
    seen: list[tuple[int, int]] = []

    def work() -> None:
        advance = _isolate.progress(300)
        assert advance is not None
        for _ in range(3):
            advance(100)
            time.sleep(0.15)

    _isolate.call(work, "x", on_progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (300, 300)
    assert _isolate.progress(10) is None  # outside a child the caller draws its own


def test_a_bug_in_the_child_comes_back_with_its_traceback():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def bug() -> None:
        raise Unpicklable("boom")

    with pytest.raises(_isolate.IsolatedBug, match="Unpicklable: boom"):
        _isolate.call(bug, "x")


def test_memory_beyond_the_childs_limit_is_an_error_naming_the_file(monkeypatch):
    import numpy as np

    monkeypatch.setattr(_isolate, "MEMORY_BYTES", 256 << 20)

    def greedy() -> int:
        return int(np.ones(1 << 30, np.uint8).sum())  # 1 GiB: past the child's limit

    with pytest.raises(RunFileError,
                       match=r"^run.h5: reading it needed more than 256 MiB of memory"):
        _isolate.call(greedy, "run.h5")


def test_a_variable_length_attribute_is_read_in_a_child_outside_the_cli(tmp_path, monkeypatch):
    import h5py

    from dropspy import _h5read

    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f.attrs["framework"] = "torch"  # h5py's default: variable-length, in the global heap
    calls: list[str] = []
    real = _isolate.call

    def spy(fn, what, on_progress=None):
        calls.append(what)
        return real(fn, what, on_progress)

    monkeypatch.setattr(_isolate, "call", spy)
    with h5py.File(path, "r") as f:
        assert _h5read.attr(f, "framework", path, "/") == "torch"
        assert calls == [str(path)]
        # Inside a child (a CLI command) it is read in place: no fork per attribute.
        value, seen = real(lambda: (_h5read.attr(f, "framework", path, "/"), list(calls)), "x")
    assert (value, seen) == ("torch", [str(path)])
