"""The run file reader: a :class:`Run` is one run file, a read-only mapping of sites.

:func:`dropspy.load` (in :mod:`dropspy.runset`, which also opens run sets) gives one.

The file layout is documented in ``schemas/run.schema.json`` and in :mod:`dropspy.writer`.

Over 600 lines for one concept, the reader of one file: :class:`Site` (lazy index, streamed
blocks, masks) and :class:`Run` (root attributes, status, damage); every read goes through
:mod:`dropspy._h5read`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dropspy import _h5read as _h5
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

__all__ = ["Run", "Site", "validate_file", "SiteInfo", "Record"]

class Site:
    """The records of one site, read lazily from the run file.

    Attributes mirror :class:`SiteInfo`; opening a run reads only each site's name, the
    other facts are read (and checked) together on first use. Opening reads no per-record
    data: the index (``steps``, ``calls``, ``training``, ``applied``, ``offsets``, shapes) is
    read on first use and held compactly (each distinct shape once, a small-int index per
    record, about 24 bytes per record instead of 80); masks are read on demand. The analysis
    streams the index in blocks instead (:meth:`index_blocks`), so it holds no per-record
    array at all.
    """

    def __init__(self, group: h5py.Group, path: Path, complete: bool = True) -> None:
        self._g = group
        self._path = path
        self._complete = complete
        self._where = _h5.safe(group.name)
        # Only the name is read when the run opens (the mapping's key); the other facts on
        # first use, all at once and each checked: opening 10,000 sites read 110,000
        # attributes before anything was asked.
        name = _h5.text_attr(group, "name", path, self._where)
        if not name:
            raise _h5.fail(path, f"{self._where} attribute 'name'",
                           "expected a non-empty site name")
        self.name: str = name
        self._facts: dict[str, Any] | None = None
        #: What the reader left out of this site and why (None: nothing, or only the
        #: expected unflushed tail of a killed run). Known once ``len(site)`` was taken.
        self.damage: str | None = None
        self._n: int | None = None
        self._nbits = 0
        self._ds: dict[str, h5py.Dataset] | None = None
        self._ix: _CompactIndex | None = None
        self._head: tuple[int, dict[str, np.ndarray]] | None = None

    def _fact(self, key: str) -> Any:
        if self._facts is None:
            self._facts = _h5.read_site_attrs(self._g, self._path, self._where)
        return self._facts[key]

    @property
    def layer(self) -> str:
        """The layer (module path) the site belongs to."""
        return str(self._fact("layer"))

    @property
    def layer_class(self) -> str:
        """The layer's class name (``Dropout``, ``LSTM``...)."""
        return str(self._fact("layer_class"))

    @property
    def role(self) -> str:
        """What the mask drops within the layer (``output``, ``input``, ``recurrent``...)."""
        return str(self._fact("role"))

    @property
    def gate(self) -> str | None:
        """The gate of a recurrent cell whose mask this is, if any."""
        return self._fact("gate")  # type: ignore[no-any-return]

    @property
    def opaque(self) -> str | None:
        """Why the site's masks could not be observed, if they could not."""
        return self._fact("opaque")  # type: ignore[no-any-return]

    @property
    def axes(self) -> tuple[str, ...]:
        """Names of the mask's axes."""
        return self._fact("axes")  # type: ignore[no-any-return]

    @property
    def noise_shape(self) -> tuple[int | None, ...] | None:
        """The noise shape the adapter stated (None where unknown)."""
        return self._fact("noise_shape")  # type: ignore[no-any-return]

    @property
    def extra(self) -> dict[str, Any]:
        """Further facts the adapter stated (masks per call, shared gates...)."""
        return self._fact("extra")  # type: ignore[no-any-return]

    @property
    def rate(self) -> float | None:
        """The configured drop rate (None where unknown)."""
        return self._fact("rate")  # type: ignore[no-any-return]

    @property
    def scale(self) -> float | None:
        """The scale applied to kept elements (None where unknown)."""
        return self._fact("scale")  # type: ignore[no-any-return]

    # -- the index, read lazily ---------------------------------------------------------

    def _datasets(self) -> dict[str, h5py.Dataset]:
        """The site's datasets, each checked (hard link, in-file storage, dtype, rank)."""
        if self._ds is None:
            g, p, w = self._g, self._path, self._where
            ds = {k: _h5.dataset(g, k, p, f"{w}/{k}", kinds=kinds, ndim=1)
                  for k, kinds in _h5.INDEX_KINDS.items()}
            rep = _h5.dataset(g, "replica", p, f"{w}/replica", kinds="iu", ndim=1,
                              required=False)
            if rep is not None:
                ds["replica"] = rep
            rate = _h5.dataset(g, "rate", p, f"{w}/rate", kinds="f", ndim=1, required=False)
            if rate is not None:
                ds["rate"] = rate
            for k in ("shape", "noise_shape"):
                d = _h5.dataset(g, k, p, f"{w}/{k}", kinds="iu", ndim=2)
                if d.shape[1] != len(self.axes):
                    raise _h5.fail(p, f"{w}/{k}", f"expected {len(self.axes)} column(s) (one "
                                   f"per axis of the site), found shape {d.shape}")
                ds[k] = d
            ds["bits"] = _h5.dataset(g, "bits", p, f"{w}/bits", kinds="u", ndim=1, itemsize=1)
            self._ds = ds
        return self._ds

    def _dataset(self, key: str) -> h5py.Dataset:
        return self._datasets()[key]

    def _read_rows(self, a: int, b: int) -> dict[str, np.ndarray]:
        ds = self._datasets()
        cols = {k: _h5.read(ds[k], self._path, f"{self._where}/{k}", a, b).astype(np.int64)
                for k in INDEX_FIELDS + ("shape", "noise_shape")}
        # Version 1 files have no per-record rate: NaN stands for the site's configured rate.
        cols["rate"] = (_h5.read(ds["rate"], self._path, f"{self._where}/rate", a, b)
                        .astype(np.float64) if "rate" in ds else np.full(b - a, np.nan))
        cols["replica"] = (_h5.read(ds["replica"], self._path, f"{self._where}/replica", a, b)
                           .astype(np.int64) if "replica" in ds else np.zeros(b - a, np.int64))
        return cols

    def _raw_rows(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Index columns of rows ``a:b``, every row checked (``replica`` 0 in version 1)."""
        head = self._head
        cols = head[1] if head is not None and a == 0 and b == head[0] else self._read_rows(a, b)
        k, _, problem = _h5.check_rows(cols, self._nbits)
        if problem is not None:
            # Found while streaming, after len() was given: refuse rather than skip silently.
            raise _h5.fail(self._path, f"{self._where} (site {_h5.safe(self.name)!r})",
                           f"{problem.replace(f'record {k}:', f'record {a + k}:', 1)}; the "
                           f"file is damaged")
        return cols

    def _length(self) -> int:
        """Readable records: rows every index dataset has whose bits lie inside ``bits``.

        A writer killed between appends can leave index datasets of unequal length, or rows
        whose packed bits were never written (the tail); a damaged file can hold a bad row
        anywhere. Every row is checked once, in blocks, and the site ends before the first
        bad one. Rows the file's storage does not hold are never read (a crafted file may
        declare 2^40 of them); what is cut for any reason but a killed run's tail is named
        in :attr:`damage`.
        """
        if self._n is not None:
            return self._n
        ds = self._datasets()
        p, w = self._path, self._where
        self._nbits = _h5.backed_rows(ds["bits"], p, f"{w}/bits") or 0
        declared = {k: int(d.shape[0]) for k, d in ds.items() if k != "bits"}
        backed = [_h5.backed_rows(d, p, f"{w}/{k}") for k, d in ds.items() if k != "bits"]
        n = min(declared.values())
        damage: list[str] = []
        if self._complete and len(set(declared.values())) > 1:
            damage.append(f"index datasets differ in length {declared}")
        stored = min([n] + [b for b in backed if b is not None])
        if stored < n:
            damage.append(f"declares {n} records but the file stores {stored}")
            n = stored
        # Every row is checked, streamed in blocks: damage anywhere (not only in the last
        # rows a killed writer leaves) shortens the site to its sound rows and is named here,
        # instead of surfacing mid-analysis as an error that stops the command.
        for a in range(0, n, _BLOCK_ROWS):
            b = min(n, a + _BLOCK_ROWS)
            rows = self._read_rows(a, b)
            k, _, problem = _h5.check_rows(rows, self._nbits)
            if problem is None:
                if a == 0 and b == n and n <= _HEAD_ROWS:
                    self._head = (n, rows)  # a small site's whole index: read once
                continue
            problem = problem.replace(f"record {k}:", f"record {a + k}:", 1)
            if self._complete or "past the end of bits" not in problem:
                damage.append(f"{problem}; records {a + k}..{n - 1} not read")
            n = a + k
            break
        self.damage = "; ".join(damage) or None
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
    def rates(self) -> np.ndarray:
        """Drop rate each record's call was made with (float64).

        Where a file does not say (version 1 files, adapters that do not record it), the
        site's configured rate; NaN when that is unknown too.
        """
        own = self._index().rates
        site = np.nan if self.rate is None else float(self.rate)
        return np.where(np.isnan(own), site, own)

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
                rates=c["rate"].astype(np.float64),
                shapes=c["shape"].astype(np.int64).reshape(b - a, len(self.axes)),
                noise_shapes=c["noise_shape"].astype(np.int64).reshape(b - a, len(self.axes)))

    @property
    def stored_bytes(self) -> int:
        """Packed mask bytes stored for the site (its ``bits`` length; no index is read)."""
        # Through the checked dataset: a link out of the file (to a FIFO) hung right here.
        return _h5.backed_rows(self._dataset("bits"), self._path, f"{self._where}/bits") or 0

    def read_bits(self, begin: int, end: int) -> np.ndarray:
        """Packed bytes ``begin:end`` of the site's ``bits`` (uint8)."""
        if end <= begin:
            return np.empty(0, np.uint8)
        return _h5.read(self._dataset("bits"), self._path,
                        f"{self._where}/bits (site {_h5.safe(self.name)!r})", begin, end)

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
        raw = self.read_bits(o, o + nb)
        return _unpack(raw, tuple(int(x) for x in ix.noise_table[k]))

    def mask(self, i: int) -> np.ndarray | None:
        """The applied keep-mask of record ``i`` (bool, applied shape), or None if none."""
        noise = self.noise(i)
        if noise is None:
            return None
        ix = self._index()
        shape = tuple(int(x) for x in ix.shape_table[ix.shape_idx[self._check_index(i)]])
        try:
            if math.prod(shape) > MAX_MASK_ELEMENTS:
                raise MemoryError  # asked of the file, not of the machine: refused up front
            return np.broadcast_to(noise, shape).copy()
        except MemoryError:
            raise RunFileError(
                f"{self._path}: site {_h5.safe(self.name)!r} record {i}: the applied mask of "
                f"shape {shape} ({math.prod(shape)} elements) does not fit in memory (at most "
                f"{MAX_MASK_ELEMENTS}); "
                f"noise({i}) gives the drawn noise it broadcasts from") from None

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
        i = start
        while i < stop:
            j = i
            begin = int(offsets[i])
            while j < stop and (j == i or int(offsets[j] + nbytes[j]) - begin <= max_bytes):
                j += 1
            end = int(offsets[j - 1] + nbytes[j - 1])
            block = self.read_bits(begin, end)
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
        for a, b in zip(firsts, firsts[1:] + [len(idx)]):
            width = int(nb[a])
            shape = tuple(int(x) for x in ix.noise_table[kind[a]])
            size = math.prod(shape)
            # max_bytes bounds the unpacked bools (8x the packed bits), not the read.
            per = max(1, min(max_records, max_bytes // max(size, 1)))
            for c in range(a, b, per):
                d = min(b, c + per)
                k = d - c
                raw = self.read_bits(int(off[c]), int(off[c]) + width * k)
                if size % 8 == 0:
                    flat = np.unpackbits(raw)
                else:
                    flat = np.unpackbits(raw.reshape(k, width), axis=1, count=size)
                yield idx[c:d], flat.view(np.bool_).reshape((k, *shape))


#: Largest applied mask :meth:`Site.mask` builds (4 GiB of bools). A file may declare an
#: applied shape of 2^20 x 2^20 over a (1, 1) noise; ``noise(i)`` and the analysis never
#: broadcast, so only a copy asked for here could be that big.
MAX_MASK_ELEMENTS = 1 << 32

# Index rows read per block when streaming (65536 rows of ~70 bytes: a few MiB at a time).
_BLOCK_ROWS = 1 << 16
# A site's index kept from the length check, when this small (~1 KB): the analysis reads a
# site's rows twice, and thousands of two-record sites read each index three times otherwise.
_HEAD_ROWS = 16


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
            ("rates", np.asarray(cols["rate"], np.float64)),
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
        empty = {"steps": np.int64, "offsets": np.int64, "training": bool, "applied": bool,
                 "rates": np.float64}
        out: dict[str, np.ndarray] = {}
        for key in ("steps", "calls", "replicas", "training", "applied", "offsets", "shape_idx",
                    "noise_idx", "rates"):
            parts = self._parts.pop(key, [])
            out[key] = (np.concatenate(parts) if parts
                        else np.empty(0, empty.get(key, np.int8)))
        self.steps, self.calls, self.replicas = out["steps"], out["calls"], out["replicas"]
        self.rates = out["rates"]
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
        self._file = _h5.open_file(self.path)
        try:
            self.attrs: dict[str, Any] = _h5.attrs(self._file, self.path, "/")
            self._check_root()
            self.status: dict[str, Any] = _h5.read_status(self._file, self.path)
            self.attrs.update(self.status)
            self._damage: list[str] = []
            self._sites: dict[str, Site] = {}
            sites = _h5.member(self._file, "sites", self.path, "/sites", kind=h5py.Group)
            with _h5.guard(self.path, "/sites"):
                keys = sorted(sites.keys())
            for key in keys:
                where = f"/sites/{_h5.safe(key)}"
                site = Site(_h5.member(sites, key, self.path, where, kind=h5py.Group),
                            self.path, self.complete)
                if site.name in self._sites:
                    self._damage.append(f"{where}: site {_h5.safe(site.name)!r} is declared "
                                        f"twice; the second is not read")
                    continue
                self._sites[site.name] = site
        except BaseException:
            self._file.close()
            raise

    def _check_root(self) -> None:
        _check_format(self.attrs, self.path)
        devices = _h5.json_attr(self._file, "devices", self.path, "/", [])
        if not isinstance(devices, list):
            raise _h5.fail(self.path, "/ attribute 'devices'", "expected a JSON list")
        self.devices: list[str] = [str(d) for d in devices]
        # Root facts other code computes with: their types checked once, here.
        for key, kind in _ROOT_TYPES.items():
            value = self.attrs.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)
                                      or (isinstance(value, int) and value < 0)):
                want = "an integer >= 0" if kind is int else "text"
                raise _h5.fail(self.path, f"/ attribute {key!r}", f"expected {want}, found "
                               f"{type(value).__name__} {_h5.safe(repr(value), 60)}")

    @property
    def damage(self) -> list[str]:
        """What the reader had to leave out of a damaged file, one message per problem.

        Empty for a sound file, and for a killed run whose only loss is its unflushed tail
        (that is :attr:`complete` False and ``records_unreadable``). Takes every site's length.
        """
        out = list(self._damage)
        for s in self._sites.values():
            len(s)
            if s.damage:
                out.append(f"{s._where} (site {_h5.safe(s.name)!r}): {s.damage}")
        return out

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


