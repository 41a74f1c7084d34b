"""What the benchmarks share: the two reference models, paired-ratio statistics, machine facts,
the results JSON and the printed table.

The reference models are the ones issue 7 fixes, so numbers from different benchmarks (and
from different machines) describe the same workload:

- Keras 3: ``Input(40, 32) -> Dropout(0.2) -> LSTM(64, dropout=0.2, recurrent_dropout=0.2,
  return_sequences=True) -> SpatialDropout1D(0.2) -> LSTM(32, dropout=0.2) -> Dropout(0.2) ->
  Dense(1)``, batch 64, mean squared error, Adam, through ``model.fit``.
- PyTorch: ``Embedding(1000, 32) -> Dropout(0.2) -> LSTM(32, 64) -> Dropout1d(0.2) over
  (batch, channels, time) -> LSTM(64, 32, num_layers=2, dropout=0.2) -> Dropout(0.2) ->
  Linear(32, 1000)``, batch 64, sequence 40, next-token cross entropy, Adam, a plain loop.

Frameworks are imported inside the functions that need them (torch before tensorflow, which
the caller arranges by importing torch first).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH = 64
SEQ = 40
KERAS_FEATURES = 32
VOCAB = 1000


# -- models ---------------------------------------------------------------------------------


def keras_model(seed: int = 0) -> Any:
    """The Keras reference model, compiled (Adam, mse), built with a fixed seed."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((SEQ, KERAS_FEATURES)),
        layers.Dropout(0.2),
        layers.LSTM(64, dropout=0.2, recurrent_dropout=0.2, return_sequences=True),
        layers.SpatialDropout1D(0.2),
        layers.LSTM(32, dropout=0.2),
        layers.Dropout(0.2),
        layers.Dense(1),
    ])
    model.compile(optimizer="adam", loss="mse")
    return model


def keras_data(steps: int, seed: int = 0) -> tuple[Any, Any]:
    """``steps`` batches of inputs and targets for the Keras model."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((steps * BATCH, SEQ, KERAS_FEATURES), dtype=np.float32)
    y = rng.random((steps * BATCH, 1), dtype=np.float32)
    return x, y


def torch_model(seed: int = 0) -> Any:
    """The PyTorch reference model (batch-first LSTMs), in training mode."""
    import torch
    from torch import nn

    class Reference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 32)
            self.drop_in = nn.Dropout(0.2)
            self.lstm1 = nn.LSTM(32, 64, batch_first=True)
            self.drop_channels = nn.Dropout1d(0.2)
            self.lstm2 = nn.LSTM(64, 32, num_layers=2, dropout=0.2, batch_first=True)
            self.drop_out = nn.Dropout(0.2)
            self.head = nn.Linear(32, VOCAB)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.drop_in(self.embed(tokens))
            h, _ = self.lstm1(h)
            # Dropout1d drops whole channels of (batch, channels, time).
            h = self.drop_channels(h.transpose(1, 2)).transpose(1, 2)
            h, _ = self.lstm2(h)
            return self.head(self.drop_out(h))

    torch.manual_seed(seed)
    return Reference().train()


def torch_data(steps: int, seed: int = 0) -> list[tuple[Any, Any]]:
    """``steps`` batches of (tokens, next tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(0, VOCAB, (steps, BATCH, SEQ + 1), generator=g)
    return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seqs]


def torch_train_step(model: Any, opt: Any, tokens: Any, targets: Any) -> None:
    """One plain training step: forward, cross entropy, backward, Adam step."""
    import torch

    opt.zero_grad(set_to_none=True)
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()
    opt.step()


# -- statistics -----------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ratio_summary(ratios: list[float]) -> dict[str, Any]:
    """Median of paired ratios and their spread (quartiles, extremes, count)."""
    return {
        "median": statistics.median(ratios) if ratios else float("nan"),
        "p25": quantile(ratios, 0.25),
        "p75": quantile(ratios, 0.75),
        "min": min(ratios) if ratios else float("nan"),
        "max": max(ratios) if ratios else float("nan"),
        "n": len(ratios),
    }


# -- machine facts, output ------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Date, host and versions of everything that shapes the numbers."""
    import h5py
    import numpy as np

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
    }
    try:
        from dropspy._version import __version__

        info["dropspy"] = __version__
    except ImportError:
        pass
    for mod in ("torch", "tensorflow", "keras", "torchlens"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = str(getattr(m, "__version__", "?"))
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def print_table(headers: list[str], rows: list[list[Any]], out: Any = None) -> None:
    """A plain aligned text table."""
    out = out or sys.stdout
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)
