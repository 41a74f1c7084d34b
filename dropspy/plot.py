"""Pictures of recorded masks (needs matplotlib: ``pip install 'dropspy[plot]'``).

matplotlib is imported when a plot is drawn, never at ``import dropspy``, and through its
object API with the Agg canvas, so the user's pyplot backend and global state are untouched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dropspy.errors import RecordNotFoundError

__all__ = ["plot_site", "find_record"]

_MAX_CELLS = 512  # longest axis drawn in a panel; longer axes are cut (and the title says so)


def find_record(site: Any, step: int | None = None, call: int = 0) -> int:
    """Index of the record to show: at ``step``/``call``, or the first applied training one.

    Raises:
        ValueError: No record with a mask at that step and call.
    """
    applied = np.asarray(site.applied, dtype=bool)
    steps = np.asarray(site.steps)
    calls = np.asarray(site.calls)
    if step is None:
        pick = np.flatnonzero(applied & np.asarray(site.training, dtype=bool))
        if not len(pick):
            pick = np.flatnonzero(applied)
        if not len(pick):
            raise RecordNotFoundError(
                f"site {site.name!r} has no record with a mask ({len(site)} records)")
        return int(pick[0])
    pick = np.flatnonzero(applied & (steps == step) & (calls == call))
    if not len(pick):
        have = np.unique(steps[applied])
        span = f"{have[0]}..{have[-1]}" if len(have) else "none"
        raise RecordNotFoundError(
            f"site {site.name!r} has no mask at step {step} call {call} (steps with masks: {span})")
    return int(pick[0])


def _panel(mask: np.ndarray, axes: tuple[str, ...],
           sample: int | None) -> tuple[np.ndarray, str, str, str]:
    """A 2-D slice of one sample's mask: (image, row axis, column axis, note)."""
    note = ""
    if sample is not None:
        mask = mask[sample]
        axes = axes[1:]
    if mask.ndim == 1:
        return mask[None, :], "", axes[0], note
    if mask.ndim > 2:
        fixed = ", ".join(f"{a}=0" for a in axes[1:-1])
        note = f" ({fixed})"
        mask = mask[(slice(None),) + (0,) * (mask.ndim - 2) + (slice(None),)]
        axes = (axes[0], axes[-1])
    return mask, axes[0], axes[1], note


def plot_site(run: Any, site: str, output: str | os.PathLike[str], *, step: int | None = None,
              call: int = 0, samples: int = 4) -> Path:
    """Draw one record's applied mask and the keep rate along each axis into a PNG.

    Top: the applied mask (white kept, black dropped) for the first ``samples`` samples,
    one column per gate when the site has sibling gates (same layer and role), so stripes show
    sharing at a glance. Bottom: the fraction kept at each index of each axis.

    Args:
        run: A :class:`dropspy.store.Run` (or :class:`dropspy.analysis.MemoryRun`).
        site: Site name.
        output: PNG path to write.
        step: Step to show (default: the first record with a mask).
        call: Call within the step.
        samples: How many samples (batch indices) to draw.

    Returns:
        The path written.

    Raises:
        KeyError: No such site.
        ValueError: No record with a mask at that step and call.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    main = run[site]
    i = find_record(main, step, call)
    rec_step, rec_call = int(np.asarray(main.steps)[i]), int(np.asarray(main.calls)[i])
    columns = [(main.gate, main.mask(i))]
    if main.gate:
        for name in run.sites:
            other = run[name]
            if (name != site and other.gate and other.layer == main.layer
                    and other.role == main.role and not other.opaque):
                try:
                    j = find_record(other, rec_step, rec_call)
                except ValueError:
                    continue
                columns.append((other.gate, other.mask(j)))
        order = "ifcozrh"
        columns.sort(key=lambda c: order.index(c[0]) if c[0] in order else len(order))
    axes = tuple(main.axes)
    mask0 = columns[0][1]
    batched = bool(axes) and axes[0] == "batch" and mask0.ndim >= 3
    rows = min(samples, mask0.shape[0]) if batched else 1
    ncols = len(columns)
    # One gate: samples side by side in one row; several gates: a row per sample.
    grid_rows, grid_cols = ((2, max(rows, mask0.ndim)) if ncols == 1
                            else (rows + 1, max(ncols, mask0.ndim)))
    fig = Figure(figsize=(3.2 * grid_cols, 2.6 * grid_rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(grid_rows, grid_cols)
    for c, (gate, mask) in enumerate(columns):
        for r in range(rows):
            img, ylab, xlab, note = _panel(mask, axes, r if batched else None)
            cut = img[:_MAX_CELLS, :_MAX_CELLS]
            ax = fig.add_subplot(grid[0, r] if ncols == 1 else grid[r, c])
            ax.imshow(cut, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            title = f"gate {gate}, " if gate else ""
            title += f"sample {r}" if batched else "mask"
            if cut.shape != img.shape:
                title += f" (first {cut.shape[0]}x{cut.shape[1]})"
            ax.set_title(title + note, fontsize=9)
            ax.set_xlabel(xlab)
            ax.set_ylabel(ylab)
    for k, name in enumerate(axes):
        ax = fig.add_subplot(grid[grid_rows - 1, k])
        keep = mask0.mean(axis=tuple(j for j in range(mask0.ndim) if j != k))
        ax.plot(np.arange(keep.size), keep, marker="." if keep.size <= 64 else None, lw=1)
        ax.set_ylim(-0.05, 1.05)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.set_xlabel(f"{name} index")
        ax.set_ylabel("kept fraction")
        ax.set_title(f"keep rate along {name}", fontsize=9)
    rate = "?" if main.rate is None else f"{main.rate:g}"
    fig.suptitle(f"{site} ({main.layer_class}), step {rec_step} call {rec_call}, "
                 f"configured rate {rate}, applied shape {tuple(mask0.shape)}", fontsize=10)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
