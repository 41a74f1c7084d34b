"""Small run files made with h5py alone, and the ways a crafted or damaged file can lie.

``tiny_run`` writes the run layout with contiguous datasets (a few KB, where the writer's
chunked file takes ~100 KB a site); each function in ``DAMAGES`` turns such a file into one
case of a class of issue 18 (links out of the file, storage outside it, values the file does
not back, JSON bombs, text that attacks a terminal). ``tests/data/make_corpus.py`` keeps one
file per case under ``tests/data``; the fuzz test draws from the same functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from dropspy.records import FORMAT_NAME, FORMAT_VERSION, SiteInfo, _attr_value

AXES = ("batch", "feature")
FIFO_NAME = "dropspy-test-fifo"  # the target of external-link-fifo.h5, beside the file


def tiny_run(path: Path, *, records: int = 4, sites: int = 1, complete: bool = True,
             seed: int = 0) -> Path:
    """A valid run: ``sites`` sites of ``records`` (4, 6) masks with (4, 1) or (4, 6) noise."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w", libver="latest", meta_block_size=256) as f:
        for key, value in (("format", FORMAT_NAME), ("format_version", FORMAT_VERSION),
                           ("dropspy_version", "0"), ("framework", "crafted"),
                           ("framework_version", "1"), ("backend", ""), ("devices", "[]"),
                           ("rank", 0), ("world_size", 1), ("host", "h"), ("started", "t")):
            f.attrs[key] = _attr_value(value)
        status = {"closed_cleanly": int(complete), "records_written": records * sites,
                  "records_dropped": {}, "stop_reason": "", "notes": []}
        f.create_dataset("status", data=np.array([json.dumps(status).encode()], "S512"))
        g = f.create_group("sites")
        for k in range(sites):
            s = g.create_group(f"{k:06d}")
            info = SiteInfo(f"site{k}", f"layer{k}", "Dropout", "output", AXES, 0.5)
            for key, value in info.to_attrs().items():
                s.attrs[key] = value
            nshape = (4, 1) if k % 2 else (4, 6)
            size = (int(np.prod(nshape)) + 7) // 8
            bits = [np.packbits(rng.random(nshape) >= 0.5) for _ in range(records)]
            s["step"] = np.arange(records, dtype=np.int64)
            s["call"] = np.zeros(records, np.int32)
            s["training"] = np.ones(records, np.uint8)
            s["applied"] = np.ones(records, np.uint8)
            s["shape"] = np.tile(np.array([4, 6], np.int64), (records, 1))
            s["noise_shape"] = np.tile(np.array(nshape, np.int64), (records, 1))
            s["offset"] = np.arange(records, dtype=np.int64) * size
            s["bits"] = np.concatenate(bits) if bits else np.empty(0, np.uint8)
            s["step"].dims[0].label = "record"  # the one label validate looks at
    return path


def _site(f: h5py.File, k: int = 0) -> h5py.Group:
    return f["sites"][f"{k:06d}"]


def _replace(g: h5py.Group, name: str, **kw: object) -> None:
    del g[name]
    g.create_dataset(name, **kw)  # type: ignore[arg-type]


