"""Check a run file against ``schemas/run.schema.json`` with numpy and h5py alone.

A small validator for the subset of JSON Schema the run schema uses (type, const, enum,
minimum, maximum, minLength, minItems, required, properties, items, additionalProperties,
contentMediaType/contentSchema), so ``dropspy validate`` needs no extra dependency.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import h5py
import numpy as np

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
}


def run_schema() -> dict[str, Any]:
    """The run file schema, as shipped in the package."""
    text = resources.files("dropspy").joinpath("schemas/run.schema.json").read_text("utf-8")
    return json.loads(text)


def check(value: Any, schema: dict[str, Any], where: str) -> list[str]:
    """Problems of ``value`` against ``schema`` (the subset above), each naming ``where``."""
    out: list[str] = []
    if "const" in schema and value != schema["const"]:
        return [f"{where}: expected {schema['const']!r}, found {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: expected one of {schema['enum']!r}, found {value!r}"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{where}: expected {' or '.join(types)}, "
                    f"found {type(value).__name__} {value!r}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: expected >= {schema['minimum']}, found {value!r}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: expected <= {schema['maximum']}, found {value!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append(f"{where}: expected at least {schema['minLength']} characters, "
                       f"found {value!r}")
        if schema.get("contentMediaType") == "application/json":
            try:
                decoded = json.loads(value)
            except ValueError:
                return out + [f"{where}: expected JSON text, found {value!r}"]
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


def _plain(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        out[key] = value
    return out


def check_run_layout(f: h5py.File) -> list[str]:
    """Every problem of an open run file: attributes, datasets, and record consistency."""
    schema = run_schema()["properties"]
    problems = check(_plain(f.attrs), schema["root_attributes"], "/")
    status = f.get("status")
    if not isinstance(status, h5py.Dataset) or status.shape != (1,) or status.dtype.kind != "S":
        problems.append("/status: expected a (1,) fixed-length bytes dataset")
    else:
        text = bytes(status[0]).rstrip(b"\0").decode("utf-8", "replace")
        problems += check(text, {"contentMediaType": "application/json",
                                 "contentSchema": schema["status"]}, "/status")
    sites = f.get("sites")
    if not isinstance(sites, h5py.Group):
        return problems + ["/sites: missing group"]
    names: set[str] = set()
    for key in sites:
        g = sites[key]
        where = f"/sites/{key}"
        if not isinstance(g, h5py.Group):
            problems.append(f"{where}: expected a group")
            continue
        attrs = _plain(g.attrs)
        problems += check(attrs, schema["site_attributes"], where)
        name = attrs.get("name")
        if name in names:
            problems.append(f"{where}: site name {name!r} declared twice")
        names.add(name)
        problems += _check_site_data(g, where, schema["site_datasets"]["properties"], attrs)
    return problems


def _check_site_data(g: h5py.Group, where: str, spec: dict[str, Any],
                     attrs: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    lengths = {}
    for name, rule in spec.items():
        d = g.get(name)
        if not isinstance(d, h5py.Dataset):
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
                        "(an interrupted append)")
    try:
        rank = len(json.loads(attrs.get("axes", "[]")))
    except ValueError:
        rank = None
    n = min(lengths.values()) if lengths else 0
    shape, nshape = g["shape"][:n], g["noise_shape"][:n]
    if rank is not None and n and shape.shape[1] != rank:
        problems.append(f"{where}/shape: expected rank {rank} (axes), found {shape.shape[1]}")
        return problems
    applied = g["applied"][:n] != 0
    bad = applied & np.any((nshape != 1) & (nshape != shape), axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        problems.append(
            f"{where}: record {i} noise shape {tuple(nshape[i])} does not broadcast to "
            f"applied shape {tuple(shape[i])}"
        )
    sizes = np.where(applied, (np.prod(nshape, axis=1) + 7) // 8, 0)
    ends = g["offset"][:n] + sizes
    if n and int(ends.max()) > g["bits"].shape[0]:
        problems.append(
            f"{where}/bits: records point past the end of the packed data "
            f"({int(ends.max())} > {g['bits'].shape[0]} bytes)"
        )
    offsets = g["offset"][:n]
    if n > 1 and np.any(offsets[1:] < offsets[:-1] + sizes[:-1]):
        problems.append(f"{where}/offset: records overlap in bits")
    labels = [dim.label for dim in g["step"].dims]
    if labels and labels[0] != "record":
        problems.append(f"{where}/step: dimension 0 labelled {labels[0]!r}, expected 'record'")
    return problems
