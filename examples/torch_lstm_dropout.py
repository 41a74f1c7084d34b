"""Dropout around an nn.LSTM in PyTorch: what each common recipe really drops, from recorded masks.

The PyTorch counterparts of ``dropout_around_lstm.py``. Each configuration is a small model
trained for a few optimizer steps on generated data while dropspy records every mask:

T1. ``nn.Dropout`` before ``nn.LSTM``: no privileged axis.
T2. ``nn.Dropout`` after ``nn.LSTM`` (on the last hidden state): per sample and feature.
T3. ``nn.Dropout1d`` on ``(batch, channels, time)`` drops whole channels for all time steps,
    differently per sample.
T4. AWD-LSTM "locked" dropout (a hand-made Bernoulli mask of shape (batch, 1, features)): one
    mask per sequence, the same at every time step.
T5. ``nn.LSTM(num_layers=2, dropout=0.3)`` drops the first layer's outputs before the second
    layer. (T5': with one mask for the whole sequence, as locked dropout does.)
T6. ``nn.LSTM(num_layers=1, dropout=0.5)`` drops something.
T7. ``model.eval()`` turns dropout off: for an ``nn.Dropout`` module (T7a) and for a
    functional ``F.dropout(x, p, training=True)`` that ignores ``self.training`` (T7b).

No verdict is written in this file: each comes from ``dropspy.analysis.analyze_run`` on the
run file just recorded, so on another torch version the script prints that version's truth.

Run:
    python examples/torch_lstm_dropout.py [--out DIR] [--small]

It writes one run file per configuration, ``verdicts.json`` and an overview PNG into ``--out``
(default ``out/torch_lstm_dropout``).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable

STARTED = time.perf_counter()

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dropspy
from dropspy.analysis import analyze_run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _evidence import (
    FAILS,
    HOLDS,
    UNSURE,
    Verdict,
    axes_verdict,
    draw_overview,
    mask_panels,
    over_time_verdict,
    parse_args,
    print_table,
    sites_of,
    write_verdicts,
)

STEPS, FEATURES, UNITS = 20, 8, 10


class LockedDropout(nn.Module):
    """AWD-LSTM's locked (variational) dropout: one mask per sequence, built by hand."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, time, feature)
        if not self.training or not self.p:
            return x
        mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


