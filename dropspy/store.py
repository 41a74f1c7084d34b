"""The run file reader: :func:`load` gives a :class:`Run`, a read-only mapping of sites.

The file layout is documented in ``schemas/run.schema.json`` and in :mod:`dropspy.writer`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dropspy._version import __version__
from dropspy.errors import RunFileError, SiteNotFoundError
from dropspy.records import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FIELDS,
    IndexBlock,
    Record,
    SiteInfo,
)

__all__ = ["Run", "Site", "load", "opened", "validate_file", "SiteInfo", "Record"]

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

    Attributes mirror :class:`SiteInfo`. Opening a run reads no per-record data: the index
    (``steps``, ``calls``, ``training``, ``applied``, ``offsets``, shapes) is read on first
    use and held compactly (each distinct shape once, a small-int index per record, about 24
    bytes per record instead of 80); masks are read on demand. The analysis streams the
    index in blocks instead (:meth:`index_blocks`), so it holds no per-record array at all.
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
        self._n: int | None = None
        self._ix: _CompactIndex | None = None

    # -- the index, read lazily ---------------------------------------------------------

    def _dataset(self, key: str) -> h5py.Dataset:
        try:
            return self._g[key]
        except KeyError as exc:
            raise RunFileError(f"{self._path}: site {self.name!r} is damaged: no dataset "
                               f"{key!r}") from exc

    def _raw_rows(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Index columns of rows ``a:b`` as stored (``replica`` is 0 in version-1 files)."""
        try:
            cols = {k: self._g[k][a:b] for k in INDEX_FIELDS + ("shape", "noise_shape")}
            cols["replica"] = (self._g["replica"][a:b] if "replica" in self._g
                               else np.zeros(b - a, np.int32))
        except (KeyError, OSError) as exc:
            raise RunFileError(f"{self._path}: site {self.name!r} is damaged: {exc}") from exc
        return cols

    def _length(self) -> int:
        """Readable records: rows every index dataset has whose bits lie inside ``bits``.

        A writer killed between appends can leave index datasets of unequal length, or rows
        whose packed bits were never written; only the tail can be affected (rows are
        appended in order), so only the tail is read.
        """
        if self._n is not None:
            return self._n
        try:
            lengths = [self._g[k].shape[0] for k in INDEX_FIELDS + ("shape", "noise_shape")]
            if "replica" in self._g:
                lengths.append(self._g["replica"].shape[0])
            nbits = self._g["bits"].shape[0]
        except (KeyError, OSError, IndexError, TypeError) as exc:
            raise RunFileError(f"{self._path}: site {self.name!r} is damaged: {exc}") from exc
        n = min(lengths) if lengths else 0
        lo = max(0, n - _TAIL_ROWS)
        while n > 0:
            ok = _ends(self._raw_rows(lo, n)) <= nbits
            if ok.all():
                break
            if ok[0] or lo == 0:
                n = lo + int(np.argmin(ok))
                break
            # The damage reaches further back than the tail: look at the whole index.
            n, lo = lo + 1, 0
        self._n = n
        return n

    def _index(self) -> _CompactIndex:
        if self._ix is None:
            n = len(self)
            ix = _CompactIndex(len(self.axes))
            for a in range(0, n, _BLOCK_ROWS):
                ix.add(self._raw_rows(a, min(n, a + _BLOCK_ROWS)))
            ix.finish()
            self._ix = ix
        return self._ix

    @property
    def steps(self) -> np.ndarray:
        """Training step of each record (int64)."""
        return self._index().steps

    @property
    def calls(self) -> np.ndarray:
        """Index of each record among the site's calls within its step."""
        return self._index().calls

    @property
    def replicas(self) -> np.ndarray:
        """Replica of each record within its process (0 in files that do not say)."""
        return self._index().replicas

    @property
    def training(self) -> np.ndarray:
        """Whether the model was in training mode, per record (bool)."""
        return self._index().training

    @property
    def applied(self) -> np.ndarray:
        """Whether a mask was applied, per record (bool)."""
        return self._index().applied

    @property
    def offsets(self) -> np.ndarray:
        """Byte offset of each record's packed noise in the site's ``bits`` (int64)."""
        return self._index().offsets

    @property
    def shapes(self) -> np.ndarray:
        """Applied shape of each record, ``(records, rank)`` int64 (built on each access)."""
        ix = self._index()
        return ix.shape_table[ix.shape_idx]

    @property
    def noise_shapes(self) -> np.ndarray:
        """Drawn noise shape of each record, ``(records, rank)`` int64 (built on each access)."""
        ix = self._index()
        return ix.noise_table[ix.noise_idx]

    @property
    def nbytes(self) -> np.ndarray:
        """Packed bytes of each record's noise (0 where none was applied)."""
        ix = self._index()
        return np.where(ix.applied, ix.noise_bytes[ix.noise_idx], 0)

    def index_blocks(self, rows: int = 1 << 16) -> Iterator[IndexBlock]:
        """The index streamed from the file in blocks of ``rows`` records (nothing cached).

        The analysis reads the index this way, so its memory does not grow with the number
        of records.
        """
        n = len(self)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            c = self._raw_rows(a, b)
            yield IndexBlock(
                start=a, steps=c["step"].astype(np.int64), calls=c["call"].astype(np.int64),
                replicas=c["replica"].astype(np.int64), training=c["training"] != 0,
                applied=c["applied"] != 0, offsets=c["offset"].astype(np.int64),
                shapes=c["shape"].astype(np.int64).reshape(b - a, len(self.axes)),
                noise_shapes=c["noise_shape"].astype(np.int64).reshape(b - a, len(self.axes)))

    def read_bits(self, begin: int, end: int) -> np.ndarray:
        """Packed bytes ``begin:end`` of the site's ``bits`` (uint8)."""
        if end <= begin:
            return np.empty(0, np.uint8)
        return self._dataset("bits")[begin:end]

    def __len__(self) -> int:
        return self._length()

    def __repr__(self) -> str:
        return f"<Site {self.name!r} {self.layer_class} axes={self.axes} records={len(self)}>"

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Site {self.name!r}: record {i} out of range (it has {n} records)")
        return i % n

    def noise(self, i: int) -> np.ndarray | None:
        """The drawn keep-noise of record ``i`` (bool, noise shape), or None if none applied."""
        i = self._check_index(i)
        ix = self._index()
        if not ix.applied[i]:
            return None
        k = int(ix.noise_idx[i])
        o, nb = int(ix.offsets[i]), int(ix.noise_bytes[k])
        raw = self._dataset("bits")[o:o + nb]
        return _unpack(raw, tuple(int(x) for x in ix.noise_table[k]))

    def mask(self, i: int) -> np.ndarray | None:
        """The applied keep-mask of record ``i`` (bool, applied shape), or None if none."""
        noise = self.noise(i)
        if noise is None:
            return None
        ix = self._index()
        shape = tuple(int(x) for x in ix.shape_table[ix.shape_idx[self._check_index(i)]])
        return np.broadcast_to(noise, shape).copy()

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
        ix = self._index()
        offsets, nbytes, applied = ix.offsets, self.nbytes, ix.applied
        bits = self._dataset("bits")
        i = start
        while i < stop:
            j = i
            begin = int(offsets[i])
            while j < stop and (j == i or int(offsets[j] + nbytes[j]) - begin <= max_bytes):
                j += 1
            end = int(offsets[j - 1] + nbytes[j - 1])
            block = bits[begin:end] if end > begin else np.empty(0, np.uint8)
            for k in range(i, j):
                if not applied[k]:
                    yield k, None
                    continue
                o = int(offsets[k]) - begin
                shape = tuple(int(x) for x in ix.noise_table[ix.noise_idx[k]])
                yield k, _unpack(block[o:o + int(nbytes[k])], shape)
            i = j

    def iter_batches(
        self, start: int = 0, stop: int | None = None, *, max_bytes: int = 16 << 20,
        max_records: int = 4096,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, noise)`` with noise stacked as ``(k, *noise_shape)`` (bool).

        Consecutive applied records of one noise shape are read with one HDF5 read and
        unpacked with one ``np.unpackbits`` call, up to ``max_bytes`` of unpacked noise:
        per-record work dominates small masks (GRU gate masks are a few hundred bytes).
        Records with no mask are skipped.
        """
        stop = len(self) if stop is None else min(stop, len(self))
        ix = self._index()
        idx = np.flatnonzero(ix.applied[start:stop]) + start
        if not len(idx):
            return
        kind, off = ix.noise_idx[idx], ix.offsets[idx]
        nb = ix.noise_bytes[kind]
        brk = np.ones(len(idx), dtype=bool)
        brk[1:] = (kind[1:] != kind[:-1]) | (off[1:] != off[:-1] + nb[:-1])
        firsts = np.flatnonzero(brk).tolist()
        bits = self._dataset("bits")
        for a, b in zip(firsts, firsts[1:] + [len(idx)]):
            width = int(nb[a])
            shape = tuple(int(x) for x in ix.noise_table[kind[a]])
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


# Index rows read per block when streaming (65536 rows of ~70 bytes: a few MiB at a time), and
# rows looked at from the end when checking a possibly truncated tail.
_BLOCK_ROWS = 1 << 16
_TAIL_ROWS = 4096


def _ends(cols: Mapping[str, np.ndarray]) -> np.ndarray:
    """End byte of each row's packed noise in ``bits`` (its offset where none applied)."""
    ns = np.asarray(cols["noise_shape"], dtype=np.int64)
    sizes = np.where(np.asarray(cols["applied"]) != 0,
                     (np.prod(ns.reshape(len(ns), -1), axis=1) + 7) // 8, 0)
    return np.asarray(cols["offset"], dtype=np.int64) + sizes


def _smallest_int(values: np.ndarray) -> np.ndarray:
    """``values`` in the smallest signed integer type that holds them."""
    if not len(values):
        return values.astype(np.int8)
    lo, hi = int(values.min()), int(values.max())
    for t in (np.int8, np.int16, np.int32):
        info = np.iinfo(t)
        if info.min <= lo and hi <= info.max:
            return values.astype(t)
    return values.astype(np.int64)


class _CompactIndex:
    """A site's index held compactly: each distinct shape once, a small index per record."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._tables: dict[str, dict[tuple[int, ...], int]] = {"shape": {}, "noise_shape": {}}
        self._parts: dict[str, list[np.ndarray]] = {}

    def _codes(self, which: str, rows: np.ndarray) -> np.ndarray:
        table = self._tables[which]
        rows = rows.reshape(len(rows), self.rank)
        if len(rows) and (rows == rows[0]).all():
            uniq, inverse = rows[:1], np.zeros(len(rows), np.int64)
        else:
            uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        codes = np.array([table.setdefault(tuple(int(x) for x in u), len(table)) for u in uniq],
                         dtype=np.int64)
        return codes[inverse.reshape(-1)]

    def add(self, cols: Mapping[str, np.ndarray]) -> None:
        for key, value in (
            ("steps", np.asarray(cols["step"], np.int64)),
            ("calls", _smallest_int(np.asarray(cols["call"]))),
            ("replicas", _smallest_int(np.asarray(cols["replica"]))),
            ("training", np.asarray(cols["training"]) != 0),
            ("applied", np.asarray(cols["applied"]) != 0),
            ("offsets", np.asarray(cols["offset"], np.int64)),
            ("shape_idx", self._codes("shape", np.asarray(cols["shape"], np.int64))),
            ("noise_idx", self._codes("noise_shape", np.asarray(cols["noise_shape"], np.int64))),
        ):
            self._parts.setdefault(key, []).append(value)

    def finish(self) -> None:
        def table(which: str) -> np.ndarray:
            rows = sorted(self._tables[which].items(), key=lambda kv: kv[1])
            return np.array([r for r, _ in rows], dtype=np.int64).reshape(len(rows), self.rank)

        self.shape_table = table("shape")
        self.noise_table = table("noise_shape")
        self.noise_bytes = (np.prod(self.noise_table, axis=1) + 7) // 8
        empty = {"steps": np.int64, "offsets": np.int64, "training": bool, "applied": bool}
        out: dict[str, np.ndarray] = {}
        for key in ("steps", "calls", "replicas", "training", "applied", "offsets", "shape_idx",
                    "noise_idx"):
            parts = self._parts.pop(key, [])
            out[key] = (np.concatenate(parts) if parts
                        else np.empty(0, empty.get(key, np.int8)))
        self.steps, self.calls, self.replicas = out["steps"], out["calls"], out["replicas"]
        self.training, self.applied, self.offsets = out["training"], out["applied"], out["offsets"]
        # Distinct shapes are few: the smallest integer type holds their codes.
        self.shape_idx = _smallest_int(out["shape_idx"])
        self.noise_idx = _smallest_int(out["noise_idx"])


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
            raise SiteNotFoundError(
                f"No site {name!r} in {self.path}. Sites: {', '.join(self._sites) or '(none)'}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def __repr__(self) -> str:
        return (f"<Run {str(self.path)!r} {self.framework} sites={len(self)} "
                f"complete={self.complete}>")

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


@contextlib.contextmanager
def opened(run: Any) -> Iterator[Any]:
    """``run`` itself, or, for a path, the run file loaded for the ``with`` block and closed.

    The one place where "a path or a run" is turned into a run (testing helpers, the CLI).
    """
    if isinstance(run, (str, os.PathLike)):
        with load(run) as r:
            yield r
    else:
        yield run


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
