"""dropspy.plot: mask images with named axes (matplotlib, Agg canvas)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from _synth import info, records, write_run

from dropspy.runset import load

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
    code = ("import sys, matplotlib\nfrom dropspy.runset import load\n"
            "from dropspy.plot import plot_site\n"
            "before = matplotlib.get_backend()\n"
            f"plot_site(load({str(run_path)!r}), 'conv_drop', {str(tmp_path / 'x.png')!r})\n"
            "print('matplotlib.pyplot' in sys.modules, matplotlib.get_backend() == before)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root, MPLBACKEND="svg"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def _site_figure(run_path, name, **kw):
    from dropspy.plot import site_figure

    with load(run_path) as run:
        return site_figure(run, name, **kw)


def test_a_time_shared_mask_is_drawn_as_horizontal_stripes_features_down_time_across():
    from dropspy.plot import mask_image

    rng = np.random.default_rng(0)
    noise = rng.random((4, 1, 12)) >= 0.5       # (batch, time, feature), shared over time
    mask = np.broadcast_to(noise, (4, 20, 12))
    img, down, across, _ = mask_image(mask, ("batch", "time", "feature"), sample=2)
    assert (down, across) == ("feature", "time") and img.shape == (12, 20)
    assert np.array_equal(img, np.repeat(noise[2, 0][:, None], 20, axis=1))  # rows constant


def test_a_channels_first_mask_is_drawn_channel_down():
    from dropspy.plot import mask_image

    mask = np.zeros((2, 16, 12, 10), dtype=bool)
    img, down, across, note = mask_image(mask, ("batch", "channel", "height", "width"), 0)
    assert (down, across, img.shape) == ("channel", "width", (16, 10))
    assert note == " (height=0)"
    img, down, across, note = mask_image(mask[:, :, 0, :], ("batch", "channel", "width"), None)
    assert (down, across, img.shape) == ("channel", "batch", (16, 2))


def test_every_picture_says_white_kept_black_dropped_and_names_its_gates(run_path):
    fig = _site_figure(run_path, "lstm/input/i", step=1, samples=2)
    title = fig._suptitle.get_text()
    assert "white = kept, black = dropped" in title and "feature down, time across" in title
    assert title.startswith("lstm/input: gates i, f, c, o (LSTM)")
    panel_titles = [ax.get_title() for ax in fig.axes]
    for gate in "ifco":
        assert f"gate {gate}, sample 0" in panel_titles
    assert "white = kept, black = dropped" in _site_figure(run_path, "conv_drop")._suptitle \
        .get_text()


def test_rate_panels_draw_the_configured_keep_rate(run_path):
    fig = _site_figure(run_path, "lstm/input/i")
    rate_axes = [ax for ax in fig.axes if ax.get_title().startswith("keep rate along")]
    assert len(rate_axes) == 3
    for ax in rate_axes:
        flat = [line for line in ax.get_lines()
                if len(set(np.asarray(line.get_ydata(), dtype=float))) == 1
                and line.get_linestyle() == "--"]
        assert flat and float(flat[0].get_ydata()[0]) == pytest.approx(1 - 0.3)  # info() rate
        assert "configured keep rate 0.7" in ax.get_title()
