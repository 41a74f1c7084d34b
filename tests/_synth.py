"""Synthetic run files with planted mask structure, for the analysis, CLI and testing tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from dropspy.records import Record, SiteInfo
from dropspy.writer import RunWriter

AXES3 = ("batch", "time", "feature")


def info(name: str, axes: Sequence[str] = AXES3, rate: float | None = 0.3, *,
         layer: str | None = None, layer_class: str = "Dropout", role: str = "output",
         gate: str | None = None, **kw) -> SiteInfo:
    return SiteInfo(name=name, layer=layer or name, layer_class=layer_class, role=role,
                    axes=tuple(axes), rate=rate, gate=gate, **kw)


def noise(rng: np.random.Generator, shape: Sequence[int], rate: float) -> np.ndarray:
    """Independent Bernoulli keep-noise: True with probability 1 - rate."""
    return rng.random(tuple(shape)) >= rate


def records(name: str, shape: Sequence[int], noise_shape: Sequence[int], rate: float, *,
            steps: int = 4, seed: int = 0, training: bool = True,
            make: Callable[[np.random.Generator, int], np.ndarray] | None = None) -> list[Record]:
    """One record per step with fresh noise of ``noise_shape`` broadcast to ``shape``."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        x = make(rng, s) if make is not None else noise(rng, noise_shape, rate)
        out.append(Record(name, step=s, call=0, training=training, shape=tuple(shape), noise=x))
    return out


def write_run(path: Path, sites: Iterable[tuple[SiteInfo, Sequence[Record]]], *,
              dropped: dict[str, int] | None = None, notes: Sequence[str] = (),
              meta: dict[str, str] | None = None) -> Path:
    """Write a run file: declare each site, submit its records step by step, close.

    ``meta`` adds root attributes (``framework``, ``framework_version``...).
    """
    sites = list(sites)
    with RunWriter(path, {"framework": "synthetic", **(meta or {})}) as w:
        for site_info, _ in sites:
            w.declare_site(site_info)
        by_step: dict[int, list[Record]] = {}
        for _, recs in sites:
            for r in recs:
                by_step.setdefault(r.step, []).append(r)
        for step in sorted(by_step):
            w.submit(by_step[step])
        for cause, n in (dropped or {}).items():
            w.count_dropped(cause, n)
        for n in notes:
            w.note(n)
    return path


KERAS2_CUDNN_LSTM_INPUT = {"masks_per_call": 1, "masks_drawn_per_call": 4,
                           "masks_applied_per_call": 1, "gates_share_mask": True,
                           "tf_keras_path": "cudnn-eligible", "time_axis_by_construction": True}
KERAS3_LSTM_INPUT = {"masks_per_call": 1, "masks_drawn_per_call": 1, "masks_applied_per_call": 1,
                     "gates_share_mask": True, "time_axis_by_construction": True}


def lstm_input_run(path: Path, extra: dict, meta: dict[str, str], *,
                   noise_shape: Sequence[int | None] | None = None,
                   scale: float | None = 1 / 0.7) -> Path:
    """An ``lstm/input`` site with planted adapter facts; the masks depend on nothing else,
    so two such runs differ only in the facts."""
    site = info("lstm/input", rate=0.3, layer="lstm", layer_class="LSTM", role="input",
                noise_shape=noise_shape, scale=scale, extra=extra)
    return write_run(path, [(site, records("lstm/input", (8, 5, 6), (8, 1, 6), 0.3))], meta=meta)


def rank_files(tmp: Path, seeds: Sequence[int], *, world_size: int | None = None,
               run_id: str | None = "run-1", steps: int = 6, stem: str = "run",
               ranks: Sequence[int] | None = None, extra_site: int | None = None) -> list[Path]:
    """One run file per rank, as the DDP recorder writes them (``run.rank{R}.h5``).

    Rank ``k`` draws its masks from ``seeds[k]``: equal seeds plant identical masks across
    those ranks, different seeds independent ones. Two sites: an elementwise ``drop`` and a
    time-shared ``spatial``. ``extra_site``: that rank also has a site ``only_here``.
    """
    ranks = list(range(len(seeds))) if ranks is None else list(ranks)
    world = len(seeds) if world_size is None else world_size
    out = []
    for r, seed in zip(ranks, seeds):
        sites = [
            (info("drop"), records("drop", (8, 6, 16), (8, 6, 16), 0.3, steps=steps, seed=seed)),
            (info("spatial"), records("spatial", (8, 6, 16), (8, 1, 16), 0.3, steps=steps,
                                      seed=seed + 1000)),
        ]
        if extra_site == r:
            sites.append((info("only_here", ("batch", "feature")),
                          records("only_here", (4, 8), (4, 8), 0.3, steps=steps,
                                  seed=seed + 7)))
        meta = {"rank": r, "world_size": world, "local_rank": r, "backend": "gloo"}
        if run_id is not None:
            meta["run_id"] = run_id
        path = tmp / f"{stem}.rank{r}.h5"
        write_run(path, sites, meta=meta)
        out.append(path)
    return out
