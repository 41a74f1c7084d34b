"""The run file writer: a background thread behind a bounded queue, HDF5 in SWMR mode.

Layout (documented in ``schemas/run.schema.json``)::


    /                      attrs: format, format_version, dropspy_version, framework, ...
    /sites/<000000>/       attrs: name, layer, layer_class, role, gate, axes, rate, ...
        step      (n,)        int64   training step of each record
        call      (n,)        int32   index among calls of the site within the step
        training  (n,)        uint8   the model was in training mode
        applied   (n,)        uint8   a mask was applied (0: the call applied no dropout)
        shape     (n, rank)   int64   applied-mask shape
        noise_shape (n, rank) int64   shape of the drawn noise (broadcasts to ``shape``)
        offset    (n,)        int64   byte offset of the record's packed noise in ``bits``
        replica   (n,)        int32   replica (device copy in one process) that drew it
                                      (format version 2; absent in version 1: replica 0)
        rate      (n,)        float32 drop rate the call was made with; NaN: the site's
                                      (format version 2; absent in version 1: site rate)
        bits      (m,)        uint8   keep-noise, 1 bit per element, np.packbits order
                                      (big bit order, C order), each record byte-aligned

Site groups are numbered, not named after sites, because site names contain ``/``. The file is
written in HDF5 SWMR mode, so a writer killed at any moment leaves a file that opens and holds
every record appended before the last flush.

Over 600 lines for one concept, getting records into the file and nothing lost: the queue and
thread, the appends, the free-space reserve (measured: HDF5 does not survive a failed write),
the drop accounting and the atomic creation of the file with its refusal to replace what is
not a run.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import math
import os
import queue
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

from dropspy._version import __version__
from dropspy.errors import RunFileError
from dropspy.records import (
    DROP_CAUSES,
    FORMAT_NAME,
    FORMAT_VERSION,
    Record,
    SiteInfo,
    _attr_value,
)

__all__ = ["RunWriter"]

_RESERVED = ("format", "format_version", "dropspy_version", "closed_cleanly", "records_written",
             "records_dropped", "stop_reason", "notes", "host", "started")
_STATUS_BYTES = 1 << 16
# Chunk sizes. Every chunk of an uncompressed dataset is allocated whole on its first write, so
# these are also each site's minimum footprint: (8+4+1+1+8 + 2*8*rank) * 512 bytes of index
# (35 KiB at rank 3) and 64 KiB of bits.
_INDEX_CHUNK_ROWS = 512
_BITS_CHUNK = 1 << 16


def _check_record(rec: Record, rank: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
    """Validate one record and return (applied shape, noise_shape, packed bytes).

    Runs on the writer thread for every record with the GIL held (training waits for it):
    kept to a few numpy calls.
    """
    shape = tuple(map(int, rec.shape))
    if len(shape) != rank:
        raise ValueError(
            f"Record for site {rec.site!r}: applied shape {shape} has rank {len(shape)}, "
            f"expected rank {rank} (the site's axes)"
        )
    if rec.noise is None and rec.packed is None:
        return shape, (0,) * rank, _NO_BITS
    if rec.packed is not None:
        if rec.noise_shape is None:
            raise ValueError(
                f"Record for site {rec.site!r}: packed noise given without noise_shape")
        nshape = tuple(map(int, rec.noise_shape))
        packed = np.ascontiguousarray(rec.packed, dtype=np.uint8).ravel()
        need = (math.prod(nshape) + 7) // 8
        if packed.size != need:
            raise ValueError(
                f"Record for site {rec.site!r}: packed noise has {packed.size} bytes, "
                f"noise_shape {nshape} needs {need}"
            )
    else:
        noise = np.asarray(rec.noise)
        nshape = noise.shape
        packed = np.packbits(noise if noise.dtype == np.bool_ else noise != 0, axis=None)
    if len(nshape) != rank or any(n != 1 and n != s for n, s in zip(nshape, shape)):
        raise ValueError(
            f"Record for site {rec.site!r}: noise shape {nshape} does not broadcast to the "
            f"applied shape {shape} at the same rank"
        )
    return shape, nshape, packed


_NO_BITS = np.empty(0, np.uint8)
_NO_BITS.flags.writeable = False


class _DiskFull(OSError):
    """Appending would leave less than the reserve: stop before HDF5 hits a failed write."""


class _SiteBuffer:
    """Rows of one site waiting to be appended (the writer thread owns it)."""

    __slots__ = ("group", "rank", "rows", "chunks", "nbytes", "dsets", "n_records", "n_bytes")

    def __init__(self, group: h5py.Group | None, rank: int) -> None:
        self.rank = rank
        # step, call, training, applied, shape, noise shape, replica, rate
        self.rows: list[tuple[int, int, int, int, tuple[int, ...], tuple[int, ...], int,
                              float]] = []
        self.chunks: list[np.ndarray] = []
        self.nbytes = 0
        self.group: h5py.Group | None = None
        self.dsets: dict[str, h5py.Dataset] = {}
        self.n_records = 0
        self.n_bytes = 0
        if group is not None:
            self.attach(group)

    def attach(self, group: h5py.Group) -> None:
        """Bind the buffer to its site group, made once the disk has room for it."""
        self.group = group
        # Datasets and lengths kept here: looking datasets up and asking HDF5 for their shapes
        # at every append cost more than the appends (bench_writer, 12 sites: ~27 ms a flush).
        self.dsets = {name: group[name] for name in _DTYPES}
        self.n_records = int(self.dsets["step"].shape[0])
        self.n_bytes = int(self.dsets["bits"].shape[0])

    def growth(self) -> int:
        """Bytes appending the buffered rows may add to the file.

        HDF5 allocates every chunk of an uncompressed dataset whole at its first write: a
        site's first append takes 64 KiB of bits and ~35 KiB of index (rank 3) however small
        its records. Counting only the records' bytes let 200 sites' first flush (~20 MB)
        overrun an 8 MiB reserve: a failed write, then a segfault at exit.
        """
        if not self.rows:
            return 0
        n0, n = self.n_records, len(self.rows)
        rows = -(-(n0 + n) // _INDEX_CHUNK_ROWS) - -(-n0 // _INDEX_CHUNK_ROWS)
        bits = -(-(self.n_bytes + self.nbytes) // _BITS_CHUNK) - -(-self.n_bytes // _BITS_CHUNK)
        row_bytes = sum(np.dtype(t).itemsize * (max(self.rank, 1) if k in _WIDE else 1)
                        for k, t in _DTYPES.items() if k != "bits")
        return (rows * _INDEX_CHUNK_ROWS * row_bytes + bits * _BITS_CHUNK
                + (rows + bits) * _CHUNK_META + 64 * n)


_WIDE = ("shape", "noise_shape")  # datasets with one column per axis
# File metadata measured per site group with its datasets (~5.4 KB) and per chunk allocated
# (chunk index entries; ~3.3 KB for a site's first 8 chunks), rounded up.
_SITE_META = 8 << 10
_CHUNK_META = 1 << 10
_DTYPES = {"step": np.int64, "call": np.int32, "training": np.uint8, "applied": np.uint8,
           "offset": np.int64, "shape": np.int64, "noise_shape": np.int64, "bits": np.uint8,
           "replica": np.int32, "rate": np.float32}


def _append(d: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Extend ``d`` along its first axis and write ``values`` (of ``d``'s dtype) at ``start``.

    h5py's low-level calls: ``resize`` plus slice assignment spend ~0.3 ms per call building
    selections and checking dtypes in Python, with the GIL held, while training waits for it.
    """
    values = np.ascontiguousarray(values)
    d.id.set_extent((start + values.shape[0],) + values.shape[1:])
    if values.size == 0:
        return
    fspace = d.id.get_space()
    fspace.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
    d.id.write(h5py.h5s.create_simple(values.shape), fspace, values)


