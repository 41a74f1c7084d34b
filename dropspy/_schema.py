"""Check a run file against ``schemas/run.schema.json`` with numpy and h5py alone.

A small validator for the subset of JSON Schema the run schema uses (type, const, enum,
minimum, maximum, minLength, minItems, required, properties, items, additionalProperties,
contentMediaType/contentSchema), so ``dropspy validate`` needs no extra dependency.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dropspy import _h5read as _h5
from dropspy.errors import RunFileError

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
}


def _v(value: Any) -> str:
    return _h5.safe(repr(value), 80)


def run_schema() -> dict[str, Any]:
    """The run file schema, as shipped in the package."""
    text = resources.files("dropspy").joinpath("schemas/run.schema.json").read_text("utf-8")
    return json.loads(text)


def check(value: Any, schema: dict[str, Any], where: str) -> list[str]:
    """Problems of ``value`` against ``schema`` (the subset above), each naming ``where``."""
    out: list[str] = []
    if "const" in schema and value != schema["const"]:
        return [f"{where}: expected {schema['const']!r}, found {_v(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: expected one of {schema['enum']!r}, found {_v(value)}"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{where}: expected {' or '.join(types)}, "
                    f"found {type(value).__name__} {_v(value)}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: expected >= {schema['minimum']}, found {_v(value)}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: expected <= {schema['maximum']}, found {_v(value)}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append(f"{where}: expected at least {schema['minLength']} characters, "
                       f"found {_v(value)}")
        if schema.get("contentMediaType") == "application/json":
            try:
                decoded = _h5.loads(value)
            except ValueError as exc:
                return out + [f"{where}: expected JSON text ({exc}), found "
                              f"{_v(value)}"]
            out += check(decoded, schema.get("contentSchema", {}), where)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{where}: expected at least {schema['minItems']} items, found {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                out += check(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{where}: missing required {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                out += check(item, props[key], f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += check(item, schema["additionalProperties"], f"{where}.{key}")
    return out


#: Problems after which validate stops looking: a garbage file is said to be one quickly.
MAX_PROBLEMS = 100


def _problem(exc: RunFileError, path: Path) -> str:
    """A read failure as a problem line (without the path: validate prints it once)."""
    return str(exc).removeprefix(f"{path}: ")


def check_run_layout(f: h5py.File, path: Path | None = None) -> list[str]:
    """Every problem of an open run file: attributes, datasets, and record consistency.

    Everything is read through :mod:`dropspy._h5read`: links out of the file, data stored
    outside it and sizes the file does not back are problems here, never followed.
    """
    path = Path(f.filename) if path is None else path
    schema = run_schema()["properties"]
    try:
        root = _h5.attrs(f, path, "/")
    except RunFileError as exc:
        return [_problem(exc, path)]
    problems = check(root, schema["root_attributes"], "/")
    complete = False
    try:
        status = _h5.dataset(f, "status", path, "/status", kinds="S", ndim=1)
        if status.shape != (1,) or status.dtype.itemsize > _h5.MAX_STATUS_BYTES:
            raise _h5.fail(path, "/status", "expected a (1,) fixed-length bytes dataset")
        text = bytes(_h5.read(status, path, "/status")[0]).rstrip(b"\0").decode(
            "utf-8", "replace")
        problems += check(text, {"contentMediaType": "application/json",
                                 "contentSchema": schema["status"]}, "/status")
        complete = bool(_h5.read_status(f, path).get("closed_cleanly"))
    except RunFileError as exc:
        line = _problem(exc, path)
        if not any(p.startswith("/status") for p in problems):
            problems.append(line)
    try:
        sites = _h5.member(f, "sites", path, "/sites", kind=h5py.Group)
        with _h5.guard(path, "/sites"):
            keys = list(sites.keys())
    except RunFileError as exc:
        return problems + [_problem(exc, path)]
    names: set[str] = set()
    steps: list[tuple[str, h5py.Dataset]] = []  # (site, its step dataset): labels read last
    for done, key in enumerate(keys):
        if len(problems) >= MAX_PROBLEMS:
            # 100,000 empty groups took validate past 20 s and printed 400,000 lines.
            problems.append(f"/sites: stopped after {len(problems)} problems; {len(keys) - done} "
                            f"of {len(keys)} site groups not checked")
            break
        where = f"/sites/{_h5.safe(key)}"
        try:
            g = _h5.member(sites, key, path, where, kind=h5py.Group)
            attrs = _h5.attrs(g, path, where)
        except RunFileError as exc:
            problems.append(_problem(exc, path))
            continue
        site_problems = check(attrs, schema["site_attributes"], where)
        if not site_problems:
            try:  # the reader's own checks (finite rate, axes that are names...)
                _h5.read_site_attrs(g, path, where)
            except RunFileError as exc:
                site_problems.append(_problem(exc, path))
        problems += site_problems
        name = attrs.get("name")
        name = name if isinstance(name, str) else repr(name)  # a list is not hashable
        if name in names:
            problems.append(f"{where}: site name {_h5.safe(repr(name))} declared twice")
        names.add(str(name))
        try:
            problems += _check_site_data(g, where, schema["site_datasets"]["properties"], path,
                                         complete, steps)
        except RunFileError as exc:
            problems.append(_problem(exc, path))
    if steps:
        try:
            labels = _h5.dim_labels([d for _, d in steps], path)
        except RunFileError as exc:
            return problems + [_problem(exc, path)]
        for (where, _), label in zip(steps, labels):
            if label != "record":
                problems.append(f"{where}/step: dimension 0 labelled {_h5.safe(repr(label))}, "
                                f"expected 'record'")
    return problems


def _check_site_data(g: h5py.Group, where: str, spec: dict[str, Any], path: Path,
                     complete: bool, steps: list[tuple[str, h5py.Dataset]]) -> list[str]:
    problems: list[str] = []
    lengths = {}
    version = g.file.attrs.get("format_version", 1)
    for name, rule in spec.items():
        d = _h5.member(g, name, path, f"{where}/{name}", kind=h5py.Dataset, required=False)
        if d is None:
            # A dataset added by a later format version is not missing from an older file.
            if isinstance(version, (int, np.integer)) and version < rule.get("since_version", 1):
                continue
            problems.append(f"{where}/{name}: missing dataset")
            continue
        want = rule["const"]
        if str(d.dtype) != want["dtype"] or d.ndim != want["ndim"]:
            problems.append(
                f"{where}/{name}: expected {want['dtype']} with {want['ndim']} dimension(s), "
                f"found {d.dtype} with {d.ndim}"
            )
            continue
        if name != "bits":
            lengths[name] = d.shape[0]
    if problems:
        return problems
    if len(set(lengths.values())) > 1:
        problems.append(f"{where}: record datasets differ in length {lengths} "
                        f"(an interrupted append)")
    rank = int(g["shape"].shape[1])
    try:
        axes = _h5.json_attr(g, "axes", path, where, [])
        if isinstance(axes, list) and len(axes) != rank:
            problems.append(f"{where}/shape: expected rank {len(axes)} (axes), found {rank}")
            return problems
    except RunFileError:
        pass  # the attribute check above named it
    # The reader's own row checks: what it would leave out is a problem here.
    _, _, damage, overlap = _h5.read_site_index(g, path, where, rank, complete)
    if damage:
        problems.append(f"{where}: {damage}")
    if overlap is not None:
        problems.append(f"{where}/offset: records overlap in bits (record {overlap})")
    steps.append((where, g["step"]))
    return problems
