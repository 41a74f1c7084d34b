"""The run file: the HDF5 writer (background thread) and the reader.

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
        bits      (m,)        uint8   keep-noise, 1 bit per element, np.packbits order
                                      (big bit order, C order), each record byte-aligned

Site groups are numbered, not named after sites, because site names contain ``/``. The file is
written in HDF5 SWMR mode, so a writer killed at any moment leaves a file that opens and holds
every record appended before the last flush.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import shutil
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SiteInfo",
    "Record",
    "RunWriter",
    "Run",
    "Site",
    "load",
    "validate_file",
]

FORMAT_NAME = "dropspy.run"
FORMAT_VERSION = 1

_ROLES = ("output", "input", "recurrent", "between_layers", "attention", "custom")
_INDEX = ("step", "call", "training", "applied", "offset")
_RESERVED = ("format", "format_version", "dropspy_version", "closed_cleanly", "records_written",
             "records_dropped", "stop_reason", "notes", "host", "started")
_STATUS_BYTES = 1 << 16
# Chunk sizes. Every chunk of an uncompressed dataset is allocated whole on its first write, so
# these are also each site's minimum footprint: (8+4+1+1+8 + 2*8*rank) * 512 bytes of index
# (35 KiB at rank 3) and 64 KiB of bits.
_INDEX_CHUNK_ROWS = 512
_BITS_CHUNK = 1 << 16
_DROP_CAUSES = ("queue_full", "max_bytes", "disk_full", "write_error", "site_filter")


@dataclass(frozen=True)
class SiteInfo:
    """One place in the model where one mask is applied.

    Args:
        name: Site name, e.g. ``"lstm/input/i"`` or ``"encoder.layers.0.dropout"``.
        layer: Layer path (Keras) or qualified module name (torch).
        layer_class: Class name of the layer, e.g. ``"SpatialDropout1D"``.
        role: ``output``, ``input``, ``recurrent``, ``between_layers``, ``attention``
            or ``custom``.
        axes: Names of the applied mask's axes, e.g. ``("batch", "time", "feature")``.
        rate: Configured drop rate, or None when unknown.
        gate: Gate of an RNN cell (``"i"``, ``"f"``...) or None.
        noise_shape: Configured noise shape (None entries follow the input), or None.
        scale: Multiplier applied to kept elements, or None when unknown.
        opaque: Why the masks of this site cannot be observed; None for a recorded site.
        extra: JSON-able facts the adapter knows about the site.
    """

    name: str
    layer: str
    layer_class: str
    role: str
    axes: tuple[str, ...]
    rate: float | None
    gate: str | None = None
    noise_shape: tuple[int | None, ...] | None = None
    scale: float | None = None
    opaque: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Invalid site name. Expected a non-empty string. Received: ''")
        if self.role not in _ROLES:
            raise ValueError(
                f"Invalid role for site {self.name!r}. Expected one of {_ROLES}. "
                f"Received: role={self.role!r}"
            )
        object.__setattr__(self, "axes", tuple(self.axes))
        if self.noise_shape is not None:
            object.__setattr__(self, "noise_shape", tuple(self.noise_shape))
            if len(self.noise_shape) != len(self.axes):
                raise ValueError(
                    f"Site {self.name!r}: noise_shape {self.noise_shape} has rank "
                    f"{len(self.noise_shape)} but axes {self.axes} have rank {len(self.axes)}"
                )

    def to_attrs(self) -> dict[str, Any]:
        """The site as plain HDF5 attributes (strings, numbers, JSON strings)."""
        return {k: _attr_value(v) for k, v in {
            "name": self.name,
            "layer": self.layer,
            "layer_class": self.layer_class,
            "role": self.role,
            "gate": self.gate or "",
            "axes": json.dumps(list(self.axes)),
            "rate": float("nan") if self.rate is None else float(self.rate),
            "noise_shape": json.dumps(None if self.noise_shape is None else list(self.noise_shape)),
            "scale": float("nan") if self.scale is None else float(self.scale),
            "opaque": self.opaque or "",
            "extra": json.dumps(dict(self.extra), sort_keys=True),
        }.items()}


@dataclass(slots=True)
class Record:
    """One mask drawn at one site, during one call, at one training step.

    Give either ``noise`` (bool or 0/1 array, same rank as ``shape``, size-1 dimensions
    broadcast) or ``packed`` (``np.packbits(noise.ravel(), bitorder="big")``) with
    ``noise_shape``; give neither for a call that applied no mask.
    """

    site: str
    step: int
    call: int
    training: bool
    shape: tuple[int, ...]
    noise: np.ndarray | None = None
    packed: np.ndarray | None = None
    noise_shape: tuple[int, ...] | None = None


def _check_record(rec: Record, rank: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Validate one record and return (noise_shape, packed bytes)."""
    shape = tuple(int(s) for s in rec.shape)
    if len(shape) != rank:
        raise ValueError(
            f"Record for site {rec.site!r}: applied shape {shape} has rank {len(shape)}, "
            f"expected rank {rank} (the site's axes)"
        )
    if rec.noise is None and rec.packed is None:
        return (0,) * rank, np.empty(0, np.uint8)
    if rec.packed is not None:
        if rec.noise_shape is None:
            raise ValueError(f"Record for site {rec.site!r}: packed noise given without noise_shape")
        nshape = tuple(int(s) for s in rec.noise_shape)
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
        if noise.dtype != np.bool_:
            noise = noise != 0
        packed = np.packbits(noise.ravel())
    if len(nshape) != rank or any(n != 1 and n != s for n, s in zip(nshape, shape)):
        raise ValueError(
            f"Record for site {rec.site!r}: noise shape {nshape} does not broadcast to the "
            f"applied shape {shape} at the same rank"
        )
    return nshape, packed


