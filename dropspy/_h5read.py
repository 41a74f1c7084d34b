"""The validated read layer: every byte dropspy reads from a run file comes through here.

A run file is untrusted input. Measured on crafted files before this layer existed: external
storage naming ``/etc/passwd`` was read as mask bits, a link to a FIFO hung every command, a
killed run's file with one flipped metadata byte hung for minutes (HDF5 retries checksums with
backoff in SWMR mode), a 170 kB file declaring 2^40 index rows asked for 8 TiB, and nested JSON
raised ``RecursionError``. The rules here:

- only hard links inside the file are followed; soft and external links, external raw storage
  and virtual datasets are refused by name;
- every dataset's kind, dtype and rank is checked before it is read, and no more rows are read
  than the file's own storage holds;
- attributes and JSON text are read with size and nesting limits; NaN and Infinity in JSON are
  refused;
- every wait has a bound: a file reopened in SWMR mode gets a small number of metadata read
  attempts (``H5Pset_metadata_read_attempts``) instead of HDF5's default of 100 with backoff;
- every failure is a :class:`~dropspy.errors.RunFileError` that names the file, the object
  and what was wrong, never a raw h5py/numpy error.

The reader (:mod:`dropspy.store`) and the validator (:mod:`dropspy._schema`) both use it.
Over 600 lines for one concept: each rule above is a few small functions, kept together so
that no read can bypass them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dropspy import _isolate
from dropspy._isolate import watched
from dropspy._text import safe
from dropspy.errors import RunFileError

__all__ = ["open_file", "fail", "safe", "guard", "member", "dataset", "backed_rows", "read",
           "attr", "attrs", "text_attr", "number_attr", "json_attr", "loads", "parse_json",
           "read_status", "check_rows", "dim_labels",
           "MAX_DIM", "INDEX_KINDS", "read_site_attrs", "read_site_index"]

MAX_ATTR_BYTES = 1 << 20      # one attribute (the writer's largest is a site's `extra`, ~1 kB)
MAX_ATTRS = 1024              # attributes read from one object
MAX_STATUS_BYTES = 1 << 20    # the writer's status is a fixed 64 KiB
MAX_JSON_DEPTH = 32           # the writer's JSON nests at most 3 deep
MAX_RANK = 32                 # axes of a mask
MAX_DIM = 1 << 40             # one mask dimension
_MAX_ELEMENTS = 1 << 62       # elements of one mask: products stay exact in int64
# Metadata read attempts in SWMR mode. HDF5's default is 100, each retry after a backoff, per
# metadata read: one flipped byte in a killed run's metadata hung `inspect` past 15 minutes.
# A live writer's half-written metadata needs a retry or two; 8 took 2 ms on a damaged file.
SWMR_READ_ATTEMPTS = 8
# Filters (a file h5repack'ed with gzip) may shrink storage below the data's size; this bounds
# what a compressed dataset may claim against what it stores.
_MAX_FILTER_RATIO = 1024


def _reason(exc: BaseException) -> str:
    """A short, one-line cause from an h5py/numpy exception (their text can be long)."""
    text = " ".join(str(exc).split()).strip("'\"") or type(exc).__name__
    m = re.search(r"\(([^()]*)\)\s*$", text)  # h5py: "Unable to ... (incorrect checksum ...)"
    if m and m.group(1):
        text = m.group(1)
    return safe(text, limit=160)


def fail(path: Path, where: str, what: str) -> RunFileError:
    """The one shape of a read failure: ``<file>: <object>: <what was wrong>``."""
    return RunFileError(f"{path}: {safe(where, 200)}: {what}")


@contextlib.contextmanager
def guard(path: Path, where: str, doing: str = "cannot be read") -> Iterator[None]:
    """Turn any error h5py or numpy raises while reading ``where`` into a RunFileError.

    In an isolated child (:mod:`dropspy._isolate`) the call is also watched: one that hangs
    inside HDF5 is stopped, and a crash names ``where``.
    """
    try:
        with watched(path, where):
            yield
    except RunFileError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError, KeyError, IndexError, OverflowError,
            AttributeError, RecursionError, UnicodeError, MemoryError) as exc:
        raise fail(path, where, f"{doing} ({_reason(exc)}); the file is damaged") from exc


# -- opening ------------------------------------------------------------------------------


def _hdf5_library() -> Any:
    """``H5Pset_metadata_read_attempts`` of the HDF5 library h5py uses (h5py does not wrap it)."""
    candidates: list[str | None] = []
    try:
        with open("/proc/self/maps") as maps:  # the very library h5py loaded (Linux)
            for line in maps:
                lib = line.split(maxsplit=5)[-1].strip()
                if "libhdf5" in os.path.basename(lib) and "hdf5_hl" not in lib:
                    candidates.append(lib)
                    break
    except OSError:
        pass
    # No /proc (macOS, Windows): the copy bundled in h5py's wheel.
    pkg = Path(h5py.__file__).resolve().parent
    for pattern in ("../h5py.libs/libhdf5-*.so*", ".dylibs/libhdf5.*dylib", "hdf5*.dll",
                    "../h5py.libs/hdf5*.dll"):
        candidates.extend(str(c) for c in sorted(pkg.glob(pattern)) if "hl" not in c.name)
    candidates.append(None)  # a statically linked or already global library
    for name in candidates:
        try:
            fn = ctypes.CDLL(name).H5Pset_metadata_read_attempts
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    return None


_SET_ATTEMPTS: Any = None
_SET_ATTEMPTS_LOOKED = False


def _open_swmr(path: Path) -> h5py.File:
    """Open a file a writer left flagged open-for-write, with bounded metadata retries."""
    global _SET_ATTEMPTS, _SET_ATTEMPTS_LOOKED
    if not _SET_ATTEMPTS_LOOKED:
        _SET_ATTEMPTS, _SET_ATTEMPTS_LOOKED = _hdf5_library(), True
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    if _SET_ATTEMPTS is None or _SET_ATTEMPTS(fapl.id, SWMR_READ_ATTEMPTS) < 0:
        # Without the bound a damaged killed run could hang the reader: refuse rather than wait.
        raise OSError("the HDF5 library does not allow bounding SWMR read retries")
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ,
                        fapl=fapl)
    return h5py.File(fid)


def open_file(path: Path) -> h5py.File:
    """Open ``path`` read-only as HDF5; every refusal is one RunFileError naming the path."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read: {_reason(exc)}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise RunFileError(f"{path}: is a directory, expected a run file (.h5)")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or a device would block or never end: never opened.
        raise RunFileError(f"{path}: not a regular file (a pipe, device or socket), expected "
                           f"a run file (.h5)")
    if st.st_size == 0:
        raise RunFileError(f"{path}: file is empty, expected an HDF5 run file")
    try:
        with watched(path, "opening"):
            is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read: {_reason(exc)}") from exc
    if not is_hdf5:
        raise RunFileError(f"{path}: not an HDF5 file, expected a dropspy run file")
    try:
        with watched(path, "opening"):
            return h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as exc:
        first: BaseException = exc
    if "open for write" in str(first):
        # A writer that died outside SWMR mode leaves its status flag set; an SWMR reader
        # ignores it (with a bound on retries, see SWMR_READ_ATTEMPTS).
        try:
            with watched(path, "opening (SWMR)"):
                return _open_swmr(path)
        except (OSError, RuntimeError, ValueError) as exc:
            first = exc
    raise RunFileError(
        f"{path}: HDF5 file cannot be opened (truncated or damaged): {_reason(first)}"
    ) from first


