"""Pictures of recorded masks (needs matplotlib: ``pip install 'dropspy[plot]'``).

matplotlib is imported when a plot is drawn, never at ``import dropspy``, and through its
object API with the Agg canvas, so the user's pyplot backend and global state are untouched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dropspy._text import safe
from dropspy.errors import RecordNotFoundError

__all__ = ["plot_site", "site_figure", "mask_image", "find_record", "png_path", "CAPTION"]

_MAX_CELLS = 512  # longest axis drawn in a panel; longer axes are cut (and the title says so)


def find_record(site: Any, step: int | None = None, call: int | None = None) -> int:
    """Index of the record to show: at ``step``/``call``, or the first applied training one.

    ``call`` defaults to 0 with a ``step``; without one it picks the first record of that call.

    Raises:
        ValueError: No record with a mask at that step and call.
    """
    applied = np.asarray(site.applied, dtype=bool)
    steps = np.asarray(site.steps)
    calls = np.asarray(site.calls)
    if step is None:
        if call is not None:
            applied = applied & (calls == call)
        pick = np.flatnonzero(applied & np.asarray(site.training, dtype=bool))
        if not len(pick):
            pick = np.flatnonzero(applied)
        if not len(pick):
            which = "" if call is None else f" at call {call}"
            raise RecordNotFoundError(
                f"site {site.name!r} has no record with a mask{which} ({len(site)} records)")
        return int(pick[0])
    call = 0 if call is None else call
    pick = np.flatnonzero(applied & (steps == step) & (calls == call))
    if not len(pick):
        have = np.unique(steps[applied])
        span = f"{have[0]}..{have[-1]}" if len(have) else "none"
        raise RecordNotFoundError(
            f"site {site.name!r} has no mask at step {step} call {call} (steps with masks: {span})")
    return int(pick[0])


CAPTION = "white = kept, black = dropped"

# Axes drawn down a panel, in order of preference; time (or else the batch) goes across, as in
# the README's reading guide: horizontal stripes = the same features at every time step.
_DOWN = ("feature", "channel", "gate", "depth", "height")


def mask_image(mask: np.ndarray, axes: tuple[str, ...],
               sample: int | None = None) -> tuple[np.ndarray, str, str, str]:
    """A 2-D picture of one sample's applied mask: (image, row axis, column axis, note).

    Time (else the batch) runs across and the feature (or channel) axis down whenever the
    mask has them, so a
    mask shared over time shows horizontal stripes in every picture dropspy draws. Axes
    beyond the two drawn are fixed at index 0 (named in ``note``).

    Args:
        mask: The applied mask.
        axes: Its axis names.
        sample: Batch index to draw (the first axis is the batch), or None for the whole mask.
    """
    names = list(axes)
    if sample is not None:
        mask = mask[sample]
        names = names[1:]
    if mask.ndim == 1:
        return mask[:, None], names[0], "", ""
    first: str | None = next((a for a in ("time", "batch") if a in names), None)
    down = next(a for a in (*_DOWN, *names) if a in names and a != first)
    # No time and no batch: the last other axis goes across (a channel-dropout mask on
    # (channel, height, width) draws channel by width: the same stripes as over time).
    across = first if first is not None else next(a for a in reversed(names) if a != down)
    img = np.moveaxis(mask, [names.index(down), names.index(across)], [0, 1])
    rest = [a for a in names if a not in (down, across)]
    note = f" ({', '.join(f'{a}=0' for a in rest)})" if rest else ""
    img = img[(slice(None), slice(None)) + (0,) * len(rest)]
    return img, down, across, note


def _label(value: Any) -> str:
    """File text as a matplotlib label: control characters escaped, ``$`` not mathtext.

    A raw ESC in a site name reached the terminal through matplotlib's missing-glyph warning,
    and ``$...$`` in a name would be parsed as math (a parse error is an exception at draw).
    """
    return safe(value).replace("$", r"\$")


def _applied(site: Any, i: int) -> np.ndarray:
    """Record ``i``'s applied mask as a read-only broadcast view of its noise (no copy).

    A file may declare an applied shape of 2^20 x 2^20 over a (1, 1) noise: a copy asked
    for a terabyte; the picture only ever looks at 512 x 512 cells of it.
    """
    noise = site.noise(i)
    shape = tuple(int(x) for x in np.asarray(site.shapes)[i])
    return np.broadcast_to(noise, shape)


def _keep_along(noise: np.ndarray, length: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, kept fraction) along axis ``k`` of the applied mask, computed on the noise."""
    others = tuple(j for j in range(noise.ndim) if j != k)
    keep = noise.mean(axis=others) if noise.size else np.zeros(noise.shape[k])
    if keep.size == 1 and length != 1:  # a broadcast axis: one value along all of it
        return np.array([0, length - 1]), np.repeat(keep, 2)
    return np.arange(keep.size), keep


def _siblings(run: Any, main: Any, site: str, step: int, call: int) -> list[tuple[Any, np.ndarray]]:
    """(gate, mask) of the site and of its sibling gates (same layer and role), in gate order."""
    i = find_record(main, step, call)
    columns = [(main.gate, _applied(main, i))]
    if main.gate:
        for name in run.sites:
            other = run[name]
            if (name != site and other.gate and other.layer == main.layer
                    and other.role == main.role and not other.opaque):
                try:
                    j = find_record(other, step, call)
                except ValueError:
                    continue
                columns.append((other.gate, _applied(other, j)))
        order = "ifcozrh"
        columns.sort(key=lambda c: order.index(c[0]) if c[0] in order else len(order))
    return columns


