"""dropspy.plot: mask images with named axes (matplotlib, Agg canvas)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _synth import info, records, write_run

from dropspy.store import load

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread

from dropspy.plot import find_record, plot_site


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    sites = [(info(f"lstm/input/{g}", layer="lstm", layer_class="LSTM", role="input", gate=g),
              records(f"lstm/input/{g}", (8, 20, 24), (8, 1, 24), 0.4, steps=2, seed=k))
             for k, g in enumerate("ifco")]
    sites.append((info("conv_drop", axes=("batch", "channel", "height", "width"),
                       layer_class="Dropout2d"),
                  records("conv_drop", (4, 16, 12, 12), (4, 16, 1, 1), 0.5, steps=2)))
    return write_run(d / "run.h5", sites)


def test_gate_plot_has_a_panel_per_gate_and_sample(tmp_path, run_path):
    out = tmp_path / "gates.png"
    with load(run_path) as run:
        written = plot_site(run, "lstm/input/i", out, step=1, samples=3)
    assert written == out
    img = imread(out)
    assert img.shape[0] > 600 and img.shape[1] > 900  # 4 gate columns, 3 sample rows + rates
    gray = img[..., :3].mean(axis=2)
    assert (gray < 0.05).any() and (gray > 0.95).any()  # dropped (black) and kept (white) cells


def test_channels_first_plot_draws_channel_by_width(tmp_path, run_path):
    out = tmp_path / "conv.png"
    with load(run_path) as run:
        plot_site(run, "conv_drop", out)
    assert imread(out).shape[0] > 300


def test_find_record_defaults_to_the_first_training_mask_and_rejects_missing_steps(run_path):
    with load(run_path) as run:
        site = run["conv_drop"]
        assert find_record(site) == 0
        assert find_record(site, step=1) == 1
        message = "no mask at step 5 call 0 \\(steps with masks: 0..1\\)"
        with pytest.raises(ValueError, match=message):
            find_record(site, step=5)


def test_plotting_leaves_pyplot_and_the_backend_alone(tmp_path, run_path):
    code = ("import sys, matplotlib\nfrom dropspy.store import load\n"
            "from dropspy.plot import plot_site\n"
            "before = matplotlib.get_backend()\n"
            f"plot_site(load({str(run_path)!r}), 'conv_drop', {str(tmp_path / 'x.png')!r})\n"
            "print('matplotlib.pyplot' in sys.modules, matplotlib.get_backend() == before)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root, MPLBACKEND="svg"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