# -- objects ------------------------------------------------------------------------------


def member(group: h5py.Group, name: str, path: Path, where: str, *,
           kind: type | None = None, required: bool = True) -> Any:
    """``group[name]`` through a hard link only, of the ``kind`` expected (Group or Dataset).

    Returns None when it is absent and not ``required``.
    """
    # Low-level calls: h5py's ``group.get(..., getlink=True)`` then ``group[name]`` looked the
    # link up twice and cost ~1 ms a dataset under load (a fifth of opening 2,000 sites).
    key = name.encode("utf-8")
    links = group.id.links
    with guard(path, where):
        try:
            info = links.get_info(key)
        except (KeyError, RuntimeError):
            if links.exists(key):
                raise
            info = None  # h5py says "name doesn't exist" with a RuntimeError
    if info is None:
        if not required:
            return None
        raise fail(path, where, f"missing ({'group' if kind is h5py.Group else 'dataset'} "
                   f"expected)")
    if info.type == h5py.h5l.TYPE_EXTERNAL:
        with guard(path, where):
            filename, target = links.get_val(key)
        raise fail(path, where, f"is an external link to {safe(os.fsdecode(filename), 120)}:"
                   f"{safe(os.fsdecode(target), 120)}; a run file is read only from its own "
                   f"contents")
    if info.type == h5py.h5l.TYPE_SOFT:
        with guard(path, where):
            target = links.get_val(key)
        raise fail(path, where, f"is a soft link to {safe(os.fsdecode(target), 120)}; a run "
                   f"file holds only hard links")
    if info.type != h5py.h5l.TYPE_HARD:
        raise fail(path, where, f"is a user-defined link (type {info.type}); a run file holds "
                   f"only hard links")
    with guard(path, where):
        oid = h5py.h5o.open(group.id, key)
        obj: Any = (h5py.Dataset(oid) if isinstance(oid, h5py.h5d.DatasetID) else
                    h5py.Group(oid) if isinstance(oid, h5py.h5g.GroupID) else oid)
    if kind is not None and not isinstance(obj, kind):
        found = "a group" if isinstance(obj, h5py.Group) else "a dataset" if isinstance(
            obj, h5py.Dataset) else "a named datatype"
        want = "a group" if kind is h5py.Group else "a dataset"
        raise fail(path, where, f"expected {want}, found {found}")
    return obj


