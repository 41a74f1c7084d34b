"""What `dropspy inspect` prints for a person: answers in words, layout at every width."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _synth import info, records, write_run
from rich.console import Console

import dropspy
from dropspy.analysis import analyze_masks, analyze_run
from dropspy.render import answer, records_words, render_inspect

RNG = np.random.default_rng(0)
B, T, F = 16, 10, 32


def _analysis(path):
    with dropspy.load(path) as run:
        return analyze_run(run)


def _noises(noise_shape, n=4, rate=0.3):
    return [RNG.random(noise_shape) >= rate for _ in range(n)]


@pytest.mark.parametrize("axes, noise_shape, shape, words", [
    (("batch", "time", "feature"), (B, 1, F), (B, T, F),
     "drops whole features, per sample; the same features at every time step"),
    (("batch", "time", "feature"), (1, T, 1), (B, T, F),
     "drops whole time steps, the same for every sample; all features of a time step together"),
    (("batch", "time", "feature"), (B, 1, 1), (B, T, F), "drops whole samples"),
    (("batch", "time", "feature"), (B, T, F), (B, T, F),
     "drops single elements, no axis shared; a new mask at each time step"),
    (("batch", "feature"), (B, F), (B, F), "drops single elements, no axis shared"),
    (("batch", "height", "width", "channel"), (B, 1, 1, 8), (B, 6, 6, 8),
     "drops whole channels, per sample; all rows and columns of a channel together"),
])
def test_answer_says_what_the_planted_structure_drops(axes, noise_shape, shape, words):
    site = analyze_masks(_noises(noise_shape), axes, rate=0.3, shapes=[shape] * 4)
    assert answer(site) == words


def test_answer_says_a_stale_mask_is_the_same_at_every_step():
    same = RNG.random((B, T, F)) >= 0.3
    site = analyze_masks([same] * 4, ("batch", "time", "feature"), rate=0.3)
    assert "the SAME mask at every training step (stale)" in answer(site)


def test_answer_for_a_site_that_never_applied_a_mask():
    site = analyze_masks([None, None], ("batch", "feature"), rate=0.3, shapes=[(B, F)] * 2,
                         training=[False, False])
    assert answer(site) == "no mask was applied in 2 recorded call(s) (all in inference mode)"


@pytest.fixture(scope="module")
def gates_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("render")
    shared = records("g/input/i", (8, 5, 4), (8, 1, 4), 0.3, seed=7)
    sites = []
    for gate in "ifco":  # one mask used by all four gates: the same noise at every gate
        name = f"g/input/{gate}"
        recs = [type(r)(name, r.step, r.call, r.training, r.shape, noise=r.noise) for r in shared]
        sites.append((info(name, layer="g", layer_class="LSTM", role="input", gate=gate), recs))
    for k, gate in enumerate("ifco"):  # four different masks
        name = f"g/recurrent/{gate}"
        sites.append((info(name, layer="g", layer_class="LSTM", role="recurrent", gate=gate),
                      records(name, (8, 5, 4), (8, 1, 4), 0.3, seed=20 + k)))
    sites.append((info("a_rather_long_site_name/spatial_dropout1d_of_the_encoder",
                       layer_class="SpatialDropout1D"),
                  records("a_rather_long_site_name/spatial_dropout1d_of_the_encoder",
                          (16, 10, 32), (16, 1, 32), 0.3, seed=1)))
    return write_run(d / "gates.h5", sites)


def test_answer_tells_one_mask_for_all_gates_from_four_different_ones(gates_path):
    result = _analysis(gates_path)
    assert "one mask shared by all 4 gates" in answer(result["g/input/f"])
    assert "4 different masks, one per gate" in answer(result["g/recurrent/f"])


def _render(result, width, verbose=False):
    console = Console(width=width, record=True, highlight=False, soft_wrap=False)
    with console.capture() as cap:
        render_inspect(result, console, verbose=verbose)
    return cap.get()


@pytest.mark.parametrize("width", [60, 80, 100, 120, 200])
def test_inspect_never_breaks_a_site_name_or_a_word(gates_path, width):
    result = _analysis(gates_path)
    out = _render(result, width)
    lines = [line.rstrip() for line in out.splitlines()]
    assert max(len(line) for line in lines) <= width
    tokens = {t for line in lines for t in re.split(r"[\s,;]+", line) if t}
    for s in result.sites:
        assert any(s.site in line for line in lines), (s.site, width)
        for word in re.split(r"[\s,;]+", answer(s)):
            assert word in tokens, (word, width)


def test_inspect_prints_the_table_when_it_fits_and_blocks_below_its_width(gates_path):
    result = _analysis(gates_path)
    wide = _render(result, 250)
    assert "over time" in wide and "rate set/seen" in wide and "In words:" in wide
    narrow = _render(result, 80)
    assert "In words:" not in narrow and "over time same" in narrow
    # Each site: one header line holding its name, class and verdict.
    assert sum(line.startswith("g/recurrent/") for line in narrow.splitlines()) == 4


def test_inspect_groups_sibling_gates_with_the_same_answer(gates_path):
    out = _render(_analysis(gates_path), 250)
    assert "g/recurrent/i, f, c, o" in out and "g/input/i, f, c, o" in out


@pytest.mark.parametrize("n_eval, words", [(0, "4 training"), (1, "4 training + 1 eval")])
def test_records_column_counts_training_and_eval_records(n_eval, words):
    noises = _noises((B, F), n=4 + n_eval)
    site = analyze_masks(noises, ("batch", "feature"), rate=0.3,
                         training=[True] * 4 + [False] * n_eval)
    assert records_words(site) == words


def test_inspect_on_a_run_without_sites_says_so_and_shows_drop_causes(tmp_path):
    path = write_run(tmp_path / "empty.h5", [], dropped={"site_filter": 6})
    out = _render(_analysis(path), 100)
    assert "This run holds no dropout site" in out
    assert "site_filter: 6" in out
    assert "[records-dropped]" in out  # an info finding, shown without -v for an empty run
