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
from dropspy.records import FORMAT_NAME, FORMAT_VERSION, INDEX_FIELDS, Record, SiteInfo

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
            cols = {k: g[k][()] for k in INDEX_FIELDS}
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
            while j < stop and (j == i
                                or int(self.offsets[j] + self.nbytes[j]) - begin <= max_bytes):
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
        unpacked with one ``np.unpackbits`` call, up to ``max_bytes`` of unpacked noise:
        per-record work dominates small masks (GRU gate masks are a few hundred bytes).
        Records with no mask are skipped.
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
