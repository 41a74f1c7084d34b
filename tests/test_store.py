"""The run file: writer and reader round trips, layout, counting, bad input."""

from __future__ import annotations

import json
import math
import os
import threading

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dropspy
from dropspy.errors import DropspyError, RunFileError
from dropspy.records import FORMAT_VERSION, Record, SiteInfo
from dropspy.runset import load
from dropspy.store import validate_file
from dropspy.writer import RunWriter


def _site(name="drop", axes=("batch", "time", "feature"), rate=0.3, **kw):
    return SiteInfo(name=name, layer=name, layer_class="Dropout", role="output", axes=axes,
                    rate=rate, **kw)


@st.composite
def _records(draw):
    rank = draw(st.integers(1, 4))
    n = draw(st.integers(1, 6))
    recs = []
    for _i in range(n):
        shape = tuple(draw(st.integers(1, 7)) for _ in range(rank))
        noise_shape = tuple(s if draw(st.booleans()) else 1 for s in shape)
        rate = draw(st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
        seed = draw(st.integers(0, 2**31))
        noise = np.random.default_rng(seed).random(noise_shape) >= rate
        recs.append((shape, noise, draw(st.booleans())))
    return rank, recs


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_records())
def test_random_masks_read_back_bit_for_bit(tmp_path, data):
    rank, recs = data
    path = tmp_path / "prop.h5"
    w = RunWriter(path, {"framework": "test"})
    axes = tuple(f"axis{k}" for k in range(rank))
    w.declare_site(_site(axes=axes))
    batch = []
    for i, (shape, noise, packed) in enumerate(recs):
        if packed:
            batch.append(Record("drop", step=i, call=0, training=True, shape=shape,
                                packed=np.packbits(noise.ravel()), noise_shape=noise.shape))
        else:
            batch.append(Record("drop", step=i, call=0, training=True, shape=shape,
                                noise=noise.astype(np.uint8)))
    w.submit(batch)
    w.close()
    with load(path) as run:
        site = run["drop"]
        assert len(site) == len(recs)
        for i, (shape, noise, _) in enumerate(recs):
            assert np.array_equal(site.noise(i), noise)
            want = np.broadcast_to(noise, shape)
            got = site.mask(i)
            assert got.dtype == np.bool_ and got.shape == shape
            assert np.array_equal(got, want)
        streamed = [m for _, m in site.iter_noise(max_bytes=3)]
        assert all(np.array_equal(m, r[1]) for m, r in zip(streamed, recs))
        batched = {int(i): m for idx, ms in site.iter_batches(max_bytes=3, max_records=2)
                   for i, m in zip(idx, ms)}
        assert sorted(batched) == list(range(len(recs)))
        assert all(np.array_equal(batched[i], r[1]) for i, r in enumerate(recs))
        assert validate_file(path) == []


def test_variable_batch_and_unapplied_records(tmp_path):
    path = tmp_path / "var.h5"
    rng = np.random.default_rng(1)
    full = rng.random((32, 1, 8)) > 0.5
    last = rng.random((5, 1, 8)) > 0.5
    with RunWriter(path, {"framework": "test"}) as w:
        w.declare_site(_site(noise_shape=(None, 1, None)))
        w.submit([Record("drop", 0, 0, True, (32, 10, 8), noise=full)])
        w.submit([Record("drop", 1, 0, True, (5, 10, 8), noise=last),
                  Record("drop", 1, 1, False, (5, 10, 8))])
    run = load(path)
    site = run["drop"]
    assert site.shapes.tolist() == [[32, 10, 8], [5, 10, 8], [5, 10, 8]]
    assert site.noise_shapes.tolist() == [[32, 1, 8], [5, 1, 8], [0, 0, 0]]
    assert site.applied.tolist() == [True, True, False]
    assert site.training.tolist() == [True, True, False]
    assert np.array_equal(site.mask(1), np.broadcast_to(last, (5, 10, 8)))
    assert site.mask(2) is None and site.noise(2) is None
    assert [i.tolist() for i, _ in site.iter_batches()] == [[0], [1]]
    assert [m.shape for m in site.masks(step=1) if m is not None] == [(5, 10, 8)]
    assert site.noise_shape == (None, 1, None)
    run.close()