def site_figure(run: Any, site: str, *, step: int | None = None, call: int | None = None,
                samples: int = 4) -> Any:
    """The matplotlib ``Figure`` that :func:`plot_site` saves (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    main = run[site]
    i = find_record(main, step, call)
    rec_step, rec_call = int(np.asarray(main.steps)[i]), int(np.asarray(main.calls)[i])
    columns = _siblings(run, main, site, rec_step, rec_call)
    axes = tuple(_label(a) for a in main.axes)
    mask0 = columns[0][1]
    batched = bool(axes) and axes[0] == "batch" and mask0.ndim >= 3
    rows = min(samples, mask0.shape[0]) if batched else 1
    ncols = len(columns)
    # One gate: samples side by side in one row; several gates: a row per sample.
    if ncols == 1:
        grid_rows, grid_cols = 2, max(rows, mask0.ndim)
    else:
        grid_rows, grid_cols = rows + 1, max(ncols, mask0.ndim)
    fig = Figure(figsize=(3.2 * grid_cols, 2.6 * grid_rows + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(grid_rows, grid_cols)
    down = across = ""
    for c, (gate, mask) in enumerate(columns):
        for r in range(rows):
            img, down, across, note = mask_image(mask, axes, r if batched else None)
            cut = img[:_MAX_CELLS, :_MAX_CELLS]
            ax = fig.add_subplot(grid[0, r] if ncols == 1 else grid[r, c])
            ax.imshow(cut, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            title = f"gate {_label(gate)}, " if ncols > 1 else ""
            title += f"sample {r}" if batched else (
                "all samples" if across == "batch" else "mask")
            if cut.shape != img.shape:
                title += f" (first {cut.shape[0]}x{cut.shape[1]})"
            ax.set_title(title + note, fontsize=9)
            ax.set_xlabel({"batch": "sample \u2192"}.get(across, f"{across} \u2192")
                          if across else "")
            ax.set_ylabel(f"{down} \u2193" if down else "")
    rate = main.rate
    gate_note = f" (gate {_label(main.gate)})" if ncols > 1 else ""
    for k, name in enumerate(axes):
        ax = fig.add_subplot(grid[grid_rows - 1, k])
        x, keep = _keep_along(main.noise(i), mask0.shape[k], k)
        ax.plot(x, keep, marker="." if keep.size <= 64 else None, lw=1)
        reference = ""
        if rate is not None:
            # Said in the title, not a legend box, which hid data points near the bottom.
            ax.axhline(1 - rate, color="tab:red", ls="--", lw=1)
            reference = f"\nred dashes: configured keep rate {1 - rate:g}"
        ax.set_ylim(-0.05, 1.05)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.set_xlabel(f"{name} index")
        ax.set_ylabel("kept fraction")
        ax.set_title(f"keep rate along {name}{gate_note}{reference}", fontsize=9)
    if ncols > 1:
        gates = ", ".join(_label(g) for g, _ in columns)
        name = f"{_label(main.layer)}/{_label(main.role)}: gates {gates}"
    else:
        name = _label(site)
    rate_words = "?" if rate is None else f"{rate:g}"
    shown = "samples" if across == "batch" else across
    layout = f"; {down} down, {shown} across" if down and across else ""
    fig.suptitle(f"{name} ({_label(main.layer_class)}), step {rec_step} call {rec_call}, "
                 f"configured rate {rate_words}, applied shape {tuple(mask0.shape)}\n"
                 f"{CAPTION}{layout}", fontsize=10)
    return fig


def plot_site(run: Any, site: str, output: str | os.PathLike[str], *, step: int | None = None,
              call: int | None = None, samples: int = 4) -> Path:
    """Draw one record's applied mask and the keep rate along each axis into a PNG.

    Top: the applied mask (white = kept, black = dropped) for the first ``samples`` samples,
    time across and features down (:func:`mask_image`), one column per gate when the site has
    sibling gates (same layer and role), so stripes show sharing at a glance. Bottom: the
    fraction kept at each index of each axis, with a dashed line at the configured keep rate.

    Args:
        run: A :class:`dropspy.store.Run` (or :class:`dropspy.analysis.MemoryRun`).
        site: Site name.
        output: PNG path to write (``.png``; a path without a suffix gets it).
        step: Step to show (default: the first record with a mask).
        call: Call within the step (default 0; without ``step``, the first record of it).
        samples: How many samples (batch indices) to draw.

    Returns:
        The path written.

    Raises:
        KeyError: No such site.
        ValueError: No record with a mask at that step and call.
    """
    out = png_path(output)
    fig = site_figure(run, site, step=step, call=call, samples=samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out


def png_path(output: str | os.PathLike[str]) -> Path:
    """The PNG path a plot is written to: ``output``, with ``.png`` added when it has no suffix.

    Raises:
        ValueError: ``output`` is a directory or names another format.
    """
    out = Path(output)
    if out.is_dir():
        raise ValueError(f"-o {out}: is a directory; give a file name, e.g. {out / 'mask.png'}")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    elif out.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: expected a .png file name, received a {out.suffix} one")
    return out