_FILTERS = "_dropspy_filters"  # checked storage, remembered on the h5py.Dataset object
_SHAPE = "_dropspy_shape"      # its shape when checked (a reader does not refresh it)


def _shape(d: h5py.Dataset) -> tuple[int, ...]:
    shape = getattr(d, _SHAPE, None)
    return tuple(d.id.shape) if shape is None else tuple(shape)


def _check_storage(d: h5py.Dataset, path: Path, where: str) -> int:
    """Refuse data stored outside the file; return the number of filters (compression)."""
    known = getattr(d, _FILTERS, None)
    if known is not None:
        return int(known)
    with guard(path, where):
        dcpl = getattr(d, "_dcpl", None) or d.id.get_create_plist()  # h5py keeps it open
        layout = dcpl.get_layout()
        n_external = dcpl.get_external_count()
        n_filters = dcpl.get_nfilters()
    if layout == h5py.h5d.VIRTUAL:
        raise fail(path, where, "is a virtual dataset (its data lives in other files); a run "
                   "file keeps its data inside")
    if n_external:
        with guard(path, where):
            name = dcpl.get_external(0)[0]
        raise fail(path, where, f"stores its data in an external file "
                   f"({safe(os.fsdecode(name), 120)}); a run file keeps its data inside")
    setattr(d, _FILTERS, int(n_filters))
    return int(n_filters)


def dataset(group: h5py.Group, name: str, path: Path, where: str, *, kinds: str, ndim: int,
            itemsize: int | None = None, required: bool = True) -> Any:
    """A checked dataset: hard link, stored in the file, dtype kind in ``kinds``, rank ``ndim``."""
    d = member(group, name, path, where, kind=h5py.Dataset, required=required)
    if d is None:
        return None
    _check_storage(d, path, where)
    with guard(path, where):
        dtype, shape = d.id.dtype, d.id.shape  # h5py's properties cost ~10x more
    setattr(d, _SHAPE, shape)
    if shape is None or dtype.kind not in kinds or dtype.subdtype is not None or (
            itemsize is not None and dtype.itemsize != itemsize):
        raise fail(path, where, f"expected {_kind_words(kinds, itemsize)}, found "
                   f"{'an empty dataspace' if shape is None else _dtype_words(dtype)}")
    if len(shape) != ndim:
        raise fail(path, where, f"expected {ndim} dimension(s), found shape {shape}")
    return d