def _edit(fn: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            fn(f)
    return damage


def _set_status(text: str) -> Callable[[Path], None]:
    def fn(f: h5py.File) -> None:
        del f["status"]
        f.create_dataset("status", data=np.array([text.encode()]))
    return _edit(fn)


def _column(name: str, values: object, dtype: object = None) -> Callable[[Path], None]:
    def fn(f: h5py.File) -> None:
        g = _site(f)
        arr = np.asarray(values, dtype=dtype)
        _replace(g, name, data=arr)
    return _edit(fn)


def _row(name: str, row: int, value: object) -> Callable[[Path], None]:
    def fn(f: h5py.File) -> None:
        d = _site(f)[name]
        data = d[()]
        data[row] = value
        d[...] = data
    return _edit(fn)


def _attr(name: str, value: object, site: bool = True) -> Callable[[Path], None]:
    def fn(f: h5py.File) -> None:
        (_site(f) if site else f).attrs[name] = value
    return _edit(fn)


def _external_link(f: h5py.File) -> None:
    g = f["sites"]
    del g["000000"]
    g["000000"] = h5py.ExternalLink("other_run.h5", "/sites/000000")


def _fifo_link(f: h5py.File) -> None:
    # An external link to a FIFO hung every command before the reader refused links. The
    # name is relative: HDF5 looks for it next to the file, where each test makes its FIFO.
    bits = _site(f)
    del bits["bits"]
    bits["bits"] = h5py.ExternalLink(FIFO_NAME, "/x")


def _soft_link(f: h5py.File) -> None:
    g = _site(f)
    del g["bits"]
    g["bits"] = h5py.SoftLink("/sites/000000/offset")


def _external_storage(f: h5py.File) -> None:
    g = _site(f)
    del g["bits"]
    g.create_dataset("bits", shape=(64,), dtype="u1", external=[("/etc/passwd", 0, 64)])


def _virtual(f: h5py.File) -> None:
    g = _site(f)
    del g["bits"]
    layout = h5py.VirtualLayout(shape=(64,), dtype="u1")
    layout[:] = h5py.VirtualSource("other_run.h5", "/sites/000000/bits", shape=(64,))
    g.create_virtual_dataset("bits", layout)


def _huge_rows(f: h5py.File) -> None:
    # 2^40 rows declared in a few KB: chunks never written read as fill values.
    g = _site(f)
    _replace(g, "step", shape=(4,), maxshape=(None,), chunks=(4,), dtype="i8",
             data=np.arange(4))
    g["step"].resize((1 << 40,))


def _broadcast_bomb(f: h5py.File) -> None:
    # A sound row: (1, 1) noise broadcast to 2^20 x 2^20 (a terabyte if ever copied).
    g = _site(f)
    for name, value in (("shape", [1 << 20, 1 << 20]), ("noise_shape", [1, 1])):
        data = g[name][()]
        data[0] = value
        g[name][...] = data


def _bits_group(f: h5py.File) -> None:
    g = _site(f)
    del g["bits"]
    g.create_group("bits")


def _sites_dataset(f: h5py.File) -> None:
    del f["sites"]
    f["sites"] = np.arange(3)


def _duplicate_name(f: h5py.File) -> None:
    f.copy(_site(f, 0), f["sites"], name="000009")


#: name -> function damaging a ``tiny_run(sites=2)`` file in place. Each is one crafted case.
DAMAGES: dict[str, Callable[[Path], None]] = {
    "external-link-site": _edit(_external_link),
    "external-link-fifo": _edit(_fifo_link),
    "soft-link": _edit(_soft_link),
    "external-storage-passwd": _edit(_external_storage),
    "virtual-dataset": _edit(_virtual),
    "rows-2-40": _edit(_huge_rows),
    "shape-negative": _row("shape", 1, [-4, 6]),
    "shape-zero-noise-nonzero": _row("shape", 1, [0, 6]),
    "shape-overflow": _row("shape", 0, [1 << 40, 1 << 40]),
    "broadcast-bomb": _edit(_broadcast_bomb),
    "noise-not-broadcasting": _row("noise_shape", 2, [4, 5]),
    "noise-2-40": _row("noise_shape", 0, [1 << 40, 1]),
    "offset-negative": _row("offset", 2, -7),
    "offset-int64-max": _row("offset", 3, (1 << 63) - 1),
    "offset-past-end": _row("offset", 1, 10_000),
    "call-negative": _row("call", 0, -1),
    "record-rate-infinite": _edit(lambda f: _site(f).create_dataset(
        "rate", data=np.array([0.5, 0.5, np.inf, 0.5], np.float32))),
    "step-nan": _column("step", [0.0, np.nan, 2.0, 3.0]),
    "step-text": _column("step", np.array([b"a", b"b", b"c", b"d"])),
    "step-2d": _column("step", np.zeros((4, 2), np.int64)),
    "bits-bool": _column("bits", np.ones(12, bool)),
    "bits-float": _column("bits", np.ones(12, np.float32)),
    "bits-int64": _column("bits", np.ones(12, np.int64)),
    "bits-text": _column("bits", np.array([b"xxxxxxxxxxxx"])),
    "bits-scalar": _column("bits", np.uint8(7)),
    "bits-group": _edit(_bits_group),
    "sites-dataset": _edit(_sites_dataset),
    "status-empty": _set_status(""),
    "status-list": _set_status("[1, 2, 3]"),
    "status-infinity": _set_status('{"closed_cleanly": 1, "records_written": Infinity}'),
    "status-deep": _set_status("[" * 5000 + "]" * 5000),
    "status-int-2-40": _set_status(str(1 << 40)),
    "status-wrong-types": _set_status('{"closed_cleanly": 1, "records_dropped": [1], '
                                      '"notes": "x"}'),
    "extra-not-object": _attr("extra", _attr_value("[1, 2]")),
    "extra-deep": _attr("extra", _attr_value("[" * 5000 + "]" * 5000)),
    "extra-nan": _attr("extra", _attr_value('{"a": NaN}')),
    "name-not-text": _attr("name", 5),
    "name-array": _attr("name", np.array([0, 0])),
    "name-markup": _attr("name", _attr_value("[link=http://evil]x[/link][/bold]\x1b[2J")),
    "name-not-utf8": _attr("name", b"\x80\xff\x1b[2J"),  # h5py: lone surrogates
    "name-mathtext": _attr("name", _attr_value("$\\frac{1}{$^_\x1b")),
    "rate-infinite": _attr("rate", float("inf")),
    "rate-text": _attr("rate", _attr_value("0.5")),
    "rate-1e308": _attr("rate", 1e308),
    "axes-repeated": _attr("axes", _attr_value('["batch", "batch"]')),
    "axes-rank-mismatch": _attr("axes", _attr_value('["batch", "time", "feature"]')),
    "axes-not-list": _attr("axes", _attr_value('{"a": 1}')),
    "root-rank-text": _attr("rank", _attr_value("zero"), site=False),
    "root-format-version-text": _attr("format_version", _attr_value("1"), site=False),
    "duplicate-site-name": _edit(_duplicate_name),
    "stop-reason-escape": _set_status('{"closed_cleanly": 0, "records_written": 8, '
                                      '"stop_reason": "\\u001b[2J\\u001b]8;;x\\u0007", '
                                      '"notes": ["\\u001b[31mred"]}'),
}


def crafted(directory: Path, name: str) -> Path:
    """``tiny_run`` damaged by ``DAMAGES[name]``, at ``directory/<name>.h5``."""
    path = tiny_run(directory / f"{name}.h5", sites=2)
    DAMAGES[name](path)
    return path


def flip_bytes(path: Path, offsets: list[int], out: Path) -> Path:
    """A copy of ``path`` with the byte at each offset inverted."""
    data = bytearray(path.read_bytes())
    for o in offsets:
        data[o % len(data)] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


def truncate(path: Path, size: int, out: Path) -> Path:
    """A copy of ``path`` cut to ``size`` bytes."""
    out.write_bytes(path.read_bytes()[:size])
    return out


KILLED_CHILD = """
import os, sys, time, numpy as np
import dropspy.writer as writer
writer._BITS_CHUNK, writer._INDEX_CHUNK_ROWS = 256, 8  # a small file, several chunks a site
from dropspy.records import Record, SiteInfo
w = writer.RunWriter(sys.argv[1], {"framework": "test"}, flush_seconds=0.01, flush_bytes=1)
for k in range(2):
    w.declare_site(SiteInfo(f"s{k}", f"s{k}", "Dropout", "output", ("batch", "feature"), 0.3))
for step in range(12):
    w.submit([Record(f"s{k}", step, 0, True, (4, 6),
                     noise=np.random.default_rng(step).random((4, 6)) > 0.3) for k in range(2)])
    time.sleep(0.005)
time.sleep(0.3)
os.kill(os.getpid(), 9)
"""


def killed_run(path: Path) -> Path:
    """A run whose writer was SIGKILLed after flushing (flagged open for write, SWMR)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", KILLED_CHILD, str(path)], env=env, timeout=120,
                   capture_output=True)
    return path