class _DiskFull(OSError):
    """Appending would leave less than the reserve: stop before HDF5 hits a failed write."""


class _SiteBuffer:
    """Rows of one site waiting to be appended (the writer thread owns it)."""

    __slots__ = ("group", "rank", "rows", "chunks", "nbytes", "dsets", "n_records", "n_bytes")

    def __init__(self, group: h5py.Group, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.rows: list[tuple[int, int, int, int, tuple[int, ...], tuple[int, ...]]] = []
        self.chunks: list[np.ndarray] = []
        self.nbytes = 0
        # Datasets and lengths kept here: looking datasets up and asking HDF5 for their shapes
        # at every append cost more than the appends (bench_writer, 12 sites: ~27 ms a flush).
        self.dsets = {name: group[name] for name in _DTYPES}
        self.n_records = int(self.dsets["step"].shape[0])
        self.n_bytes = int(self.dsets["bits"].shape[0])


_DTYPES = {"step": np.int64, "call": np.int32, "training": np.uint8, "applied": np.uint8,
           "offset": np.int64, "shape": np.int64, "noise_shape": np.int64, "bits": np.uint8}


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
        path: Where to create the run file (overwritten).
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
        self._dropped = dict.fromkeys(_DROP_CAUSES, 0)
        self._written = 0
        self._flushed = 0
        self._bytes = 0
        self._error: str | None = None
        self._warned = False
        self._closed = False
        self._sites: dict[str, SiteInfo] = {}
        self._pending_sites: list[SiteInfo] = []
        self._queue: queue.Queue[list[Record] | None] = queue.Queue(maxsize=queue_steps)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.path, "w", libver="latest")
        except OSError as exc:
            raise RunFileError(f"{self.path}: cannot create run file: {exc}") from exc
        root = self._file.attrs
        root["format"] = _attr_value(FORMAT_NAME)
        root["format_version"] = FORMAT_VERSION
        root["dropspy_version"] = _attr_value(__version__)
        for key, value in (meta or {}).items():
            if key in _RESERVED:
                raise ValueError(f"Root attribute {key!r} is set by the writer, not by an adapter")
            root[key] = _attr_value(value)
        for key, default in (("framework", "unknown"), ("framework_version", ""),
                             ("backend", ""), ("devices", "[]"), ("rank", 0)):
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
        self._write_status(closed=False)
        self._file.flush()
        self._file.swmr_mode = True
        self._thread = threading.Thread(target=self._run, name="dropspy-writer", daemon=True)
        self._thread.start()
        _OPEN_WRITERS.add(self)

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
                if buffered >= self.flush_bytes or time.monotonic() - last_flush >= self.flush_seconds:
                    self._append_all()
                    self._write_status(closed=False)
                    self._file.flush()
                    self._flushed = self._written
                    buffered = 0
                    last_flush = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a write error must never reach training
                self._fail(exc)
        try:
            if self._error is None:
                self._append_all()
            self._write_status(closed=self._error is None)
            self._file.flush()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - the file may be gone; the error is already recorded
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
        except Exception:  # noqa: BLE001 - best effort: the file may be unwritable
            pass

    def _declare_pending(self) -> None:
        with self._lock:
            pending, self._pending_sites = self._pending_sites, []
        for info in pending:
            group = self._sites_group.create_group(f"{len(self._buffers):06d}")
            for key, value in info.to_attrs().items():
                group.attrs[key] = value
            rank = len(info.axes)
            for name, dtype in (("step", "i8"), ("call", "i4"), ("training", "u1"),
                                ("applied", "u1"), ("offset", "i8")):
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
            self._buffers[info.name] = _SiteBuffer(group, rank)

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
                nshape, packed = _check_record(rec, buf.rank)
            except ValueError:
                self.count_dropped("write_error", len(batch) - k)
                self._bytes += added
                raise
            if self.max_bytes is not None and self._bytes + added + packed.size > self.max_bytes:
                self.count_dropped("max_bytes")
                continue
            applied = rec.noise is not None or rec.packed is not None
            buf.rows.append((int(rec.step), int(rec.call), int(bool(rec.training)),
                             int(applied), tuple(int(s) for s in rec.shape), nshape))
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
        need = sum(b.nbytes + 64 * len(b.rows) for b in self._buffers.values())
        if need:
            room = self._room()
            if room - need < self.reserve_bytes:
                raise _DiskFull(
                    f"disk nearly full: {room} bytes left for {self.path}, {need} needed plus a "
                    f"{self.reserve_bytes}-byte reserve; recording stopped so that the run file "
                    f"stays readable"
                )
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
                                 ("applied", cols[3])):
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
            status = {
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


_OPEN_WRITERS: weakref.WeakSet[RunWriter] = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    for writer in list(_OPEN_WRITERS):
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - at exit, keep closing the others
            pass


def _attr_value(value: Any) -> Any:
    """A plain HDF5 attribute value: numbers as numbers, text as fixed-length UTF-8.

    Fixed-length strings live in the attribute message itself; h5py's default variable-length
    strings live in the global heap, which a writer killed mid-flush can leave damaged.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    if isinstance(value, str):
        value = str(value)  # a str subclass (torch.__version__) is not a str to h5py
    else:
        value = json.dumps(value, sort_keys=True, default=str)
    return np.bytes_(value.encode("utf-8")) if value else np.bytes_(b"")


# -- reader -------------------------------------------------------------------------------


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_attr(attrs: Mapping[str, Any], key: str, path: Path, default: Any = None) -> Any:
    if key not in attrs:
        return default
    raw = _decode(attrs[key])
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise RunFileError(f"{path}: attribute {key!r} is not valid JSON: {raw!r}") from exc


class Site:
    """The records of one site, read lazily from the run file.

    Attributes mirror :class:`SiteInfo`; index arrays (``steps``, ``calls``, ``training``,
    ``applied``, ``shapes``, ``noise_shapes``) are loaded once, masks on demand.
    """

    def __init__(self, group: h5py.Group, path: Path) -> None:
        self._g = group
        self._path = path
        a = group.attrs
        try:
            self.name: str = _decode(a["name"])
            self.layer: str = _decode(a["layer"])
            self.layer_class: str = _decode(a["layer_class"])
            self.role: str = _decode(a["role"])
            self.gate: str | None = _decode(a["gate"]) or None
            rate = float(_decode(a["rate"]))
            scale = float(_decode(a["scale"]))
            self.opaque: str | None = _decode(a["opaque"]) or None
        except KeyError as exc:
            raise RunFileError(f"{path}: site group {group.name} lacks attribute {exc}") from exc
        self.axes: tuple[str, ...] = tuple(_json_attr(a, "axes", path, []))
        ns = _json_attr(a, "noise_shape", path)
        self.noise_shape: tuple[int | None, ...] | None = None if ns is None else tuple(ns)
        self.extra: dict[str, Any] = _json_attr(a, "extra", path, {})
        self.rate: float | None = None if math.isnan(rate) else rate
        self.scale: float | None = None if math.isnan(scale) else scale
        self._load_index()

    def _load_index(self) -> None:
        g = self._g
        try:
            cols = {k: g[k][()] for k in _INDEX}
            shape = g["shape"][()]
            nshape = g["noise_shape"][()]
            nbits = g["bits"].shape[0]
        except (KeyError, OSError) as exc:
            raise RunFileError(f"{self._path}: site {self.name!r} is damaged: {exc}") from exc
        # A writer killed between appends can leave index datasets of unequal length: keep the
        # rows every dataset has, whose packed bits lie wholly inside `bits`.
        n = min(min(len(v) for v in cols.values()), len(shape), len(nshape))
        sizes = np.where(cols["applied"][:n] != 0, (np.prod(nshape[:n], axis=1) + 7) // 8, 0)
        ends = cols["offset"][:n] + sizes
        ok = ends <= nbits
        if not ok.all():
            n = int(np.argmin(ok))
        self.steps = cols["step"][:n].astype(np.int64)
        self.calls = cols["call"][:n].astype(np.int64)
        self.training = cols["training"][:n] != 0
        self.applied = cols["applied"][:n] != 0
        self.shapes = shape[:n].astype(np.int64)
        self.noise_shapes = nshape[:n].astype(np.int64)
        self.offsets = cols["offset"][:n].astype(np.int64)
        self.nbytes = sizes[:n].astype(np.int64)

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return f"<Site {self.name!r} {self.layer_class} axes={self.axes} records={len(self)}>"

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Site {self.name!r}: record {i} out of range (it has {n} records)")
        return i % n

    def noise(self, i: int) -> np.ndarray | None:
        """The drawn keep-noise of record ``i`` (bool, noise shape), or None if none applied."""
        i = self._index(i)
        if not self.applied[i]:
            return None
        o, nb = int(self.offsets[i]), int(self.nbytes[i])
        raw = self._g["bits"][o:o + nb]
        return _unpack(raw, tuple(self.noise_shapes[i]))

    def mask(self, i: int) -> np.ndarray | None:
        """The applied keep-mask of record ``i`` (bool, applied shape), or None if none."""
        noise = self.noise(i)
        if noise is None:
            return None
        return np.broadcast_to(noise, tuple(self.shapes[self._index(i)])).copy()

    def masks(self, step: int, call: int | None = None) -> list[np.ndarray | None]:
        """Applied masks of the records of one step (optionally one call), in record order."""
        sel = self.steps == step
        if call is not None:
            sel &= self.calls == call
        return [self.mask(int(i)) for i in np.flatnonzero(sel)]

    def iter_noise(
        self, start: int = 0, stop: int | None = None, *, max_bytes: int = 16 << 20
    ) -> Iterator[tuple[int, np.ndarray | None]]:
        """Yield ``(i, noise)`` for records ``start:stop``, reading bits in large blocks.

        Memory stays bounded by ``max_bytes`` of packed data (plus one record, however big).
        """
        stop = len(self) if stop is None else min(stop, len(self))
        bits = self._g["bits"]
        i = start
        while i < stop:
            j = i
            begin = int(self.offsets[i])
            while j < stop and (j == i or int(self.offsets[j] + self.nbytes[j]) - begin <= max_bytes):
                j += 1
            end = int(self.offsets[j - 1] + self.nbytes[j - 1])
            block = bits[begin:end] if end > begin else np.empty(0, np.uint8)
            for k in range(i, j):
                if not self.applied[k]:
                    yield k, None
                    continue
                o = int(self.offsets[k]) - begin
                yield k, _unpack(block[o:o + int(self.nbytes[k])], tuple(self.noise_shapes[k]))
            i = j


    def iter_batches(
        self, start: int = 0, stop: int | None = None, *, max_bytes: int = 16 << 20,
        max_records: int = 4096,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, noise)`` with noise stacked as ``(k, *noise_shape)`` (bool).

        Consecutive applied records of one noise shape are read with one HDF5 read and
        unpacked with one ``np.unpackbits`` call, up to ``max_bytes`` of unpacked noise: per-record work dominates small masks (GRU
        gate masks are a few hundred bytes). Records with no mask are skipped.
        """
        stop = len(self) if stop is None else min(stop, len(self))
        idx = np.flatnonzero(self.applied[start:stop]) + start
        if not len(idx):
            return
        ns, off, nb = self.noise_shapes[idx], self.offsets[idx], self.nbytes[idx]
        brk = np.ones(len(idx), dtype=bool)
        brk[1:] = (ns[1:] != ns[:-1]).any(axis=1) | (off[1:] != off[:-1] + nb[:-1])
        firsts = np.flatnonzero(brk).tolist()
        bits = self._g["bits"]
        for a, b in zip(firsts, firsts[1:] + [len(idx)]):
            width, shape = int(nb[a]), tuple(int(x) for x in ns[a])
            size = math.prod(shape)
            # max_bytes bounds the unpacked bools (8x the packed bits), not the read.
            per = max(1, min(max_records, max_bytes // max(size, 1)))
            for c in range(a, b, per):
                d = min(b, c + per)
                k = d - c
                raw = bits[int(off[c]):int(off[c]) + width * k]
                if size % 8 == 0:
                    flat = np.unpackbits(raw)
                else:
                    flat = np.unpackbits(raw.reshape(k, width), axis=1, count=size)
                yield idx[c:d], flat.view(np.bool_).reshape((k, *shape))


def _unpack(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    return np.unpackbits(raw, count=count).view(np.bool_).reshape(shape)


class Run(Mapping[str, Site]):
    """A run file opened for reading: a read-only mapping of site name to :class:`Site`.

    Example:
        >>> run = dropspy.load("run.h5")            # doctest: +SKIP
        >>> run["lstm/input/i"].mask(0).shape        # doctest: +SKIP
        (32, 20, 8)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = _open_run_file(self.path)
        try:
            self.attrs: dict[str, Any] = {k: _decode(v) for k, v in self._file.attrs.items()}
            self._check_root()
            self.status: dict[str, Any] = _read_status(self._file, self.path)
            self.attrs.update(self.status)
            self._sites: dict[str, Site] = {}
            for key in sorted(self._file["sites"].keys()):
                site = Site(self._file["sites"][key], self.path)
                self._sites[site.name] = site
        except RunFileError:
            self._file.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            self._file.close()
            raise RunFileError(f"{self.path}: damaged run file: {exc}") from exc

    def _check_root(self) -> None:
        _check_format(self._file, self.path)
        if "sites" not in self._file:
            raise RunFileError(f"{self.path}: run file has no 'sites' group")
        self.devices: list[str] = _json_attr(self.attrs, "devices", self.path, [])

    @property
    def records_dropped(self) -> dict[str, int]:
        """Records drawn but not written, by cause (queue_full, max_bytes, write_error...)."""
        return dict(self.status.get("records_dropped", {}))

    @property
    def notes(self) -> list[str]:
        """Messages the recorder left for the user (perturbation, untracked draws...)."""
        return list(self.status.get("notes", []))

    @property
    def framework(self) -> str:
        """The framework that produced the run (``keras``, ``torch``...)."""
        return str(self.attrs.get("framework", "unknown"))

    @property
    def complete(self) -> bool:
        """True when the writer closed the file cleanly (no crash, no write error)."""
        return bool(self.attrs.get("closed_cleanly", 0))

    @property
    def records_written(self) -> int:
        """Records the writer reported written at its last flush."""
        return int(self.attrs.get("records_written", 0))

    @property
    def records_readable(self) -> int:
        """Records actually readable in the file."""
        return sum(len(s) for s in self._sites.values())

    @property
    def sites(self) -> tuple[str, ...]:
        """Names of every declared site, in declaration order."""
        return tuple(self._sites)

    def __getitem__(self, name: str) -> Site:
        try:
            return self._sites[name]
        except KeyError:
            raise KeyError(
                f"No site {name!r} in {self.path}. Sites: {', '.join(self._sites) or '(none)'}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def __repr__(self) -> str:
        return f"<Run {str(self.path)!r} {self.framework} sites={len(self)} complete={self.complete}>"

    def report(self, **kwargs: Any) -> Any:
        """Analyse every site: the facts ``dropspy inspect`` prints.

        Keyword arguments go to :func:`dropspy.analysis.analyze_run` (``sites``,
        ``threshold``, ``confidence``...). Returns a :class:`dropspy.analysis.RunAnalysis`.
        """
        from dropspy.analysis import analyze_run

        return analyze_run(self, **kwargs)

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._file.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_run_file(path: Path) -> h5py.File:
    if not path.exists():
        raise RunFileError(f"{path}: no such file")
    if path.is_dir():
        raise RunFileError(f"{path}: is a directory, expected a run file (.h5)")
    if path.stat().st_size == 0:
        raise RunFileError(f"{path}: file is empty, expected an HDF5 run file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read: {exc}") from exc
    if not is_hdf5:
        raise RunFileError(f"{path}: not an HDF5 file, expected a dropspy run file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        first = exc
    if "open for write" in str(first):
        # A writer that died outside SWMR mode leaves its status flag set; an SWMR reader
        # ignores it. Only here: on a damaged file an SWMR reader retries reads for minutes.
        try:
            return h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            pass
    raise RunFileError(
        f"{path}: HDF5 file cannot be opened (truncated or damaged?): {first}"
    ) from first


def _read_status(f: h5py.File, path: Path) -> dict[str, Any]:
    if "status" not in f:
        raise RunFileError(f"{path}: run file has no 'status' dataset")
    raw = f["status"][0]
    try:
        status = json.loads(bytes(raw).rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RunFileError(f"{path}: 'status' is not valid JSON: {bytes(raw)[:80]!r}") from exc
    if not isinstance(status, dict):
        raise RunFileError(f"{path}: 'status' is not a JSON object: {status!r}")
    return status


def _check_format(f: h5py.File, path: Path) -> None:
    fmt = _decode(f.attrs.get("format"))
    if fmt != FORMAT_NAME:
        raise RunFileError(
            f"{path}: not a dropspy run file (HDF5 root attribute 'format' is {fmt!r}, "
            f"expected {FORMAT_NAME!r})"
        )
    version = _decode(f.attrs.get("format_version"))
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise RunFileError(
            f"{path}: run file format version {version!r} is not supported by dropspy "
            f"{__version__} (it reads versions 1 to {FORMAT_VERSION}); upgrade dropspy"
        )


def load(path: str | os.PathLike[str]) -> Run:
    """Open a run file for reading.

    Args:
        path: Path of a run file written by :func:`dropspy.record`.

    Returns:
        The :class:`Run`, a read-only mapping of site names to sites.

    Raises:
        RunFileError: The path is missing, not a file, not HDF5, not a run, of a newer
            format version, or damaged. The message names the path and the problem.
    """
    return Run(path)


def validate_file(path: str | os.PathLike[str]) -> list[str]:
    """Check a run file against ``schemas/run.schema.json`` and the layout rules.

    Returns:
        The problems found, each one line; empty when the file is valid.

    Raises:
        RunFileError: The file cannot be opened as a run at all.
    """
    from dropspy._schema import check_run_layout

    path = Path(path)
    f = _open_run_file(path)
    try:
        _check_format(f, path)
        try:
            return check_run_layout(f)
        except (OSError, KeyError) as exc:
            raise RunFileError(f"{path}: damaged run file: {exc}") from exc
    finally:
        f.close()