def test_file_is_self_describing_with_h5py_alone(tmp_path):
    path = tmp_path / "raw.h5"
    noise = np.random.default_rng(2).random((3, 11)) > 0.2
    with RunWriter(path, {"framework": "test", "framework_version": "0"}) as w:
        w.declare_site(_site(name="lstm/input/i", axes=("batch", "feature"), gate="i"))
        w.submit([Record("lstm/input/i", 7, 0, True, (3, 11), noise=noise)])
    with h5py.File(path, "r") as f:
        # Text attributes are fixed-length UTF-8 (bytes in h5py): see records._attr_value.
        assert f.attrs["format"].decode() == "dropspy.run"
        assert f.attrs["format_version"] == FORMAT_VERSION
        status = json.loads(f["status"][0].rstrip(b"\0"))
        assert status["closed_cleanly"] == 1 and status["records_written"] == 1
        g = f["sites/000000"]
        assert g.attrs["name"].decode() == "lstm/input/i" and g.attrs["gate"].decode() == "i"
        assert json.loads(g.attrs["axes"]) == ["batch", "feature"]
        assert g["bits"].dtype == np.uint8 and g["bits"].chunks is not None
        assert [d.label for d in g["shape"].dims] == ["record", "axis"]
        o = int(g["offset"][0])
        raw = g["bits"][o:o + math.ceil(noise.size / 8)]
        assert np.array_equal(np.unpackbits(raw, count=noise.size).reshape(3, 11), noise)
        assert g["step"][0] == 7


def test_declared_site_without_records_is_in_the_file(tmp_path):
    path = tmp_path / "empty_site.h5"
    with RunWriter(path) as w:
        w.declare_site(_site(name="never", opaque="cuDNN keeps its mask"))
    run = load(path)
    assert run.sites == ("never",)
    assert len(run["never"]) == 0 and run["never"].opaque == "cuDNN keeps its mask"


def test_max_bytes_drops_and_counts(tmp_path):
    path = tmp_path / "budget.h5"
    noise = np.ones((8, 8), bool)  # 8 bytes packed
    with RunWriter(path, max_bytes=20) as w:
        w.declare_site(_site(axes=("batch", "feature")))
        w.submit([Record("drop", i, 0, True, (8, 8), noise=noise) for i in range(5)])
    run = load(path)
    assert len(run["drop"]) == 2
    assert run.records_dropped["max_bytes"] == 3
    assert run.records_written == 2 and run.complete


def test_full_queue_with_drop_policy_counts_every_record(tmp_path):
    path = tmp_path / "queue.h5"
    w = RunWriter(path, on_full="drop", queue_steps=1)
    w.declare_site(_site(axes=("batch",)))
    # Stall the writer thread on its first batch so the queue fills up.
    gate = threading.Event()
    real_buffer = w._buffer

    def slow_buffer(batch):
        gate.wait(10)
        return real_buffer(batch)

    w._buffer = slow_buffer
    noise = np.ones((4,), bool)
    for i in range(50):
        w.submit([Record("drop", i, 0, True, (4,), noise=noise)])
    gate.set()
    w.close()
    run = load(path)
    dropped = run.records_dropped["queue_full"]
    assert dropped > 0
    assert len(run["drop"]) + dropped == 50


def test_write_error_is_recorded_not_raised(tmp_path):
    path = tmp_path / "err.h5"
    w = RunWriter(path)
    w.declare_site(_site(axes=("batch",)))
    w.submit([Record("undeclared", 0, 0, True, (4,), noise=np.ones(4, bool))])
    w.close()
    assert w.error is not None and "undeclared" in w.error
    run = load(path)
    assert not run.complete
    assert "undeclared" in run.attrs["stop_reason"]
    assert run.records_dropped["write_error"] == 1


def test_bad_records_are_refused_with_both_sides(tmp_path):
    from dropspy.writer import _check_record

    with pytest.raises(ValueError, match=r"noise shape \(3, 2\) does not broadcast.*\(3, 4\)"):
        _check_record(Record("s", 0, 0, True, (3, 4), noise=np.ones((3, 2), bool)), 2)
    with pytest.raises(ValueError, match="rank 1, expected rank 2"):
        _check_record(Record("s", 0, 0, True, (3,), noise=np.ones((3,), bool)), 2)
    with pytest.raises(ValueError, match="role"):
        SiteInfo("s", "s", "X", "nonsense", ("batch",), 0.1)


def test_close_is_idempotent_and_context_managed(tmp_path):
    w = RunWriter(tmp_path / "c.h5")
    w.close()
    w.close()
    assert load(tmp_path / "c.h5").complete