class Net(nn.Module):
    """``[before] -> nn.LSTM -> [after] -> Linear`` on (batch, time, feature) inputs.

    Args:
        before: Module applied to the input sequence, or None.
        after: Module applied to the last hidden state, or None.
        channels_first: Apply ``before`` to the input as (batch, channel, time).
        functional_p: Also apply ``F.dropout(h, p, training=True)`` to the last hidden state:
            a functional call that ignores ``self.training``.
        **lstm: Keyword arguments of ``nn.LSTM``.
    """

    def __init__(self, before: nn.Module | None = None, after: nn.Module | None = None, *,
                 channels_first: bool = False, functional_p: float = 0.0, **lstm) -> None:
        super().__init__()
        self.before = before
        self.lstm = nn.LSTM(FEATURES, UNITS, batch_first=True, **lstm)
        self.after = after
        self.channels_first = channels_first
        self.functional_p = functional_p
        self.head = nn.Linear(UNITS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.before is not None:
            x = (self.before(x.transpose(1, 2)).transpose(1, 2) if self.channels_first
                 else self.before(x))
        out, _ = self.lstm(x)
        h = out[:, -1]
        if self.after is not None:
            h = self.after(h)
        if self.functional_p:
            h = F.dropout(h, self.functional_p, training=True)  # the bug: always on
        return self.head(h)


def _single_layer() -> Net:
    with warnings.catch_warnings():
        # torch warns that dropout with num_layers=1 does nothing: T6 checks it on the masks.
        warnings.simplefilter("ignore", UserWarning)
        return Net(num_layers=1, dropout=0.5)


def configurations() -> dict[str, Callable[[], nn.Module]]:
    """Each configuration, as a factory called after the seed is set."""
    return {
        "dropout_before_lstm": lambda: Net(before=nn.Dropout(0.5)),
        "dropout_after_lstm": lambda: Net(after=nn.Dropout(0.5)),
        "dropout1d_channels": lambda: Net(before=nn.Dropout1d(0.5), channels_first=True),
        "locked_dropout": lambda: Net(before=LockedDropout(0.5)),
        "lstm_two_layers": lambda: Net(num_layers=2, dropout=0.3),
        "lstm_one_layer": _single_layer,
        "eval_functional": lambda: Net(after=nn.Dropout(0.5), functional_p=0.5),
    }


def record_all(out, samples: int, batch: int) -> dict[str, str]:
    """Train each configuration for one epoch, then one eval forward, while recording."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, STEPS, FEATURES, generator=gen)
    y = torch.randn(samples, 1, generator=gen)
    files = {}
    for name, make in configurations().items():
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        path = out / f"{name}.h5"
        with dropspy.record(model, path):
            model.train()
            for i in range(0, samples, batch):
                opt.zero_grad()
                F.mse_loss(model(x[i:i + batch]), y[i:i + batch]).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                model(x[:batch])
        files[name] = path
    return files


def applied_verdict(claim: str, text: str, run: str, analysis, layer: str, role: str) -> Verdict:
    """Does ``layer`` apply a mask of ``role`` while training? (findings: never-applied)"""
    found = sites_of(analysis, layer, role)
    if not found:
        return Verdict(claim, text, run, (), FAILS, f"no {role} site was seen in {layer}")
    s = found[0]
    if s.opaque:
        return Verdict(claim, text, run, (s.site,), UNSURE, f"opaque: {s.opaque}")
    codes = [f.code for f in s.findings]
    if s.applied_records and s.training_records:
        rate = s.rate
        return Verdict(claim, text, run, (s.site,), HOLDS,
                       f"{s.site}: masks applied in {s.applied_records} of {s.records} calls, "
                       f"observed rate {rate.observed:.3f} (configured {rate.configured:g})")
    why = next((f.message for f in s.findings if f.code == "never-applied"),
               f"no mask applied ({', '.join(codes) or 'no findings'})")
    return Verdict(claim, text, run, (s.site,), FAILS, f"{s.site}: {why}")


def eval_verdict(claim: str, text: str, run: str, analysis, site) -> Verdict:
    """Is the site's dropout off in the eval forward? (findings: inference-dropout)"""
    if site is None:
        return Verdict(claim, text, run, (), UNSURE, "no such site was recorded")
    evals = site.records - site.training_records
    bad = [f for f in site.findings if f.code == "inference-dropout"]
    if evals == 0:
        return Verdict(claim, text, run, (site.site,), UNSURE,
                       f"{site.site}: no call was recorded in eval mode")
    if bad:
        return Verdict(claim, text, run, (site.site,), FAILS, f"{site.site}: {bad[0].message}")
    return Verdict(claim, text, run, (site.site,), HOLDS,
                   f"{site.site}: {evals} call(s) in eval mode, nothing dropped")


def judge(files: dict[str, str]) -> list[Verdict]:
    """Every claim, judged on the analysis of the run file that answers it."""
    an = {}
    for name, path in files.items():
        with dropspy.load(path) as run:
            an[name] = analyze_run(run)
    f = {name: os.path.basename(str(path)) for name, path in files.items()}
    ev = an["eval_functional"]
    module_site = next(iter(sites_of(ev, "after", "output")), None)
    functional = next((s for s in ev.sites if s.role == "output" and s.site != getattr(
        module_site, "site", None)), None)
    return [
        axes_verdict("T1", "nn.Dropout before nn.LSTM: no privileged axis",
                     f["dropout_before_lstm"], an["dropout_before_lstm"], "before", shared=()),
        axes_verdict("T2", "nn.Dropout after nn.LSTM (last hidden state): per sample and "
                     "feature", f["dropout_after_lstm"], an["dropout_after_lstm"], "after",
                     shared=()),
        axes_verdict("T3", "nn.Dropout1d on (batch, channel, time): whole channels at every "
                     "step, per sample", f["dropout1d_channels"], an["dropout1d_channels"],
                     "before", shared=("time",)),
        axes_verdict("T4", "locked dropout (AWD-LSTM): one mask per sequence, the same at "
                     "every step", f["locked_dropout"], an["locked_dropout"], "before",
                     shared=("time",), role=None),
        applied_verdict("T5", "nn.LSTM(num_layers=2, dropout=0.3) drops between the layers",
                        f["lstm_two_layers"], an["lstm_two_layers"], "lstm", "between_layers"),
        over_time_verdict("T5'", "... with one mask for the whole sequence, as locked dropout",
                          f["lstm_two_layers"], an["lstm_two_layers"], "lstm",
                          "between_layers", want="constant"),
        applied_verdict("T6", "nn.LSTM(num_layers=1, dropout=0.5) drops something",
                        f["lstm_one_layer"], an["lstm_one_layer"], "lstm", "between_layers"),
        eval_verdict("T7a", "model.eval() turns an nn.Dropout module off", f["eval_functional"],
                     ev, module_site),
        eval_verdict("T7b", "model.eval() turns F.dropout(x, p, training=True) off",
                     f["eval_functional"], ev, functional),
    ]


LABELS = {
    "dropout_before_lstm": "T1 Dropout -> LSTM",
    "dropout_after_lstm": "T2 LSTM -> Dropout",
    "dropout1d_channels": "T3 Dropout1d\non (N, C, L)",
    "locked_dropout": "T4 locked dropout",
    "lstm_two_layers": "T5 LSTM(num_layers=2,\ndropout=0.3)",
    "lstm_one_layer": "T6 LSTM(num_layers=1,\ndropout=0.5)",
    "eval_functional": "T7 F.dropout(training=True)",
}


def pictures(out, files: dict[str, str]) -> list:
    """An overview PNG: a row per configuration, feature (channel) down, time across."""
    rows = []
    for name, path in files.items():
        with dropspy.load(path) as run:
            for site_name in run.sites:
                site = run[site_name]
                if name == "eval_functional" and site.layer == "after":
                    continue  # the module's masks look like T2's; the row is about F.dropout
                applied = np.flatnonzero(np.asarray(site.applied, dtype=bool))
                panels: list = []
                if len(applied):
                    mask = site.mask(int(applied[0]))
                    axes = site.axes
                    if axes and axes[0] == "time" and "batch" in axes:  # time-major RNN stack
                        mask, axes = np.swapaxes(mask, 0, 1), ("batch", "time") + tuple(axes[2:])
                    panels = mask_panels(axes, mask)
                    if name == "eval_functional":  # a training call next to an eval call
                        evals = [int(i) for i in applied if not site.training[i]]
                        panels = [("training", *panels[0][1:])] + [
                            ("eval mode", *mask_panels(site.axes, site.mask(i))[0][1:])
                            for i in evals[:1]]
                rows.append((LABELS.get(name, name), panels))
    title = (f"Dropout masks recorded by dropspy at the first training step, torch "
             f"{torch.__version__}: white = kept, black = dropped")
    return [draw_overview(rows, out / "overview.png", title)]


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], "torch_lstm_dropout")
    samples, batch = (64, 16) if args.small else (256, 32)
    print(f"Dropout around nn.LSTM: masks recorded by dropspy on torch {torch.__version__} (CPU).")
    print(f"Input (batch={batch}, steps={STEPS}, features={FEATURES}), nn.LSTM(hidden={UNITS}), "
          f"{samples // batch} optimizer steps and one eval forward per configuration.\n",
          flush=True)
    files = record_all(args.out, samples, batch)
    verdicts = judge(files)
    print_table(verdicts)
    write_verdicts(args.out, verdicts, {"framework": "torch", "torch_version": torch.__version__,
                                        "steps": STEPS, "features": FEATURES, "batch": batch,
                                        "training_steps": samples // batch})
    if not args.no_pictures:
        pictures(args.out, files)
    print(f"\nRun files, verdicts.json and pictures: {args.out}  "
          f"({time.perf_counter() - STARTED:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