def _kind_words(kinds: str, itemsize: int | None) -> str:
    words = {"i": "signed integers", "u": "unsigned integers", "b": "booleans",
             "S": "fixed-length bytes", "f": "floats"}
    text = " or ".join(words[k] for k in kinds)
    return f"{text} of {itemsize} byte(s)" if itemsize else text


def _dtype_words(dtype: np.dtype) -> str:
    if dtype.kind == "O":
        return "variable-length data"
    if dtype.kind == "V":
        return "a compound or opaque type"
    return f"{dtype} values"


def backed_rows(d: h5py.Dataset, path: Path, where: str) -> int | None:
    """Rows of ``d`` (along its first axis) that the file actually stores.

    A chunked dataset may declare any extent and leave chunks unallocated (they read as fill
    values): 2^40 declared rows in a 170 kB file. None when rows take no bytes (rank 0 sites).
    """
    n_filters = _check_storage(d, path, where)
    with guard(path, where):
        shape = _shape(d)
        row = d.id.dtype.itemsize * math.prod(shape[1:])
        stored = d.id.get_storage_size()
    if row == 0:
        return None
    limit = stored * (_MAX_FILTER_RATIO if n_filters else 1)
    return min(int(shape[0]), limit // row)


def read(d: h5py.Dataset, path: Path, where: str, start: int = 0,
         stop: int | None = None) -> np.ndarray:
    """``d[start:stop]`` along the first axis; errors become RunFileError naming ``where``."""
    with guard(path, where):
        shape = _shape(d)
        if not shape:
            return np.asarray(d[()])
        n = int(shape[0])
        stop = n if stop is None else max(0, min(int(stop), n))
        start = max(0, min(int(start), stop))
        out = np.empty((stop - start, *shape[1:]), d.id.dtype)
        if out.size:
            # One hyperslab read, without h5py's selection machinery (~60 us a call, paid
            # ten times per site when a run has thousands of small sites).
            fspace = d.id.get_space()
            fspace.select_hyperslab((start,) + (0,) * (len(shape) - 1), out.shape)
            d.id.read(h5py.h5s.create_simple(out.shape), fspace, out)
        return out


# -- attributes and JSON --------------------------------------------------------------------


def _plain(value: Any, path: Path, where: str) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return _plain(value.reshape(()).item(), path, where)
        if value.size > 64 or value.dtype.kind not in "iufSUb":
            raise fail(path, where, f"expected a single value, found an array of shape "
                       f"{value.shape} ({_dtype_words(value.dtype)})")
        return [_plain(v, path, where) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _plain(value.item(), path, where)
    if isinstance(value, str):
        # h5py decodes non-UTF-8 bytes of variable-length strings to lone surrogates.
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    raise fail(path, where, f"expected text or a number, found {type(value).__name__}")


def attr(obj: Any, name: str, path: Path, where: str, *, required: bool = True,
         default: Any = None) -> Any:
    """One attribute as a plain Python value, its stored size bounded."""
    here = f"{where} attribute {name!r}"
    with guard(path, here):
        try:
            aid = h5py.h5a.open(obj.id, name.encode("utf-8"))
        except KeyError:
            aid = None
    if aid is None:
        if required:
            raise fail(path, where, f"missing attribute {name!r}")
        return default
    with guard(path, here):
        size = aid.get_storage_size()
        dtype, shape = aid.dtype, aid.shape
    if size > MAX_ATTR_BYTES:
        raise fail(path, here, f"is {size} bytes, more than the {MAX_ATTR_BYTES} a run file's "
                   f"attribute may hold")
    if shape is not None and (dtype.kind == "S" or (
            dtype.kind in "iuf" and dtype.metadata is None)):
        with guard(path, here):
            # Numbers and fixed-length text read straight from the open attribute: h5py's
            # mapping would open it again (opening dominated the cost of 2000-site files).
            value = np.empty(shape, dtype)
            aid.read(value)
        return _plain(value[()] if value.ndim == 0 else value, path, here)

    def read_whole() -> Any:
        with guard(path, here):
            value = obj.attrs[name]
        return _plain(value, path, here)

    # Anything else (variable-length text above all) lives in a global heap collection,
    # which HDF5 parses trusting its sizes: read where a crash or hang cannot reach us. In
    # a child already (every CLI command) it is read there: one fork per attribute would
    # let a file of 10,000 sites with variable-length attributes cost minutes.
    if _isolate.isolated():
        return read_whole()
    return _isolate.call(read_whole, str(path))


def dim_labels(dsets: list[h5py.Dataset], path: Path) -> list[str]:
    """The label of each dataset's first dimension ("" when none), read isolated.

    Labels are variable-length text in a global heap collection: one flipped byte of its
    sizes crashed or hung HDF5 (see :mod:`dropspy._isolate`). One child reads them all.
    """
    def read_all() -> list[str]:
        out = []
        for d in dsets:
            with guard(path, f"{d.name} dimension 0 label"):
                out.append(str(d.dims[0].label) if len(d.shape) else "")
        return out

    return _isolate.call(read_all, str(path))


def attrs(obj: Any, path: Path, where: str) -> dict[str, Any]:
    """Every attribute of ``obj`` (bounded in number and size) as plain Python values."""
    with guard(path, where):
        n = obj.id.get_num_attrs() if hasattr(obj.id, "get_num_attrs") else len(obj.attrs)
    if n > MAX_ATTRS:
        raise fail(path, where, f"has {n} attributes, more than the {MAX_ATTRS} a run file has")
    with guard(path, where):
        names = list(obj.attrs.keys())
    return {k: attr(obj, k, path, where) for k in names}


def text_attr(obj: Any, name: str, path: Path, where: str, *, required: bool = True,
              default: str = "") -> str:
    """A text attribute; anything else is named."""
    value = attr(obj, name, path, where, required=required, default=default)
    if not isinstance(value, str):
        raise fail(path, f"{where} attribute {name!r}",
                   f"expected text, found {type(value).__name__} {safe(repr(value), 60)}")
    return value


def number_attr(obj: Any, name: str, path: Path, where: str) -> float | None:
    """A float attribute, NaN meaning "unknown" (None); +-inf is refused."""
    value = attr(obj, name, path, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(path, f"{where} attribute {name!r}",
                   f"expected a number, found {type(value).__name__} {safe(repr(value), 60)}")
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise fail(path, f"{where} attribute {name!r}", f"expected a finite number, found {value}")
    return value


def json_attr(obj: Any, name: str, path: Path, where: str, default: Any = None) -> Any:
    """A JSON text attribute, parsed with :func:`parse_json`'s limits (``default`` if absent)."""
    value = attr(obj, name, path, where, required=False, default=None)
    if value is None:
        return default
    if not isinstance(value, str):
        raise fail(path, f"{where} attribute {name!r}",
                   f"expected JSON text, found {type(value).__name__} {safe(repr(value), 60)}")
    return parse_json(value, path, f"{where} attribute {name!r}")


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def loads(text: str, max_bytes: int = MAX_ATTR_BYTES) -> Any:
    """``json.loads`` with limits: size, nesting depth (no RecursionError), finite numbers.

    Raises:
        ValueError: The text breaks a limit or is not JSON; the message says which.
    """
    if len(text) > max_bytes:
        raise ValueError(f"{len(text)} characters, more than {max_bytes}")
    # Cheap first: fewer brackets than the limit cannot nest deeper than it.
    opening = text.count("[") + text.count("{")
    bare = np.frombuffer(_STRINGS.sub("", text).encode("utf-8", "replace"), np.uint8) if (
        opening > MAX_JSON_DEPTH) else np.empty(0, np.uint8)
    if bare.size:
        step = (np.isin(bare, (0x5B, 0x7B)).astype(np.int64)
                - np.isin(bare, (0x5D, 0x7D)).astype(np.int64))
        depth = int(np.cumsum(step).max())
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested {depth} deep, more than {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deep") from None
    except ValueError as exc:
        raise ValueError(_reason(exc)) from None


def parse_json(text: str, path: Path, where: str, max_bytes: int = MAX_ATTR_BYTES) -> Any:
    """JSON text read from the file, with :func:`loads`' limits; failures name ``where``."""
    try:
        return loads(text, max_bytes)
    except ValueError as exc:
        raise fail(path, where, f"is not valid JSON ({exc}): {safe(repr(text), 80)}") from None


def read_status(f: h5py.File, path: Path) -> dict[str, Any]:
    """The writer's mutable status (``/status``), each field checked for its type."""
    d = dataset(f, "status", path, "/status", kinds="S", ndim=1)
    with guard(path, "/status"):
        shape, itemsize = d.shape, d.dtype.itemsize
    if shape != (1,) or itemsize > MAX_STATUS_BYTES:
        raise fail(path, "/status", f"expected one fixed-length text of at most "
                   f"{MAX_STATUS_BYTES} bytes, found shape {shape} of {itemsize}-byte texts")
    raw = bytes(read(d, path, "/status")[0]).rstrip(b"\0")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(path, "/status", f"is not UTF-8 text: {safe(repr(raw[:60]))}") from exc
    status = parse_json(text, path, "/status", MAX_STATUS_BYTES)
    if not isinstance(status, dict):
        raise fail(path, "/status", f"expected a JSON object, found {type(status).__name__}")
    want = {"closed_cleanly": (int,), "records_written": (int,), "records_dropped": (dict,),
            "stop_reason": (str,), "notes": (list,)}
    for key, types in want.items():
        if key in status and (not isinstance(status[key], types) or (
                isinstance(status[key], bool) and key == "records_written")):
            raise fail(path, f"/status {key}", f"expected {types[0].__name__}, found "
                       f"{type(status[key]).__name__} {safe(repr(status[key]), 60)}")
    for key, value in status.get("records_dropped", {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail(path, f"/status records_dropped {key!r}",
                       f"expected a count >= 0, found {safe(repr(value), 60)}")
    if status.get("records_written", 0) < 0:
        raise fail(path, "/status records_written", "expected a count >= 0")
    status["notes"] = [n if isinstance(n, str) else json.dumps(n)
                       for n in status.get("notes", [])]
    return status


# -- index rows -----------------------------------------------------------------------------


def _bad_rates(rates: np.ndarray | None, n: int) -> np.ndarray:
    """Per-record rates that are not NaN (the site's rate) and not in [0, 1] (inf, -1...)."""
    if rates is None:
        return np.zeros(n, bool)
    r = np.asarray(rates, np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isnan(r) & ~((r >= 0) & (r <= 1))


def check_rows(cols: dict[str, np.ndarray], nbits: int) -> tuple[int, np.ndarray, str | None]:
    """How many leading index rows are sound, their packed sizes, and what the first bad is.

    ``cols``: ``step``, ``call``, ``training``, ``applied``, ``offset`` (n,), ``shape`` and
    ``noise_shape`` (n, rank), already cut to a common length n. A row is sound when its
    shapes are non-negative and bounded, its noise broadcasts to its applied shape, its call is
    >= 0, and its packed bits lie inside ``bits`` (``nbits`` bytes).

    Returns:
        ``(k, nbytes, problem)``: rows ``[0, k)`` are sound, ``nbytes`` their packed sizes,
        ``problem`` a phrase naming what is wrong with row ``k`` (None when all are sound).
    """
    n = len(cols["offset"])
    shape, nshape = cols["shape"], cols["noise_shape"]
    applied = cols["applied"] != 0
    offsets = cols["offset"]
    bad_shape = ((shape < 0) | (shape > MAX_DIM)).any(axis=1)
    # Float products cannot overflow; exact int products are taken only below 2^62.
    big = np.prod(np.maximum(shape, 0).astype(np.float64), axis=1) > _MAX_ELEMENTS
    nbad = ((nshape < 0) | (nshape > MAX_DIM)).any(axis=1)
    nbig = np.prod(np.maximum(nshape, 0).astype(np.float64), axis=1) > _MAX_ELEMENTS
    sound_n = ~(nbad | nbig)
    sizes = np.zeros(n, np.int64)
    sizes[applied & sound_n] = (np.prod(nshape[applied & sound_n], axis=1) + 7) // 8
    broadcast = ((nshape == 1) | (nshape == shape)).all(axis=1)
    problems = [
        (bad_shape | big, "applied shape {shape} is negative or too large"),
        (applied & (nbad | nbig), "noise shape {nshape} is negative or too large"),
        (applied & ~broadcast, "noise shape {nshape} does not broadcast to applied shape "
                               "{shape}"),
        (cols["call"] < 0, "call index {call} is negative"),
        (applied & (offsets < 0), "offset {offset} is negative"),
        (_bad_rates(cols.get("rate"), n), "rate {rate} is not a drop rate in [0, 1]"),
        (applied & ((offsets > nbits) | (sizes > nbits - np.minimum(np.maximum(offsets, 0),
                                                                    nbits))),
         "packed bits [{offset}, +{size}) lie past the end of bits ({nbits} bytes)"),
    ]
    first, what = n, None
    for bad, phrase in problems:
        if bad.any():
            k = int(np.argmax(bad))
            if k < first:
                first, what = k, phrase
    if what is None:
        return n, sizes, None
    k = first
    problem = f"record {k}: " + what.format(
        shape=tuple(int(x) for x in shape[k]), nshape=tuple(int(x) for x in nshape[k]),
        call=int(cols["call"][k]), offset=int(offsets[k]), size=int(sizes[k]), nbits=nbits,
        rate=float(cols["rate"][k]) if "rate" in cols else None)
    return k, sizes[:k], problem


# -- one site ---------------------------------------------------------------------------------


def read_site_attrs(g: h5py.Group, path: Path, where: str) -> dict[str, Any]:
    """A site group's attributes, each checked for its type (see run.schema.json)."""
    out: dict[str, Any] = {
        key: text_attr(g, key, path, where) for key in ("name", "layer", "layer_class", "role")}
    if not out["name"]:
        raise fail(path, f"{where} attribute 'name'", "expected a non-empty site name")
    for key in ("gate", "opaque"):
        out[key] = text_attr(g, key, path, where, required=False) or None
    for key in ("rate", "scale"):
        out[key] = number_attr(g, key, path, where)
    if out["rate"] is not None and not 0 <= out["rate"] <= 1:
        raise fail(path, f"{where} attribute 'rate'",
                   f"expected a drop rate in [0, 1] (or NaN: unknown), found {out['rate']!r}")
    axes = json_attr(g, "axes", path, where, [])
    if (not isinstance(axes, list) or len(axes) > MAX_RANK
            or not all(isinstance(a, str) for a in axes)):
        raise fail(path, f"{where} attribute 'axes'",
                   f"expected a list of at most {MAX_RANK} axis names, found "
                   f"{safe(repr(axes), 80)}")
    if len(set(axes)) != len(axes):
        raise fail(path, f"{where} attribute 'axes'",
                   f"expected distinct axis names, found {safe(repr(axes), 80)}")
    out["axes"] = tuple(axes)
    ns = json_attr(g, "noise_shape", path, where)
    if ns is not None and (not isinstance(ns, list) or len(ns) != len(axes) or not all(
            v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_DIM)
            for v in ns)):
        raise fail(path, f"{where} attribute 'noise_shape'",
                   f"expected null or {len(axes)} sizes (one per axis, null where unknown), "
                   f"found {safe(repr(ns), 80)}")
    out["noise_shape"] = None if ns is None else tuple(ns)
    extra = json_attr(g, "extra", path, where, {})
    if not isinstance(extra, dict):
        raise fail(path, f"{where} attribute 'extra'",
                   f"expected a JSON object, found {type(extra).__name__}")
    out["extra"] = extra
    return out


#: dtype kinds each per-record index dataset may have (the reader and validate agree).
INDEX_KINDS = {"step": "iu", "call": "iu", "training": "iub", "applied": "iub", "offset": "iu"}


def read_site_index(g: h5py.Group, path: Path, where: str, rank: int, complete: bool,
                    block: int = 1 << 16) -> tuple[int, int, str | None, int | None]:
    """A site's index checked row by row against itself and the file's storage, streamed.

    Rows are read ``block`` at a time, so memory stays bounded by the block, not by the
    number of records (``validate`` on a 4-million-record site).

    Returns:
        ``(n, nbits, damage, overlap)``: the number of sound leading rows, the bytes of
        ``bits`` the file stores, a message naming the damage when rows had to be left out
        for any reason but the expected tail of a killed run (None otherwise), and the first
        record whose packed bits overlap the previous record's (None when none do).
    """
    dsets = {name: dataset(g, name, path, f"{where}/{name}", kinds=kinds, ndim=1)
             for name, kinds in INDEX_KINDS.items()}
    replica = dataset(g, "replica", path, f"{where}/replica", kinds="iu", ndim=1,
                      required=False)
    if replica is not None:
        dsets["replica"] = replica
    rate = dataset(g, "rate", path, f"{where}/rate", kinds="f", ndim=1, required=False)
    if rate is not None:
        dsets["rate"] = rate
    for name in ("shape", "noise_shape"):
        d = dataset(g, name, path, f"{where}/{name}", kinds="iu", ndim=2)
        if d.shape[1] != rank:
            raise fail(path, f"{where}/{name}", f"expected {rank} column(s) (one per axis of "
                       f"the site), found shape {d.shape}")
        dsets[name] = d
    bits = dataset(g, "bits", path, f"{where}/bits", kinds="u", ndim=1, itemsize=1)
    nbits = backed_rows(bits, path, f"{where}/bits") or 0
    declared = {name: int(d.shape[0]) for name, d in dsets.items()}
    backed = {name: backed_rows(d, path, f"{where}/{name}") for name, d in dsets.items()}
    n = min(declared.values())
    stored = min([n] + [b for b in backed.values() if b is not None])
    damage: list[str] = []
    if complete and len(set(declared.values())) > 1:
        damage.append(f"index datasets differ in length {declared}")
    if stored < n:
        # Rows the file does not hold read as fill values: never used as records.
        damage.append(f"declares {n} records but the file stores {stored}")
        n = stored
    if complete and int(bits.shape[0]) > nbits:
        damage.append(f"bits declares {int(bits.shape[0])} bytes but the file stores {nbits}")
    overlap: int | None = None
    last_end = 0
    for a in range(0, n, block):
        b = min(n, a + block)
        cols = {name: read(d, path, f"{where}/{name}", a, b).astype(
                    np.float64 if name == "rate" else np.int64)
                for name, d in dsets.items()}
        k, sizes, problem = check_rows(cols, nbits)
        if overlap is None:
            applied = cols["applied"][:k] != 0
            starts = cols["offset"][:k][applied]
            ends = starts + sizes[applied]
            prev = np.concatenate(([last_end], ends[:-1]))
            bad = np.flatnonzero(starts < prev)
            if len(bad):
                overlap = a + int(np.flatnonzero(applied)[bad[0]])
            if len(ends):
                last_end = int(ends[-1])
        if problem is not None:
            problem = problem.replace(f"record {k}:", f"record {a + k}:", 1)
            if complete or "past the end of bits" not in problem:
                damage.append(f"{problem}; records {a + k}..{n - 1} not read")
            return a + k, nbits, "; ".join(damage), overlap
    return n, nbits, ("; ".join(damage) or None), overlap
