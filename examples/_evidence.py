"""Turning recorded masks into verdicts, a table and pictures (shared by the examples).

A claim is checked against the analysis of a run file (``dropspy.analysis.analyze_run``),
never against what the script expects: the helpers here return ``holds``, ``does not hold`` or
``inconclusive`` from the axis verdicts, gate comparisons and findings that the analysis
computed from the masks the framework really applied. Only numpy, h5py, dropspy and (for the
pictures) matplotlib are used, so the same code serves the Keras and the PyTorch example.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dropspy.analysis import RunAnalysis, SiteAnalysis
from dropspy.expectations import Expectation, check_site

__all__ = [
    "HOLDS", "FAILS", "UNSURE", "Verdict", "parse_args", "sites_of", "axes_verdict",
    "gate_masks_verdict", "over_time_verdict", "describe_axes", "print_table", "write_verdicts",
    "mask_panels", "draw_overview",
]

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Verdict:
    """One claim judged on one run file.

    Attributes:
        claim: Claim number as the question lists it ("1", "2a", "3'").
        text: The claim, in words.
        run: Run file name (inside the output folder).
        sites: Sites whose masks are the evidence.
        verdict: ``holds``, ``does not hold`` or ``inconclusive``.
        evidence: What the recorded masks show, in words.
    """

    claim: str
    text: str
    run: str
    sites: tuple[str, ...]
    verdict: str
    evidence: str


def parse_args(description: str, name: str,
               backends: tuple[str, ...] = ()) -> argparse.Namespace:
    """``--out DIR`` (default ``<repo>/out/<name>``, gitignored) and ``--small``.

    ``DROPSPY_EXAMPLES_SMALL=1`` in the environment also selects the small sizes (tests use it).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=REPO / "out" / name,
                        help="folder for the run files, verdicts.json and the PNG pictures")
    parser.add_argument("--small", action="store_true",
                        default=os.environ.get("DROPSPY_EXAMPLES_SMALL", "") not in ("", "0"),
                        help="fewer training steps (for tests); the verdicts stay the same")
    parser.add_argument("--no-pictures", action="store_true", help="skip the PNG pictures")
    if backends:   # read once more before Keras is imported (see the script)
        parser.add_argument("--backend", choices=backends, default=backends[0],
                            help="Keras 3 backend (sets KERAS_BACKEND)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_pictures and importlib.util.find_spec("matplotlib") is None:
        print("(no pictures: matplotlib is not installed; pip install 'dropspy[plot]')")
        args.no_pictures = True
    return args


def sites_of(analysis: RunAnalysis, layer: str, role: str | None = None) -> list[SiteAnalysis]:
    """The analysed sites of one layer (by its name or the last part of its path), by role."""
    return [s for s in analysis.sites
            if layer in (s.layer, s.layer.split("/")[-1], s.layer.split(".")[-1])
            and (role is None or s.role == role)]


def describe_axes(site: SiteAnalysis) -> str:
    """``'shared on time; varies on batch, feature'`` from the axis verdicts."""
    parts = []
    for word, names in (("shared on", site.shared_axes), ("varies on", site.independent_axes),
                        ("undecided on", site.inconclusive_axes)):
        if names:
            parts.append(f"{word} {', '.join(names)}")
    return "; ".join(parts) or "no masks recorded"


def _no_masks(site: SiteAnalysis | None) -> str | None:
    """Why a site offers no evidence (missing, opaque, never applied), or None."""
    if site is None:
        return "no such site was recorded"
    if site.opaque:
        return f"masks cannot be observed: {site.opaque}"
    if site.applied_records == 0:
        return f"no mask applied in {site.records} recorded call(s)"
    return None


def axes_verdict(claim: str, text: str, run: str, analysis: RunAnalysis, layer: str,
                 shared: Sequence[str], role: str | None = "output") -> Verdict:
    """Does the mask of ``layer`` share exactly the axes ``shared`` (and drop on every other)?

    The rule is ``dropspy.expectations.check_site`` with ``shared=...``, the same rule as
    ``dropspy check`` and ``dropspy.testing.assert_mask_structure``: an axis the data cannot
    decide makes the verdict ``inconclusive``, never ``holds``.
    """
    found = sites_of(analysis, layer, role)
    site = found[0] if found else None
    why = _no_masks(site)
    if why is not None or site is None:
        return Verdict(claim, text, run, (layer,), UNSURE, why or "")
    problems = check_site(Expectation(site=site.site, shared=tuple(shared)), site)
    evidence = f"{site.site}: {describe_axes(site)}"
    if not problems:
        verdict = HOLDS
    elif any(a.verdict == "inconclusive" and a.size > 1 for a in site.axes):
        verdict = UNSURE
    else:
        verdict = FAILS
    return Verdict(claim, text, run, (site.site,), verdict, evidence)


def _distinct_per_call(run: Any, names: Sequence[str]) -> tuple[int, int]:
    """(fewest distinct masks among ``names`` at one step/call, records compared)."""
    sites = [run[n] for n in names]
    keys = [{(int(s), int(c)): i for i, (s, c, a) in
             enumerate(zip(site.steps, site.calls, site.applied)) if a} for site in sites]
    common = set(keys[0]).intersection(*keys[1:]) if keys else set()
    fewest = len(names)
    for key in sorted(common):
        masks = [site.noise(k[key]) for site, k in zip(sites, keys)]
        distinct = len({(m.shape, np.packbits(m).tobytes()) for m in masks})
        fewest = min(fewest, distinct)
    return fewest, len(common)


def gate_masks_verdict(claim: str, text: str, run_name: str, run: Any, analysis: RunAnalysis,
                       layer: str, role: str, want: int, steps: int | None = None) -> Verdict:
    """Does the layer draw ``want`` different masks for ``role`` (one per gate) at every call?

    Evidence: how many sites of that role the layer has (one site per mask drawn), how many
    of them differ at each recorded step and call (compared element for element), the gate
    comparison of the analysis, and, with ``steps``, that the masks cover every timestep.
    """
    found = [s for s in sites_of(analysis, layer, role) if s.applied_records]
    if not found:
        reasons = [_no_masks(s) for s in sites_of(analysis, layer, role)]
        return Verdict(claim, text, run_name, (), UNSURE if any(reasons) else FAILS,
                       "; ".join(r for r in reasons if r) or f"no {role} mask was drawn")
    names = tuple(s.site for s in found)
    gates = found[0].gates
    if len(found) == 1:
        how = f", {gates.source}" if gates is not None else ""
        return Verdict(claim, text, run_name, names, HOLDS if want == 1 else FAILS,
                       f"1 {role} mask per call ({names[0]}){how}")
    fewest, compared = _distinct_per_call(run, names)
    gate_names = ",".join(str(s.gate) for s in found)
    evidence = f"{len(found)} {role} masks per call (gates {gate_names}), " + (
        f"all different in each of {compared} calls" if fewest == len(found) else
        f"only {fewest} different in some of {compared} calls")
    verdict = HOLDS if fewest == want == len(found) else FAILS
    if compared == 0:
        verdict = UNSURE
    if steps is not None:
        lengths = {s.axis("time").size for s in found if "time" in s.axis_names}
        if lengths != {steps}:
            verdict = FAILS if verdict == HOLDS else verdict
            evidence += f"; time axis sizes {sorted(lengths) or 'absent'}, expected {steps}"
        else:
            evidence += f", applied at all {steps} time steps"
    return Verdict(claim, text, run_name, names, verdict, evidence)


def over_time_verdict(claim: str, text: str, run: str, analysis: RunAnalysis, layer: str,
                      role: str, want: str) -> Verdict:
    """Is the mask of ``layer``/``role`` ``constant`` over timesteps or ``resampled``?"""
    found = [s for s in sites_of(analysis, layer, role) if s.applied_records]
    if not found:
        return Verdict(claim, text, run, (), UNSURE, f"no {role} mask was recorded")
    words = sorted({s.over_time.verdict if s.over_time else "n/a" for s in found})
    first = found[0]
    reason = first.axis("time").reason if "time" in first.axis_names else ""
    if words == [want]:
        verdict = HOLDS
    elif "inconclusive" in words or "n/a" in words:
        verdict = UNSURE
    else:
        verdict = FAILS
    said = {"constant": "the same mask at every time step",
            "resampled": "a new mask at each time step"}
    evidence = "; ".join(said.get(w, f"{w} over time") for w in words) + (
        f": {reason}" if reason else "")
    return Verdict(claim, text, run, tuple(s.site for s in found), verdict, evidence)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines or [""]


def print_table(verdicts: Iterable[Verdict], width: int = 80, claim_width: int = 28) -> str:
    """Print (and return) the verdicts as a plain-text table: claim, verdict, evidence.

    80 columns, the width of a default terminal; cells wrap at spaces, never inside a word.
    """
    rows = list(verdicts)
    c = claim_width
    out = [f"{'#':<4} {'claim':<{c}} {'verdict':<14} what the masks show (file: site)"]
    out.append("-" * width)
    for v in rows:
        left = _wrap(v.text, c)
        right = _wrap(f"{v.run}: {v.evidence}", width - c - 20)
        for i in range(max(len(left), len(right))):
            out.append(f"{v.claim if i == 0 else '':<4} {left[i] if i < len(left) else '':<{c}} "
                       f"{v.verdict if i == 0 else '':<14} {right[i] if i < len(right) else ''}"
                       .rstrip())
    text = "\n".join(out)
    print(text, flush=True)
    return text


def write_verdicts(out: Path, verdicts: Sequence[Verdict], header: dict[str, Any]) -> Path:
    """``verdicts.json``: the header facts (versions, sizes) and every verdict."""
    path = out / "verdicts.json"
    path.write_text(json.dumps({**header, "verdicts": [asdict(v) for v in verdicts]}, indent=2))
    return path


def mask_panels(axes: Sequence[str], mask: np.ndarray, samples: int = 4,
                ) -> list[tuple[str, np.ndarray, str, str]]:
    """2-D pictures of an applied mask: (title, image, x-axis name, y-axis name).

    A sequence mask gives one panel per sample, feature (or channel) down, time across; a
    ``(batch, feature)`` mask gives one panel with the samples across.
    """
    axes = list(axes)
    feat = next((a for a in ("feature", "channel") if a in axes), axes[-1])
    if "time" in axes and "batch" in axes:
        panels = []
        for b in range(min(samples, mask.shape[axes.index("batch")])):
            one = np.take(mask, b, axis=axes.index("batch"))
            rest = [a for a in axes if a != "batch"]
            img = np.moveaxis(one, [rest.index(feat), rest.index("time")], [0, 1])
            panels.append((f"sample {b}", img.reshape(img.shape[0], img.shape[1]), "time", feat))
        return panels
    if "batch" in axes and mask.ndim == 2:
        img = mask if axes.index(feat) == 0 else mask.T
        return [("all samples", img[:, :32], "sample", feat)]
    return [("mask", np.atleast_2d(mask.reshape(mask.shape[0], -1)), axes[-1], axes[0])]


def draw_overview(rows: Sequence[tuple[str, list[tuple[str, np.ndarray, str, str]]]],
                  path: Path, title: str) -> Path:
    """One PNG: a row per configuration, white = kept, black = dropped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(len(panels) for _, panels in rows)
    fig = Figure(figsize=(2.3 * ncols + 1.6, 1.25 * len(rows) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), ncols)
    for r, (label, panels) in enumerate(rows):
        for c in range(ncols):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.set_axis_off()
                if not panels and c == 0:
                    ax.text(0.5, 0.5, "no mask applied", ha="center", va="center", fontsize=9)
                    ax.set_title("", fontsize=8)
                continue
            name, img, xlabel, ylabel = panels[c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            ax.set_title(name, fontsize=8)
            ax.set_xlabel(xlabel, fontsize=7, labelpad=1)
            if c == 0:
                ax.set_ylabel(ylabel, fontsize=7, labelpad=1)
        fig.axes[r * ncols].annotate(label, xy=(-0.25, 0.5), xycoords="axes fraction",
                                     ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as img:  # black, white and text: 16 grays keep it small
        small = img.convert("L").quantize(16)
    small.save(path, optimize=True)
    return path