def _write_small_run(path):
    with RunWriter(path, {"framework": "test"}) as w:
        w.declare_site(_site(axes=("batch",)))
        w.submit([Record("drop", 0, 0, True, (4,), noise=np.ones(4, bool))])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: p.write_bytes(os.urandom(4096)), "not an HDF5 file"),
        (lambda p: h5py.File(p, "w").close(), "not a dropspy run file"),
        (lambda p: (_write_small_run(p), _set_attr(p, "format_version", FORMAT_VERSION + 1)),
         f"format version {FORMAT_VERSION + 1} is not supported"),
        (lambda p: (_write_small_run(p), _truncate(p, 0.5)), str),
    ],
    ids=["missing", "directory", "empty", "random-bytes", "plain-hdf5", "newer-version",
         "truncated"],
)
def test_bad_input_gives_one_run_file_error_naming_the_path(tmp_path, make, message):
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(RunFileError) as info:
        load(path)
    assert isinstance(info.value, DropspyError) and isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    if isinstance(message, str):
        assert message in str(info.value)
    with pytest.raises(RunFileError):
        validate_file(path)


def _set_attr(path, key, value):
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value


def _truncate(path, fraction):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * fraction))


def test_validate_reports_layout_problems(tmp_path):
    path = tmp_path / "v.h5"
    _write_small_run(path)
    assert validate_file(path) == []
    with h5py.File(path, "r+") as f:
        f["sites/000000"].attrs["role"] = "sideways"
        del f["sites/000000/call"]
    problems = validate_file(path)
    assert any("role" in p and "sideways" in p for p in problems)
    assert any("call: missing dataset" in p for p in problems)


def test_reader_never_evaluates_stored_text(tmp_path):
    path = tmp_path / "evil.h5"
    _write_small_run(path)
    with h5py.File(path, "r+") as f:
        f["status"][0] = b"__import__('os').system('false')"
    with pytest.raises(RunFileError, match="not valid JSON"):
        load(path)
    _write_small_run(path)
    _set_attr(path, "devices", "__import__('os')")
    with pytest.raises(RunFileError, match="not valid JSON"):
        load(path)


def test_public_api_is_small_and_explicit():
    assert set(dropspy.__all__) >= {"record", "load", "Run", "DropspyError", "RunFileError"}
    for name in dropspy.__all__:
        assert hasattr(dropspy, name)


def test_run_report_analyses_the_planted_structure(tmp_path):
    path = tmp_path / "report.h5"
    rng = np.random.default_rng(5)
    with RunWriter(path, {"framework": "test"}) as w:
        w.declare_site(_site(noise_shape=(None, 1, None), rate=0.3))
        w.submit([Record("drop", s, 0, True, (32, 12, 16), noise=rng.random((32, 1, 16)) >= 0.3)
                  for s in range(6)])
    report = load(path).report()
    site = report["drop"]
    assert site.pattern == "time-shared"
    assert site.shared_axes == ("time",) or list(site.shared_axes) == ["time"]
    assert set(site.independent_axes) == {"batch", "feature"}


def test_replica_of_each_record_round_trips_and_version_1_files_read_as_replica_0(tmp_path):
    from dropspy.store import validate_file

    path = tmp_path / "run.h5"
    with RunWriter(path, {"framework": "test"}) as w:
        w.declare_site(_site(axes=("batch",)))
        w.submit([Record("drop", 0, 0, True, (4,), noise=np.ones(4, bool), replica=r)
                  for r in (0, 1)])
        w.submit([Record("drop", 1, 0, True, (4,), noise=np.zeros(4, bool), replica=1)])
    with load(path) as run:
        assert run["drop"].replicas.tolist() == [0, 1, 1]
    assert validate_file(path) == []
    # The same file as version 1 wrote it: no replica dataset, format_version 1.
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 1
        for g in f["sites"].values():
            del g["replica"]
    with load(path) as run:
        assert run["drop"].replicas.tolist() == [0, 0, 0]
        assert run["drop"].steps.tolist() == [0, 0, 1]
    assert validate_file(path) == []


@pytest.mark.parametrize("bad_row", [100, 4999])
def test_damage_far_from_the_end_is_read_up_to_and_named(tmp_path, monkeypatch, bad_row):
    # A bad row more than 4096 rows from the end used to pass the length check (only the
    # tail was looked at) and stop the analysis with an error (exit 2) when reached.
    from _crafted import tiny_run
    from typer.testing import CliRunner

    import dropspy.store as store
    from dropspy.cli import app

    monkeypatch.setattr(store, "_BLOCK_ROWS", 1024)  # several blocks, as in a large file
    path = tiny_run(tmp_path / "far.h5", records=5000)
    with h5py.File(path, "r+") as f:
        f["sites/000000/shape"][bad_row] = [-1, 6]
    with load(path) as run:
        site = run["site0"]
        assert len(site) == bad_row
        assert f"record {bad_row}: applied shape (-1, 6)" in site.damage
        assert site.mask(bad_row - 1).shape == (4, 6)
        assert sum(1 for _ in site.iter_noise()) == bad_row
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    damaged = [f for f in report["findings"] if f["code"] == "file-damaged"]
    assert damaged and f"record {bad_row}" in json.dumps(damaged)
