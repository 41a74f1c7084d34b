"""Keras 3 on the JAX and torch backends: exact masks and bit-identical training.

KERAS_BACKEND is fixed per process once keras is imported (here: TensorFlow), so each backend
runs ``backend_driver.py`` once in a subprocess (module-scoped fixture) and the tests assert
on the JSON it prints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each backend's subprocess imports keras and trains twice: about a minute on 2 busy cores.
pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("backend_driver.py")
REPO = Path(__file__).resolve().parents[3]
BACKENDS = [
    pytest.param("jax", marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                                 reason="needs jax")),
    pytest.param("torch", marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                                   reason="needs torch")),
]


def run_driver(backend: str, scenarios: str, workdir: Path, **env: str) -> dict:
    environ = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **env)
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(DRIVER), scenarios, str(workdir)], env=environ,
                         capture_output=True, text=True, timeout=400)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("DRIVER-RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout[-2000:], out.stderr[-4000:])
    return json.loads(lines[-1][len("DRIVER-RESULT "):])


# What each subprocess runs (Keras' torch backend has no steps_per_execution > 1).
SCENARIOS = {"jax": "fit,exact,spe,reattach", "torch": "fit,exact,reattach",
             "tensorflow": "mirrored,spe", "jax-dp": "dataparallel"}
_RESULTS: dict[str, dict] = {}


def _result(key: str, tmp_path_factory) -> dict:
    """The driver output of one subprocess (a backend, or ``jax-dp``), run once per session."""
    if key not in _RESULTS:
        workdir = tmp_path_factory.mktemp(f"keras_{key}")
        env = {}
        if key == "jax-dp":
            # Two host devices, and the optimized HLO of each step written where the driver
            # counts its collectives; both read by XLA when jax starts in the subprocess.
            env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count=2 "
                                f"--xla_dump_to={workdir / 'hlo'} --xla_dump_hlo_as_text "
                                f"--xla_dump_hlo_module_re=.*(train_step|step_fn).*")
        _RESULTS[key] = run_driver(key.split("-")[0], SCENARIOS[key], workdir, **env)
    return _RESULTS[key]


@pytest.fixture(scope="module", params=BACKENDS)
def backend_result(request, tmp_path_factory):
    return request.param, _result(request.param, tmp_path_factory)


def test_fit_weights_seed_states_and_global_rng_bit_identical_with_and_without_record(
        backend_result):
    backend, result = backend_result
    fit = result["fit"]
    assert fit["backend"] == backend
    assert fit["n_weights"] == 5 and fit["weights_equal"]
    assert fit["n_seed_states"] == 3 and fit["seed_states_equal"]
    assert fit["global_rng_equal"]


def test_the_keras_adapter_claims_the_model_and_the_torch_adapter_does_not(backend_result):
    backend, result = backend_result
    assert result["fit"]["claimed_by"] == "KerasAdapter"
    if backend == "torch":
        assert result["fit"]["torch_adapter_claims"] is False


def test_fit_and_train_on_batch_record_every_step_of_every_site(backend_result):
    _, result = backend_result
    fit = result["fit"]
    expected_sites = {"sd", "out"} | {f"lstm/{role}/{g}" for role in ("input", "recurrent")
                                      for g in "ifco"}
    assert set(fit["records"]) == expected_sites
    # 4 fit batches (the last one partial) + 2 train_on_batch calls
    assert all(steps == list(range(6)) for steps in fit["steps"].values()), fit["steps"]
    assert not fit["opaque"] and not fit["dropped"] and fit["complete"]


def test_jax_train_on_batch_reuses_the_traced_step(backend_result):
    backend, result = backend_result
    if backend != "jax":
        pytest.skip("torch steps are eager: nothing is traced")
    # fit traces once per batch shape (full, partial); train_on_batch once more (Keras feeds
    # it another data structure, x, y, None) and then never again: its 2 calls share 1 trace.
    assert result["fit"]["traces"] == 3


def test_second_and_third_record_reuse_the_jitted_train_step(backend_result):
    backend, result = backend_result
    traces = result["reattach"]["traces"]
    if backend == "torch":   # eager: the step body runs at every step, kept or not
        assert traces["kept"] == traces["fresh"] == [2, 2, 2]
        return
    # train_step bodies run per context: once, then never (a model that drops its kept
    # functions before each context traces every time: the counter sees traces).
    assert traces["kept"] == [1, 0, 0] and traces["fresh"] == [1, 1, 1]


def test_training_across_record_contexts_with_unrecorded_fits_is_bit_identical(
        backend_result):
    _, result = backend_result
    reattach = result["reattach"]
    assert reattach["weights_equal"] and reattach["n_weights"] >= 10   # + optimizer state
    assert reattach["seed_states_equal"]


def test_masks_of_kept_functions_equal_a_fresh_trace_and_go_to_each_context_file(
        backend_result):
    _, result = backend_result
    reattach = result["reattach"]
    assert reattach["masks_equal_fresh"] == [True, True, True]
    assert reattach["steps"] == [{"sd": [0, 1], "out": [0, 1]}] * 3
    assert reattach["differ_between_contexts"]


@pytest.mark.parametrize("site", ["plain", "spatial", "seeded"])
def test_masks_match_the_backends_own_dropout_arithmetic_with_planted_zeros(backend_result,
                                                                             site):
    _, result = backend_result
    check = result["exact"]["checks"][site]
    assert check["exact"] == [True, True, True]
    assert check["kept_zeros"]   # a mask guessed from output == 0 would fail here
    assert check["noise_shape"] == ([8, 1, 4] if site == "spatial" else [8, 6, 4])
    assert 0.3 < check["keep_fraction"] < 0.95


@pytest.fixture(scope="module")
def mirrored_result(tmp_path_factory):
    return _result("tensorflow", tmp_path_factory)["mirrored"]


def test_mirrored_two_replicas_fit_is_bit_identical_with_and_without_record(mirrored_result):
    assert mirrored_result["n_weights"] == 5 and mirrored_result["weights_equal"]
    assert mirrored_result["n_seed_states"] == 3 and mirrored_result["seed_states_equal"]
    assert not mirrored_result["dropped"]


def test_mirrored_masks_are_kept_per_replica_not_averaged(mirrored_result):
    # 16 samples, global batch 8: 2 steps, each drawn once on each of the 2 replicas.
    assert len(mirrored_result["per_replica"]) == 10
    assert all(counts == {"0": 2, "1": 2} for counts in mirrored_result["per_replica"].values())
    identical, pairs = mirrored_result["identical_across_replicas"]
    assert pairs == 20
    # What Keras 3 does (README findings): both replicas read one mirrored seed state.
    assert identical == pairs


def test_mirrored_predict_masks_are_exact_per_replica_with_planted_zeros(mirrored_result):
    assert mirrored_result["mc_replicas"] == [0, 1]
    assert mirrored_result["mc_exact"] == [True, True]
    assert mirrored_result["mc_kept_zeros"]


@pytest.fixture(params=["tensorflow", pytest.param("jax", marks=BACKENDS[0].marks)])
def spe_result(request, tmp_path_factory):
    return _result(request.param, tmp_path_factory)["spe"]


def test_steps_per_execution_4_records_every_inner_step_equal_to_spe_1(spe_result):
    # 10 steps in executions of 4, 4 and 2: every inner step's masks equal the spe=1 run's.
    assert spe_result["records"]["4"] == spe_result["records"]["1"]
    assert all(n == 10 for n in spe_result["records"]["4"].values())
    assert spe_result["steps4"] == list(range(10))
    assert spe_result["same_masks"] == [100, 100]
    assert not spe_result["dropped"]


def test_steps_per_execution_4_training_is_bit_identical_with_and_without_record(spe_result):
    assert spe_result["n_weights"] == 5 and spe_result["weights_equal"]
    assert spe_result["seed_states_equal"]


@pytest.fixture(scope="module")
def dp_result(tmp_path_factory):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("needs jax")
    return _result("jax-dp", tmp_path_factory)["dataparallel"]


def test_jax_dataparallel_fit_is_bit_identical_with_and_without_record(dp_result):
    assert dp_result["devices"] == 2
    assert dp_result["n_weights"] == 5 and dp_result["weights_equal"]
    assert dp_result["n_seed_states"] == 3 and dp_result["seed_states_equal"]
    assert not dp_result["dropped"]


def test_jax_dataparallel_recording_adds_no_collective_to_the_compiled_step(dp_result):
    # fit's full and partial batch and train_on_batch: 3 compiled steps each, and each
    # recorded step has exactly the plain step's collectives (the gradient all-reduce).
    plain, recorded = dp_result["collectives"]["plain"], dp_result["collectives"]["recorded"]
    assert len(plain) == len(recorded) == 3
    assert recorded == plain
    assert all(c["all-reduce"] >= 1 for c in plain)


def test_jax_dataparallel_records_the_global_mask_equal_to_a_single_device_run(dp_result):
    # One record per draw (replica 0) holding the whole batch: the same 60 masks, bit for bit,
    # as the same model, seed and data drew on one device.
    assert all(n == 6 for n in dp_result["records"].values()) and len(dp_result["records"]) == 10
    assert dp_result["replicas"] == [0]
    assert dp_result["same_as_single_device"] == [60, 60]
    # ...while the training itself differs from one device's (the gradients are summed in
    # another order): the masks agree because they do not depend on the sharding.
    assert dp_result["single_device_weights_equal"] is False
    # The devices' rows are slices of one draw, not one mask repeated (MirroredStrategy's
    # replicas draw identical masks): equal halves only where few bits coincide by chance.
    same, pairs = dp_result["halves_identical"]
    assert pairs == 60 and same <= pairs // 10


def test_jax_dataparallel_masks_stay_sharded_as_the_distribution_attribute_says(dp_result):
    dist = dp_result["distribution"]
    assert dist["kind"] == "DataParallel" and dist["batch_axis"] == "batch"
    assert dist["devices"] == ["cpu:0", "cpu:1"]
    assert dp_result["problems"] == []   # the attribute as schemas/run.schema.json lays it out
    # Every batch-sharded mask left the step with rows block k on device k.
    ok, checked = dp_result["row_blocks"]
    assert checked == 60 and ok == checked


@pytest.mark.parametrize("site", ["plain", "spatial", "seeded"])
def test_jax_dataparallel_masks_match_the_sharded_steps_outputs_with_planted_zeros(dp_result,
                                                                                    site):
    check = dp_result["exact"][site]
    assert check["exact"] == [True, True, True]
    assert check["kept_zeros"]


def test_jax_model_parallel_is_refused_naming_it(dp_result):
    refused = dp_result["model_parallel_refused"]
    assert refused and "ModelParallel" in refused and "DataParallel" in refused