_ROOT_TYPES: dict[str, type] = {
    "rank": int, "world_size": int, "local_rank": int, "framework": str,
    "framework_version": str, "backend": str, "host": str, "started": str, "run_id": str}


def _check_format(attrs: Mapping[str, Any], path: Path) -> None:
    fmt = attrs.get("format")
    if fmt != FORMAT_NAME:
        raise RunFileError(
            f"{path}: not a dropspy run file (HDF5 root attribute 'format' is "
            f"{_h5.safe(repr(fmt), 80)}, "
            f"expected {FORMAT_NAME!r})"
        )
    version = attrs.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise RunFileError(
            f"{path}: run file format version {_h5.safe(repr(version), 40)} is not supported "
            f"by dropspy "
            f"{__version__} (it reads versions 1 to {FORMAT_VERSION}); upgrade dropspy"
        )


def validate_file(path: str | os.PathLike[str]) -> list[str]:
    """Check a run file against ``schemas/run.schema.json`` and the layout rules.

    Returns:
        The problems found, each one line; empty when the file is valid.

    Raises:
        RunFileError: The file cannot be opened as a run at all.
    """
    from dropspy._schema import check_run_layout

    path = Path(path)
    f = _h5.open_file(path)
    try:
        _check_format(_h5.attrs(f, path, "/"), path)
        return check_run_layout(f, path)
    finally:
        f.close()
