"""The analysis gets every verdict right on masks of planted, known structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _synth import (
    KERAS2_CUDNN_LSTM_INPUT,
    KERAS3_LSTM_INPUT,
    info,
    lstm_input_run,
    records,
    write_run,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from dropspy.analysis import (
    MemoryRun,
    MemorySite,
    Severity,
    analyze_masks,
    analyze_run,
    analyze_site,
    diff,
    select_sites,
)
from dropspy.records import Record
from dropspy.runset import load

AXES3 = ("batch", "time", "feature")


def _draws(shape, rate, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(shape) >= rate for _ in range(n)]


def _codes(result):
    return {f.code for f in result.findings}


@pytest.mark.parametrize(
    ("axes", "shape", "noise_shape", "pattern", "shared"),
    [
        (AXES3, (16, 10, 32), (16, 10, 32), "elementwise", ()),
        (AXES3, (16, 10, 32), (16, 1, 32), "time-shared", ("time",)),
        (AXES3, (16, 10, 32), (16, 10, 1), "feature-shared", ("feature",)),
        (AXES3, (16, 10, 32), (16, 1, 1), "sample", ("time", "feature")),
        (AXES3, (16, 10, 32), (1, 10, 32), "batch-shared", ("batch",)),
        (("batch", "feature"), (16, 64), (16, 1), "sample", ("feature",)),
        (("batch", "height", "width", "channel"), (8, 6, 6, 16), (8, 1, 1, 16),
         "shared:height,width", ("height", "width")),
        (("batch", "channel", "height", "width"), (8, 16, 6, 6), (8, 16, 1, 1),
         "shared:height,width", ("height", "width")),
        (AXES3, (16, 10, 32), (1, 1, 1), "shared:batch,time,feature", AXES3),
    ],
)
def test_pattern_and_shared_axes_by_construction(axes, shape, noise_shape, pattern, shared):
    result = analyze_masks(_draws(noise_shape, 0.5), axes, rate=0.5, shapes=[shape] * 4)
    assert result.pattern == pattern
    assert result.shared_axes == shared
    assert set(result.independent_axes) == set(axes) - set(shared)
    for name in shared:
        assert result.axis(name).by_construction
    assert result.rate.verdict == "ok"


def test_axis_shared_by_observation_when_the_noise_copies_along_it():
    rng = np.random.default_rng(1)
    noises = [np.broadcast_to(rng.random((16, 1, 32)) >= 0.3, (16, 10, 32)).copy()
              for _ in range(3)]
    result = analyze_masks(noises, AXES3, rate=0.3)
    time = result.axis("time")
    assert time.verdict == "shared" and not time.by_construction
    assert time.log10_chance < -9
    assert result.pattern == "time-shared"
    # Copies are not independent draws: the interval counts one element per copy group.
    assert result.rate.effective_elements == 3 * 16 * 32
    assert result.rate.elements == 3 * 16 * 10 * 32


def test_few_elements_constant_by_chance_is_inconclusive_not_shared():
    # 2 timesteps at rate 0.05: a fiber of two elements is constant 90% of the time.
    rng = np.random.default_rng(2)
    noises = [np.broadcast_to(rng.random((4, 1, 4)) >= 0.05, (4, 2, 4)).copy()]
    result = analyze_masks(noises, AXES3, rate=0.05)
    time = result.axis("time")
    assert time.verdict == "inconclusive"
    assert time.chance > 1e-9
    assert result.pattern == "inconclusive"
    assert "axis-inconclusive" in _codes(result)


def test_axis_of_size_one_is_inconclusive_and_ignored_by_the_pattern():
    result = analyze_masks(_draws((16, 1, 32), 0.3), AXES3, rate=0.3)
    assert result.axis("time").verdict == "inconclusive"
    assert result.pattern == "elementwise"


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("seed", range(4))
def test_independent_masks_of_realistic_size_are_never_called_shared(rate, seed):
    result = analyze_masks(_draws((32, 20, 64), rate, n=3, seed=seed), AXES3, rate=rate)
    assert result.shared_axes == ()
    assert result.rate.verdict == "ok"
    assert result.freshness.verdict == "fresh"


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    rate=st.floats(0.0, 1.0),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_independent_masks_never_look_shared_whatever_their_size(shape, rate, n, seed):
    axes = tuple(f"axis{k}" for k in range(len(shape)))
    result = analyze_masks(_draws(tuple(shape), rate, n=n, seed=seed), axes, rate=rate)
    assert result.shared_axes == ()
    assert "stale-mask" not in _codes(result)


def test_rate_mismatch_is_an_error_with_both_rates_in_the_message():
    result = analyze_masks(_draws((16, 10, 32), 0.5), AXES3, rate=0.3)
    assert result.rate.verdict == "mismatch"
    assert not result.rate.low <= 0.3 <= result.rate.high
    (finding,) = [f for f in result.findings if f.code == "rate-mismatch"]
    assert finding.severity == Severity.ERROR
    assert "configured rate 0.3" in finding.message
    assert f"observed drop rate {result.rate.observed:.4g}" in finding.message


def test_rate_unknown_when_not_configured_but_still_observed():
    result = analyze_masks(_draws((16, 10, 32), 0.2), AXES3, rate=None)
    assert result.rate.verdict == "unknown"
    assert abs(result.rate.observed - 0.2) < 0.02


def test_rate_interval_covers_the_truth_at_the_stated_confidence():
    misses = 0
    for seed in range(200):
        r = analyze_masks(_draws((8, 64), 0.3, n=1, seed=seed), ("batch", "feature"), rate=0.3)
        misses += r.rate.verdict == "mismatch"
    assert misses <= 2  # 0.1% expected


def test_stale_mask_every_step_is_an_error():
    noise = _draws((16, 10, 32), 0.3, n=1)[0]
    result = analyze_masks([noise] * 5, AXES3, rate=0.3)
    assert result.freshness.verdict == "stale"
    assert result.freshness.identical == result.freshness.pairs == 4
    assert result.freshness.log10_chance < -100
    assert "stale-mask" in _codes(result)


def test_one_stale_step_among_fresh_ones_is_found():
    noises = _draws((16, 10, 32), 0.3, n=6)
    noises[4] = noises[3].copy()
    result = analyze_masks(noises, AXES3, rate=0.3)
    assert result.freshness.verdict == "stale"
    assert result.freshness.identical == 1


def test_tiny_masks_repeating_is_explained_by_chance():
    # Sample dropout on 2 samples: two consecutive steps agree a quarter of the time.
    noises = [np.array([[True], [False]])] * 3
    result = analyze_masks(noises, ("batch", "feature"), rate=0.5, shapes=[(2, 8)] * 3)
    assert result.freshness.verdict == "inconclusive"
    assert "stale-mask" not in _codes(result)


def test_masks_differing_only_outside_the_fingerprint_are_not_stale():
    a = _draws((1, 1000, 700), 0.5, n=1)[0]  # 700k elements: kept in memory
    b = a.copy()
    flat = b.reshape(-1)
    i, j = 1001, 2003  # not sampled by the fingerprint; swap a kept and a dropped element
    while flat[i] == flat[j]:
        j += 1
    flat[i], flat[j] = flat[j], flat[i]
    result = analyze_masks([a, b], AXES3, rate=0.5)
    assert result.freshness.verdict == "fresh"


def test_large_stale_masks_are_verified_by_rereading(tmp_path):
    rng = np.random.default_rng(3)
    big = rng.random((1, 1200, 1000)) >= 0.3  # 1.2M elements: over the in-memory limit
    other = big.copy()
    other[0, 600, 500] = ~other[0, 600, 500]
    recs = [Record("big", s, 0, True, big.shape, noise=x) for s, x in enumerate([big, big, other])]
    path = write_run(tmp_path / "big.h5", [(info("big"), recs)])
    with load(path) as run:
        result = analyze_run(run)["big"]
    assert result.freshness.pairs == 2 and result.freshness.identical == 1
    assert result.freshness.verdict == "stale"


def test_dropout_at_inference_is_an_error_and_inactive_inference_is_not():
    noises = _draws((16, 32), 0.3, n=3)
    keep_all = np.ones((16, 32), bool)
    site = MemorySite("d", ("batch", "feature"), noises + [noises[0], keep_all],
                      rate=0.3, steps=[0, 1, 2, 3, 4], training=[True, True, True, False, False])
    result = analyze_site(site)
    (finding,) = [f for f in result.findings if f.code == "inference-dropout"]
    assert finding.severity == Severity.ERROR
    assert "dropout active at inference" in finding.message
    assert finding.data["records"] == 1 and finding.data["first_step"] == 3
    clean = analyze_site(MemorySite("d", ("batch", "feature"), noises + [keep_all, None],
                                    rate=0.3, steps=[0, 1, 2, 3, 4],
                                    training=[True, True, True, False, False]))
    assert "inference-dropout" not in _codes(clean)


def test_configured_but_never_applied_while_training_is_a_warning():
    never = analyze_site(MemorySite("lstm/between", ("batch", "feature"), [], rate=0.5))
    (finding,) = [f for f in never.findings if f.code == "never-applied"]
    assert finding.severity == Severity.WARNING and "rate=0.5" in finding.message
    assert never.pattern == "unobserved"
    eval_only = analyze_site(MemorySite("d", ("batch", "feature"), [None, None], rate=0.5,
                                        training=[False, False]))
    assert "never-applied" in _codes(eval_only)
    zero = analyze_site(MemorySite("d", ("batch", "feature"), [], rate=0.0))
    assert "never-applied" not in _codes(zero)


def test_opaque_site_is_reported_with_its_reason():
    result = analyze_site(MemorySite("lstm/cudnn", AXES3, [], rate=0.2,
                                     opaque="cuDNN applies dropout inside a fused kernel"))
    (finding,) = result.findings
    assert finding.code == "opaque" and finding.severity == Severity.WARNING
    assert "fused kernel" in finding.message
    assert result.opaque


def _gate_run(identical: bool, steps: int = 3) -> MemoryRun:
    rng = np.random.default_rng(4)
    shared = [rng.random((8, 1, 16)) >= 0.4 for _ in range(steps)]
    sites = []
    for g in "ifco":
        noises = shared if identical else [rng.random((8, 1, 16)) >= 0.4 for _ in range(steps)]
        sites.append(MemorySite(f"lstm/input/{g}", AXES3, noises, rate=0.4,
                                shapes=[(8, 12, 16)] * steps, layer="lstm", layer_class="LSTM",
                                role="input", gate=g))
    return MemoryRun(sites)


@pytest.mark.parametrize(("identical", "verdict"), [(True, "identical"), (False, "distinct")])
def test_gate_masks_identical_or_distinct(identical, verdict):
    result = analyze_run(_gate_run(identical))
    for g in "ifco":
        s = result[f"lstm/input/{g}"]
        assert s.gates.verdict == verdict
        assert len(s.gate_sites) == 3
        assert s.pattern == "time-shared"
        assert s.over_time.verdict == "constant"


def test_gate_comparison_also_runs_when_one_gate_is_selected():
    result = analyze_run(_gate_run(True), sites="lstm/input/i")
    assert result.site_names == ("lstm/input/i",)
    assert result["lstm/input/i"].gates.verdict == "identical"


def _calls_site(resample: bool, per_step: int = 5, steps: int = 3):
    rng = np.random.default_rng(5)
    noises, st_, ca = [], [], []
    for s in range(steps):
        base = rng.random((8, 16)) >= 0.3
        for c in range(per_step):
            noises.append(rng.random((8, 16)) >= 0.3 if resample else base)
            st_.append(s)
            ca.append(c)
    return MemorySite("cell/recurrent", ("batch", "feature"), noises, rate=0.3, steps=st_,
                      calls=ca, role="recurrent", layer="cell")


@pytest.mark.parametrize(("resample", "verdict"), [(True, "resampled"), (False, "constant")])
def test_over_time_from_calls_within_a_step(resample, verdict):
    result = analyze_site(_calls_site(resample))
    assert result.over_time.verdict == verdict
    assert result.over_time.pairs == 3 * 4
    assert result.freshness.verdict == "fresh"


def test_over_time_from_the_time_axis():
    shared = analyze_masks(_draws((8, 1, 16), 0.3), AXES3, rate=0.3, shapes=[(8, 20, 16)] * 4)
    redrawn = analyze_masks(_draws((8, 20, 16), 0.3), AXES3, rate=0.3)
    assert shared.over_time.verdict == "constant"
    assert redrawn.over_time.verdict == "resampled"


def test_time_axis_by_construction_is_shared_and_contradicted_when_it_varies():
    rng = np.random.default_rng(6)
    same = [np.broadcast_to(rng.random((2, 1, 2)) >= 0.3, (2, 3, 2)).copy()]
    by_fact = analyze_masks(same, AXES3, rate=0.3, extra={"time_axis_by_construction": True})
    assert by_fact.axis("time").verdict == "shared" and by_fact.axis("time").by_construction
    varies = analyze_masks(_draws((8, 20, 16), 0.3), AXES3, rate=0.3,
                           extra={"time_axis_by_construction": True})
    assert varies.axis("time").verdict == "independent"
    assert "construction-contradicted" in _codes(varies)


def test_run_incomplete_and_dropped_records_are_warnings():
    run = MemoryRun([MemorySite("d", ("batch", "feature"), _draws((8, 8), 0.3), rate=0.3)],
                    complete=False, records_dropped={"queue_full": 7, "max_bytes": 0},
                    notes=["sites left out"])
    result = analyze_run(run)
    codes = {f.code: f for f in result.findings}
    assert codes["run-incomplete"].severity == Severity.WARNING
    assert codes["records-dropped"].severity == Severity.WARNING
    message = codes["records-dropped"].message
    assert "7" in message and "queue_full" in message
    assert codes["note"].message == "sites left out"


@pytest.mark.parametrize("dropped, severity", [
    ({"sampling": 12}, Severity.INFO),
    ({"site_filter": 3, "sampling": 1}, Severity.INFO),
    ({"sampling": 12, "disk_full": 1}, Severity.WARNING),
])
def test_records_left_out_by_the_sampling_policy_are_info_not_loss(dropped, severity):
    run = MemoryRun([MemorySite("d", ("batch", "feature"), _draws((8, 8), 0.3), rate=0.3)],
                    records_dropped=dropped)
    codes = {f.code: f for f in analyze_run(run).findings}
    assert codes["records-dropped"].severity == severity


def test_end_to_end_on_a_run_file(tmp_path):
    path = write_run(tmp_path / "run.h5", [
        (info("spatial", layer_class="SpatialDropout1D"),
         records("spatial", (16, 10, 32), (16, 1, 32), 0.3, steps=5)),
        (info("plain"), records("plain", (16, 10, 32), (16, 10, 32), 0.3, steps=5, seed=1)),
        (info("stale"), records("stale", (16, 10, 32), (16, 10, 32), 0.3, steps=5,
                                make=lambda rng, s: (np.random.default_rng(9)
                                                     .random((16, 10, 32)) >= 0.3))),
    ], dropped={"queue_full": 2})
    with load(path) as run:
        result = analyze_run(run)
    assert result["spatial"].pattern == "time-shared"
    assert result["plain"].pattern == "elementwise"
    assert result["stale"].freshness.verdict == "stale"
    assert result["spatial"].steps == 5 and result["spatial"].records == 5
    assert result.records_dropped["queue_full"] == 2
    assert "records-dropped" in {f.code for f in result.findings}
    assert result.complete
    with load(str(path)) as again:  # the analysis does no I/O: a path is opened by the reader
        assert again.report() == result


def test_select_sites_globs_and_unknown_patterns():
    names = ["lstm/input/i", "lstm/input/f", "lstm/recurrent/i", "dense_dropout"]
    assert select_sites(names, "lstm/input/*") == ["lstm/input/i", "lstm/input/f"]
    assert select_sites(names, ["dense*", "lstm/rec*"]) == ["lstm/recurrent/i", "dense_dropout"]
    assert select_sites(names, None) == names
    with pytest.raises(KeyError, match="no site matches 'conv\\*'"):
        select_sites(names, "conv*")


def test_diff_names_the_sites_and_aspects_that_differ():
    a = analyze_run(MemoryRun([
        MemorySite("x", AXES3, _draws((8, 1, 16), 0.3), rate=0.3, shapes=[(8, 10, 16)] * 4),
        MemorySite("y", ("batch", "feature"), _draws((8, 16), 0.3), rate=0.3),
        MemorySite("only_a", ("batch", "feature"), _draws((8, 16), 0.3), rate=0.3),
    ]))
    b = analyze_run(MemoryRun([
        MemorySite("x", AXES3, _draws((8, 10, 16), 0.3), rate=0.3),
        MemorySite("y", ("batch", "feature"), _draws((8, 16), 0.3, seed=1), rate=0.3),
    ]))
    d = {(x.site, x.aspect): x for x in diff(a, b)}
    assert d[("x", "axis:time")].a == "shared" and d[("x", "axis:time")].b == "independent"
    assert d[("x", "pattern")].a == "time-shared" and d[("x", "pattern")].b == "elementwise"
    assert d[("only_a", "presence")].b == "absent"
    assert not any(site == "y" for site, _ in d)
    assert diff(a, a) == []


def test_diff_with_facts_names_the_site_facts_that_differ(tmp_path):
    k2 = analyze_run(load(lstm_input_run(tmp_path / "k2.h5", KERAS2_CUDNN_LSTM_INPUT,
                                    {"framework": "tf_keras", "framework_version": "2.17.0"},
                                    noise_shape=(None, 1, None))))
    k3 = analyze_run(load(lstm_input_run(tmp_path / "k3.h5", KERAS3_LSTM_INPUT,
                                    {"framework": "keras", "framework_version": "3.6.0"})))
    assert diff(k2, k3) == []   # the same masks: every verdict agrees
    d = {(x.site, x.aspect): (x.a, x.b) for x in diff(k2, k3, facts=True)}
    assert d == {
        ("lstm/input", "fact:masks_drawn_per_call"): ("4", "1"),
        ("lstm/input", "fact:tf_keras_path"): ('"cudnn-eligible"', "absent"),
        ("lstm/input", "fact:noise_shape"): ("[null, 1, null]", "null"),
    }
    assert (k2.framework_version, k3.framework_version) == ("2.17.0", "3.6.0")


def test_diff_with_facts_names_a_different_scale_and_nothing_for_equal_facts(tmp_path):
    meta = {"framework": "keras"}
    a = analyze_run(load(lstm_input_run(tmp_path / "a.h5", KERAS3_LSTM_INPUT, meta)))
    b = analyze_run(load(lstm_input_run(tmp_path / "b.h5", KERAS3_LSTM_INPUT, meta, scale=2.0)))
    assert diff(a, a, facts=True) == []
    d = {(x.site, x.aspect): (x.a, x.b) for x in diff(a, b, facts=True)}
    assert list(d) == [("lstm/input", "fact:scale")]
    assert d[("lstm/input", "fact:scale")][1] == "2.0"


def test_bad_threshold_is_rejected_with_the_value():
    with pytest.raises(ValueError, match="threshold=2"):
        analyze_masks(_draws((4, 4), 0.3), ("batch", "feature"), threshold=2)


def test_chance_reported_matches_the_closed_form():
    # One record, 4x2 fibers of length 3, all constant along time; rate interval endpoints
    # bound the chance from above.
    rng = np.random.default_rng(7)
    noise = np.broadcast_to(rng.random((4, 1, 2)) >= 0.5, (4, 3, 2)).copy()
    r = analyze_masks([noise], AXES3, rate=0.5)
    p_lo, p_hi = r.rate.low, r.rate.high
    fibers = np.prod([4 if r.axis("batch").verdict == "independent" else 1,
                      2 if r.axis("feature").verdict == "independent" else 1])
    want = max(fibers * math.log10((1 - p) ** 3 + p ** 3) for p in (p_lo, p_hi))
    assert r.axis("time").log10_chance == pytest.approx(want)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    k=st.integers(1, 5),
    share=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_constancy_fast_paths_agree_with_the_definition(shape, k, share, seed):
    from dropspy.analysis._scan import _constant_along_batch

    rng = np.random.default_rng(seed)
    # Some records constant along a random axis (by copying), others not.
    ax = share.draw(st.integers(0, len(shape) - 1))
    batch = rng.random((k, *shape)) >= 0.5
    for r in range(k):
        if rng.random() < 0.5:
            batch[r] = np.broadcast_to(batch[r].take([0], axis=ax), shape)
    for a in range(len(shape)):
        want = np.array([np.all(x == x.take([0], axis=a)) for x in batch])
        assert np.array_equal(_constant_along_batch(batch, a), want)
        for r in range(k):
            assert np.array_equal(_constant_along_batch(batch[r:r + 1], a), want[r:r + 1])


def test_batched_scan_matches_record_by_record_on_mixed_shapes_and_modes():
    rng = np.random.default_rng(8)
    noises, shapes, training = [], [], []
    for s in range(40):
        b = 5 if s % 7 == 6 else 8  # a short last batch changes the noise shape mid-run
        noises.append(rng.random((b, 1, 16)) >= 0.3)
        shapes.append((b, 12, 16))
        training.append(s % 10 != 9)
    site = MemorySite("d", AXES3, noises, rate=0.3, shapes=shapes, training=training)
    whole = analyze_site(site)
    assert whole.pattern == "time-shared"
    assert whole.rate.elements == sum(x.size for x, t in zip(noises, training) if t)
    dropped = sum(int((~x).sum()) for x, t in zip(noises, training) if t)
    assert whole.rate.observed == pytest.approx(dropped / whole.rate.elements)
    inference = [f for f in whole.findings if f.code == "inference-dropout"]
    assert inference and inference[0].data["records"] == 4


def test_progress_reports_every_packed_byte():
    site = MemorySite("d", AXES3, _draws((8, 3, 17), 0.3, n=5), rate=0.3)
    seen = []
    analyze_site(site, progress=seen.append)
    assert sum(seen) == 5 * ((8 * 3 * 17 + 7) // 8)


def test_nothing_dropped_makes_freshness_inconclusive_and_says_why():
    result = analyze_masks([np.ones((8, 16), bool)] * 3, ("batch", "feature"), rate=0.0)
    assert result.freshness.verdict == "inconclusive"
    (finding,) = [f for f in result.findings if f.code == "freshness-inconclusive"]
    assert "every element was kept" in finding.message
    assert result.rate.verdict == "ok"


def test_fewer_readable_records_than_written_is_a_warning():
    run = MemoryRun([MemorySite("d", ("batch", "feature"), _draws((8, 8), 0.3), rate=0.3)])
    run.records_written = 10
    run.records_readable = 4
    codes = {f.code: f for f in analyze_run(run).findings}
    assert codes["records-unreadable"].severity == Severity.WARNING
    assert "reported 10 records but the file holds 4" in codes["records-unreadable"].message


def test_wilson_interval_matches_a_reference_value():
    from dropspy.analysis._stats import wilson_interval

    # 30 of 100 at 95%: the textbook Wilson interval is (0.2189, 0.3958).
    low, high = wilson_interval(30, 100, 0.95)
    assert (round(low, 4), round(high, 4)) == (0.2189, 0.3958)
    assert wilson_interval(0, 50, 0.999)[0] == 0.0
    assert wilson_interval(50, 50, 0.999)[1] == 1.0
    assert wilson_interval(0, 0, 0.999) == (0.0, 1.0)


def test_repeat_tail_is_exact_when_every_pair_repeats_and_zero_when_none_do():
    from dropspy.analysis._stats import log10_repeat_tail

    assert log10_repeat_tail(5, 5, -2.0) == pytest.approx(-10.0)
    assert log10_repeat_tail(5, 0, -2.0) == 0.0
    # One repeat in 1000 pairs at chance 1e-3 each is what chance predicts: no evidence.
    assert log10_repeat_tail(1000, 1, -3.0) == pytest.approx(0.0, abs=1e-9)
    assert log10_repeat_tail(1000, 1, -300.0) < -290


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    rate=st.floats(0.0, 1.0),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_independent_gate_masks_are_never_called_identical(shape, rate, steps, seed):
    rng = np.random.default_rng(seed)
    axes = tuple(f"axis{k}" for k in range(len(shape)))
    run = MemoryRun([MemorySite(f"cell/input/{g}", axes,
                                [rng.random(tuple(shape)) >= rate for _ in range(steps)],
                                rate=rate, layer="cell", role="input", gate=g) for g in "zrh"])
    result = analyze_run(run)
    assert result["cell/input/z"].gates.verdict in ("distinct", "inconclusive")


class _BatchingSite(MemorySite):
    """A reader that hands out whole batches, as a store with ``iter_batches`` would."""

    def iter_batches(self, start=0, stop=None, *, max_bytes=16 << 20):
        idx, rows = [], []
        for i, x in self.iter_noise(start, stop):
            if x is None or (rows and x.shape != rows[0].shape) or len(rows) == 3:
                if rows:
                    yield np.asarray(idx), np.stack(rows)
                idx, rows = [], []
            if x is not None:
                idx.append(i)
                rows.append(x)
        if rows:
            yield np.asarray(idx), np.stack(rows)


def test_a_reader_with_iter_batches_gives_the_same_analysis():
    rng = np.random.default_rng(9)
    noises = [rng.random((4 + s % 2, 1, 8)) >= 0.3 for s in range(10)] + [None]
    noises[6] = noises[5].copy()  # a stale step, found across a batch boundary
    kw = dict(rate=0.3, shapes=[(x.shape[0] if x is not None else 4, 6, 8) for x in noises],
              training=[True] * 9 + [False, False])
    plain = analyze_site(MemorySite("d", AXES3, noises, **kw))
    batched = analyze_site(_BatchingSite("d", AXES3, noises, **kw))
    assert batched == plain
    assert batched.freshness.identical == 1 and batched.pattern == "time-shared"


def _reference_pairs(steps, calls, replicas, noises):
    """The pairing rule record by record: freshness (same call and replica, the latest earlier
    step's last record) and calls within a step (vs that replica's latest call 0)."""
    last, pending, call0 = {}, {}, {}
    step_now = None
    fresh = [0, 0]
    within = [0, 0]
    for i, (s, c, r) in enumerate(zip(steps, calls, replicas)):
        if s != step_now:
            last.update(pending)
            pending, call0, step_now = {}, {}, s
        prev = last.get((c, r))
        if prev is not None and steps[prev] != s:
            fresh[0] += 1
            fresh[1] += bool(np.array_equal(noises[prev], noises[i]))
        pending[(c, r)] = i
        if c == 0:
            call0[r] = i
        elif r in call0:
            within[0] += 1
            within[1] += bool(np.array_equal(noises[call0[r]], noises[i]))
    return fresh, within


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40),
       max_bytes=st.sampled_from([1, 5, 1 << 20]))
def test_streamed_pairing_matches_the_record_by_record_rule(seed, n, max_bytes):
    from dropspy.analysis._scan import scan_site

    rng = np.random.default_rng(seed)
    pool = [rng.random((3, 5)) >= 0.5 for _ in range(3)]  # few masks: repeats are common
    steps = np.cumsum(rng.random(n) < 0.4).tolist()
    if n > 3:
        steps[n // 2] = max(0, steps[n // 2] - 2)  # a step back
    calls = rng.integers(0, 3, n).tolist()
    replicas = rng.integers(0, 2, n).tolist()
    noises = [pool[k] for k in rng.integers(0, 3, n)]
    site = MemorySite("d", ("batch", "feature"), noises, rate=0.5, steps=steps, calls=calls,
                      replicas=replicas)
    s = scan_site(site, max_bytes=max_bytes)
    fresh, within = _reference_pairs(steps, calls, replicas, noises)
    assert [s.fresh.pairs, s.fresh.identical] == fresh
    assert [s.calls.pairs, s.calls.identical] == within