class RunWriter:
    """Writes records to a run file from a background thread.

    Training threads call :meth:`submit` once per step; packing and HDF5 appends happen in
    the writer thread. Records that cannot be written are counted by cause in the file.

    Args:
        path: Where to create the run file. An existing dropspy run there is replaced;
            any other file is refused (RunFileError), never overwritten.
        meta: Root attributes from the adapter (framework, framework_version, backend,
            devices, ...) and the recorder (config).
        max_bytes: Budget of packed mask bytes; records past it are dropped and counted.
        on_full: ``"block"`` (training waits for the writer) or ``"drop"`` (records of a
            step that finds the queue full are dropped and counted).
        queue_steps: Capacity of the queue, in submitted steps.
        flush_seconds: Longest time between flushes to disk.
        flush_bytes: Buffered packed bytes that trigger an append.
        reserve_bytes: Free space (disk, or the process's file-size limit) that must remain
            after an append; with less, recording stops before the disk fills up (HDF5 does
            not survive a failed write: it crashed the process with a segfault or a double
            free at close when we filled a small filesystem), and the file stays readable.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: Mapping[str, Any] | None = None,
        *,
        max_bytes: int | None = None,
        on_full: str = "block",
        queue_steps: int = 256,
        flush_seconds: float = 2.0,
        flush_bytes: int = 4 << 20,
        reserve_bytes: int = 8 << 20,
    ) -> None:
        if on_full not in ("block", "drop"):
            raise ValueError(
                f"Invalid value received for argument `on_full`. Expected 'block' or 'drop'. "
                f"Received: on_full={on_full!r}"
            )
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"Invalid max_bytes. Expected an int >= 0. Received: {max_bytes!r}")
        self.path = Path(path)
        self.reserve_bytes = reserve_bytes
        self._stop_cause = "write_error"
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.flush_seconds = flush_seconds
        self.flush_bytes = flush_bytes
        self._lock = threading.Lock()
        # The causes the writer itself can meet start at 0, so the file shows them even when none
        # happened; policy and capture causes appear once counted.
        self._dropped = dict.fromkeys(DROP_CAUSES[:5], 0)
        self._written = 0
        self._flushed = 0
        self._bytes = 0
        self._error: str | None = None
        self._warned = False
        self._closed = False
        self._sites: dict[str, SiteInfo] = {}
        self._pending_sites: list[SiteInfo] = []
        self._queue: queue.Queue[list[Record] | None] = queue.Queue(maxsize=queue_steps)
        for key in meta or {}:
            if key in _RESERVED:
                raise ValueError(f"Root attribute {key!r} is set by the writer, not by an adapter")
        _check_replaceable(self.path)
        _remove_stale_temporaries(self.path)
        # Created complete under a hidden name, then renamed: a process killed right after
        # entering record() left a 48-byte file that did not open (1 of 12 kills within 30 ms).
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(tmp, "w", libver="latest")
        except OSError as exc:
            raise RunFileError(f"{self.path}: cannot create run file: {exc}") from exc
        try:
            self._write_header(meta)
            os.replace(tmp, self.path)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise RunFileError(f"{self.path}: cannot create run file: {exc}") from exc
            raise
        self._thread = threading.Thread(target=self._run, name="dropspy-writer", daemon=True)
        self._thread.start()
        _OPEN_WRITERS.add(self)

    def _write_header(self, meta: Mapping[str, Any] | None) -> None:
        """Root attributes, ``/sites`` and ``/status``, flushed, then SWMR mode on."""
        root = self._file.attrs
        root["format"] = _attr_value(FORMAT_NAME)
        root["format_version"] = FORMAT_VERSION
        root["dropspy_version"] = _attr_value(__version__)
        for key, value in (meta or {}).items():
            root[key] = _attr_value(value)
        for key, default in (("framework", "unknown"), ("framework_version", ""),
                             ("backend", ""), ("devices", "[]"), ("rank", 0),
                             ("world_size", 1)):
            if key not in root:
                root[key] = _attr_value(default)
        root["host"] = _attr_value(os.uname().nodename)
        root["started"] = _attr_value(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self._notes: list[str] = []
        self._sites_group = self._file.create_group("sites")
        status = self._file.create_dataset("status", (1,), dtype=f"S{_STATUS_BYTES}")
        status.attrs["content"] = _attr_value(
            "JSON: closed_cleanly, records_written, records_dropped, stop_reason, notes")
        self._buffers: dict[str, _SiteBuffer] = {}
        self._unmade: list[SiteInfo] = []
        self._groups_made = 0
        self._write_status(closed=False)
        self._file.flush()
        self._file.swmr_mode = True

    # -- called from training threads -------------------------------------------------

    def declare_site(self, info: SiteInfo) -> None:
        """Declare a site (idempotent for an identical declaration)."""
        with self._lock:
            old = self._sites.get(info.name)
            if old is not None:
                if old != info:
                    raise ValueError(
                        f"Site {info.name!r} declared twice with different metadata "
                        f"(existing {old} vs new {info})"
                    )
                return
            self._sites[info.name] = info
            self._pending_sites.append(info)

    def note(self, message: str) -> None:
        """Store a message for the user in the file (root attribute ``notes``)."""
        with self._lock:
            self._notes.append(message)

    def submit(self, records: Sequence[Record]) -> None:
        """Hand one step's records to the writer thread."""
        if not records:
            return
        if self._closed or self._error is not None:
            self.count_dropped(self._stop_cause, len(records))
            return
        batch = list(records)
        if self.on_full == "block":
            self._queue.put(batch)
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.count_dropped("queue_full", len(batch))

    def count_dropped(self, cause: str, n: int = 1) -> None:
        """Count ``n`` records that will not be written, by cause."""
        with self._lock:
            self._dropped[cause] = self._dropped.get(cause, 0) + n

    @property
    def error(self) -> str | None:
        """Why writing stopped, or None."""
        return self._error

    @property
    def stats(self) -> dict[str, Any]:
        """Records written, dropped by cause, packed bytes written, error."""
        with self._lock:
            return {
                "records_written": self._written,
                "records_flushed": self._flushed,
                "records_dropped": dict(self._dropped),
                "bytes": self._bytes,
                "sites": len(self._sites),
                "error": self._error,
            }

    def close(self) -> None:
        """Drain the queue, write the final status and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        _OPEN_WRITERS.discard(self)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        last_flush = time.monotonic()
        buffered = 0
        while True:
            timeout = max(0.05, self.flush_seconds - (time.monotonic() - last_flush))
            try:
                batch = self._queue.get(timeout=timeout)
            except queue.Empty:
                batch = []
            if batch is None:
                break
            if self._error is not None:
                self.count_dropped(self._stop_cause, len(batch))
                continue
            try:
                buffered += self._buffer(batch)
                if (buffered >= self.flush_bytes
                        or time.monotonic() - last_flush >= self.flush_seconds):
                    self._append_all()
                    self._write_status(closed=False)
                    self._file.flush()
                    self._flushed = self._written
                    buffered = 0
                    last_flush = time.monotonic()
            except Exception as exc:
                self._fail(exc)
        try:
            if self._error is None:
                self._append_all()
            self._write_status(closed=self._error is None)
            self._file.flush()
        except Exception as exc:
            self._fail(exc)
        try:
            self._file.close()
        except Exception:
            pass

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, _DiskFull):
            cause, message = "disk_full", str(exc)
        else:
            cause, message = "write_error", f"{type(exc).__name__}: {exc}"
        pending = sum(len(b.rows) for b in self._buffers.values())
        for b in self._buffers.values():
            b.rows.clear()
            b.chunks.clear()
        with self._lock:
            self._error = message
            self._stop_cause = cause
            self._dropped[cause] = self._dropped.get(cause, 0) + pending
        try:
            self._write_status(closed=False)
            self._file.flush()
        except Exception:
            pass

    def _declare_pending(self) -> None:
        # Buffers now, site groups at the next append once the room check passed: a group
        # made before the check would be written at the next flush, full disk or not.
        with self._lock:
            pending, self._pending_sites = self._pending_sites, []
        for info in pending:
            self._buffers[info.name] = _SiteBuffer(None, len(info.axes))
            self._unmade.append(info)

    def _make_groups(self) -> None:
        made, self._unmade = self._unmade, []
        for info in made:
            group = self._sites_group.create_group(f"{self._groups_made:06d}")
            self._groups_made += 1
            for key, value in info.to_attrs().items():
                group.attrs[key] = value
            rank = len(info.axes)
            for name, dtype in (("step", "i8"), ("call", "i4"), ("training", "u1"),
                                ("applied", "u1"), ("offset", "i8"), ("replica", "i4"),
                                ("rate", "f4")):
                d = group.create_dataset(name, (0,), maxshape=(None,), dtype=dtype,
                                         chunks=(_INDEX_CHUNK_ROWS,))
                d.dims[0].label = "record"
            for name in ("shape", "noise_shape"):
                d = group.create_dataset(name, (0, rank), maxshape=(None, rank), dtype="i8",
                                         chunks=(_INDEX_CHUNK_ROWS, max(rank, 1)))
                d.dims[0].label = "record"
                d.dims[1].label = "axis"
            # Not compressed: under SWMR a rewritten compressed chunk (each flush rewrites the
            # last, partly filled one) moves to new file space and the old space is never
            # reused, which cost 14% on full-entropy masks and several times the data for sites
            # with small masks; uncompressed chunks are rewritten in place. Packed keep-noise is
            # close to incompressible anyway (gzip saves ~20% only at rate 0.2, and costs ~2.5 ns
            # of writer CPU per element, taken from training on a small machine).
            d = group.create_dataset("bits", (0,), maxshape=(None,), dtype="u1",
                                     chunks=(_BITS_CHUNK,))
            d.dims[0].label = "byte"
            self._buffers[info.name].attach(group)

    def _buffer(self, batch: list[Record]) -> int:
        if self._pending_sites:
            self._declare_pending()
        added = 0
        for k, rec in enumerate(batch):
            buf = self._buffers.get(rec.site)
            try:
                if buf is None:
                    raise ValueError(
                        f"Record for undeclared site {rec.site!r}: declare_site() it first"
                    )
                shape, nshape, packed = _check_record(rec, buf.rank)
            except ValueError:
                self.count_dropped("write_error", len(batch) - k)
                self._bytes += added
                raise
            if self.max_bytes is not None and self._bytes + added + packed.size > self.max_bytes:
                self.count_dropped("max_bytes")
                continue
            applied = rec.noise is not None or rec.packed is not None
            buf.rows.append((int(rec.step), int(rec.call), int(bool(rec.training)),
                             int(applied), shape, nshape, int(rec.replica),
                             float("nan") if rec.rate is None else float(rec.rate)))
            if packed.size:
                buf.chunks.append(packed)
                buf.nbytes += packed.size
            added += packed.size
        self._bytes += added
        return added

    def _room(self) -> int:
        """Bytes this file may still grow by: free disk space or the RLIMIT_FSIZE headroom."""
        room = shutil.disk_usage(self.path.parent).free
        if resource is not None:
            soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if soft != resource.RLIM_INFINITY:
                room = min(room, soft - self.path.stat().st_size)
        return room

    def _append_all(self) -> None:
        if self._pending_sites:
            self._declare_pending()
        need = (sum(b.growth() for b in self._buffers.values())
                + _SITE_META * len(self._unmade))
        if need:
            room = self._room()
            if room - need < self.reserve_bytes:
                if self._unmade and room - _SITE_META * len(self._unmade) >= self.reserve_bytes:
                    self._make_groups()  # the sites are listed, if not their records
                raise _DiskFull(
                    f"disk nearly full: {room} bytes left for {self.path}, {need} needed plus a "
                    f"{self.reserve_bytes}-byte reserve; recording stopped so that the run file "
                    f"stays readable"
                )
        if self._unmade:
            self._make_groups()
        for buf in self._buffers.values():
            if not buf.rows:
                continue
            ds = buf.dsets
            n0, b0, n = buf.n_records, buf.n_bytes, len(buf.rows)
            sizes = np.fromiter(((math.prod(r[5]) + 7) // 8 if r[3] else 0 for r in buf.rows),
                                dtype=np.int64, count=n)
            offsets = b0 + np.concatenate(([0], np.cumsum(sizes)[:-1]))
            if buf.nbytes:
                _append(ds["bits"], b0, np.concatenate(buf.chunks))
            cols = list(zip(*buf.rows))
            # Index rows are appended after the bits they point to, and `offset` last, so a
            # crash between appends leaves at worst rows the reader can tell are incomplete.
            for name, values in (("step", cols[0]), ("call", cols[1]), ("training", cols[2]),
                                 ("applied", cols[3]), ("replica", cols[6]),
                                 ("rate", cols[7])):
                _append(ds[name], n0, np.asarray(values, dtype=_DTYPES[name]))
            for name, values in (("shape", cols[4]), ("noise_shape", cols[5])):
                _append(ds[name], n0, np.asarray(values, dtype=np.int64).reshape(n, buf.rank))
            _append(ds["offset"], n0, offsets.astype(np.int64, copy=False))
            buf.n_records = n0 + n
            buf.n_bytes = b0 + buf.nbytes
            buf.rows.clear()
            buf.chunks.clear()
            buf.nbytes = 0
            with self._lock:
                self._written += n

    def _write_status(self, *, closed: bool) -> None:
        # Mutable status lives in one fixed-size dataset, overwritten in place: rewriting
        # attributes under SWMR corrupted files killed mid-flush (bad heap index), raw data
        # writes to an existing dataset do not.
        with self._lock:
            status: dict[str, Any] = {
                "closed_cleanly": int(closed),
                "records_written": self._written,
                "records_dropped": dict(self._dropped),
                "stop_reason": self._error or "",
                "notes": list(self._notes),
            }
        text = json.dumps(status, sort_keys=True).encode("utf-8")
        while len(text) > _STATUS_BYTES and status["notes"]:
            kept = status["notes"][: len(status["notes"]) // 2]
            status["notes"] = kept + [f"... {len(self._notes) - len(kept)} more notes not stored"]
            text = json.dumps(status, sort_keys=True).encode("utf-8")
        self._file["status"][0] = np.bytes_(text)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.<pid>.tmp`` files left by writers killed while creating ``path``."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-4]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:
            pass  # alive, or not ours to ask about: left alone


def _check_replaceable(path: Path) -> None:
    """Refuse to write over anything but a dropspy run file (or an empty file).

    Replacing an existing run is the default (re-running a script re-records), so anything
    else at the path (notes.txt, a checkpoint, a damaged file dropspy cannot tell is its own)
    is refused, never destroyed.
    """
    from dropspy import _h5read

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RunFileError(f"{path}: cannot create run file: {exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise RunFileError(f"{path}: is a directory; give a file path for the run file, e.g. "
                           f"{path / 'run.h5'}")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return
    what = "not a regular file"
    if stat.S_ISREG(st.st_mode):
        try:
            with _h5read.open_file(path) as f:
                if _h5read.attr(f, "format", path, "/", required=False) == FORMAT_NAME:
                    return
            what = "an HDF5 file that is not a dropspy run"
        except RunFileError:
            what = ("not a dropspy run file" if not h5py.is_hdf5(path)
                    else "an HDF5 file dropspy cannot read as its own run")
    raise RunFileError(f"{path}: exists and is {what}; dropspy replaces only its own run "
                       f"files. Delete it or record to another path")


_OPEN_WRITERS: weakref.WeakSet[RunWriter] = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    for writer in list(_OPEN_WRITERS):
        try:
            writer.close()
        except Exception:
            pass
