"""Writer behaviour that needs a process of its own: interpreter exit, a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dropspy.runset import load

_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=_ENV, timeout=120)


def test_writer_left_open_is_closed_at_interpreter_exit(tmp_path):
    path = tmp_path / "atexit.h5"
    out = _run(
        """
        import sys, numpy as np
        from dropspy.records import Record, SiteInfo
        from dropspy.writer import RunWriter
        w = RunWriter(sys.argv[1], {"framework": "test"}, flush_seconds=3600)
        w.declare_site(SiteInfo("d", "d", "Dropout", "output", ("batch",), 0.5))
        w.submit([Record("d", s, 0, True, (64,), noise=np.arange(64) % (s + 2) == 0)
                  for s in range(5)])
        # no close(): the interpreter exits with records still buffered
        """,
        str(path),
    )
    assert out.returncode == 0, out.stderr
    run = load(path)
    assert run.complete and len(run["d"]) == 5
    assert np.array_equal(run["d"].mask(3), np.arange(64) % 5 == 0)


def _fill_the_disk(path, limit_kib):
    return _run(
        f"""
        import json, resource, signal, sys, warnings, numpy as np
        if {limit_kib}:
            # RLIMIT_FSIZE makes writes past the limit fail with EFBIG, as a full disk would.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_kib} * 1024, {limit_kib} * 1024))
        from dropspy.recorder import Session
        from dropspy.records import Record, SiteInfo
        from dropspy.writer import RunWriter
        w = RunWriter(sys.argv[1], {{"framework": "test"}}, flush_seconds=0.01, flush_bytes=1,
                      reserve_bytes=256 * 1024)
        s = Session(w)
        s.declare_site(SiteInfo("d", "d", "Dropout", "output", ("batch", "feature"), 0.5))
        rng = np.random.default_rng(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2000):
                s.submit(step, [Record("d", step, 0, True, (64, 256),
                                       noise=rng.random((64, 256)) > 0.5)])
        w.close()
        print(json.dumps({{"stats": w.stats, "warnings": [str(c.message) for c in caught]}}))
        """,
        str(path),
    )


def _check_stopped_cleanly(path, out):
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stats = result["stats"]
    assert "disk nearly full" in stats["error"]
    dropped = stats["records_dropped"]["disk_full"]
    assert dropped > 0 and stats["records_written"] + dropped == 2000
    assert len(result["warnings"]) == 1 and "stopped writing" in result["warnings"][0]
    run = load(path)
    assert not run.complete and "disk nearly full" in run.attrs["stop_reason"]
    assert run.records_dropped["disk_full"] == dropped
    rng = np.random.default_rng(0)
    site = run["d"]
    assert len(site) == stats["records_written"] > 0
    for i in range(len(site)):
        assert np.array_equal(site.mask(i), rng.random((64, 256)) > 0.5)


def test_file_size_limit_stops_recording_before_hdf5_fails_and_training_goes_on(tmp_path):
    path = tmp_path / "full.h5"
    _check_stopped_cleanly(path, _fill_the_disk(path, limit_kib=1024))


@pytest.fixture
def small_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_stops_recording_before_hdf5_fails_and_training_goes_on(small_filesystem):
    path = small_filesystem / "full.h5"
    _check_stopped_cleanly(path, _fill_the_disk(path, limit_kib=0))


def test_full_disk_with_hundreds_of_sites_counts_disk_full_and_leaves_a_readable_file(tmp_path):
    # HDF5 allocates each site's first chunks whole (~100 KB a site): 300 sites' first flush
    # needs ~30 MB. The writer must see that coming: disk_full, not a failed write.
    path = tmp_path / "many.h5"
    out = _run(
        """
        import json, resource, signal, sys, numpy as np
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 20, 40 << 20))
        from dropspy.recorder import Session
        from dropspy.records import Record, SiteInfo
        from dropspy.writer import RunWriter
        w = RunWriter(sys.argv[1], {"framework": "test"}, flush_seconds=0.01)
        s = Session(w)
        n = 300
        for k in range(n):
            s.declare_site(SiteInfo(f"s{k}", f"s{k}", "Dropout", "output",
                                    ("batch", "time", "feature"), 0.5))
        rng = np.random.default_rng(0)
        for step in range(40):
            # 2 KiB a record: the first 64 KiB bits chunks fit, the second ones do not
            s.submit(step, [Record(f"s{k}", step, 0, True, (16, 8, 128),
                                   packed=np.frombuffer(rng.bytes(2048), np.uint8),
                                   noise_shape=(16, 8, 128)) for k in range(n)])
        w.close()
        print(json.dumps(w.stats))
        """,
        str(path),
    )
    assert out.returncode == 0, out.stderr[-2000:]  # no crash, at exit or before
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    dropped = stats["records_dropped"]
    assert dropped["write_error"] == 0 and dropped["disk_full"] > 0, stats
    assert stats["records_written"] + dropped["disk_full"] == 300 * 40
    run = load(path)
    assert not run.complete and "disk nearly full" in run.attrs["stop_reason"]
    assert len(run.sites) == 300 and run.damage == []
    assert run.records_readable == stats["records_written"]
    rng = np.random.default_rng(0)
    want = [[np.unpackbits(np.frombuffer(rng.bytes(2048), np.uint8)).reshape(16, 8, 128) != 0
             for _ in range(300)] for _ in range(40)]
    for k in (0, 150, 299):
        site = run[f"s{k}"]
        for i in range(len(site)):
            assert np.array_equal(site.noise(i), want[int(site.steps[i])][k])
