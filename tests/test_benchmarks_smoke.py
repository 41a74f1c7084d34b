"""Each benchmark's smoke mode runs end to end and writes a results JSON with sane values.

These run the scripts in a child process, as a user would (frameworks imported in the
benchmark's own order). No timing is asserted: the numbers of a smoke run on a shared machine
mean nothing; only their presence, types and invariants (ratios positive, at least one bit per
full-entropy element, broadcast masks cheaper than their applied shape) are checked.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _run(script: str, tmp_path: Path, *args: str, timeout: int = 900) -> dict:
    out = tmp_path / "result.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out", str(out), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _finite_positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_writer_smoke_reports_throughput_and_bits_per_element(tmp_path):
    r = _run("bench_writer.py", tmp_path, "--smoke")
    assert r["benchmark"] == "writer" and r["smoke"] is True
    cases = {c["case"]: c for c in r["cases"]}
    assert set(cases) >= {"full_entropy", "rate_0.2", "broadcast_time"}
    for c in cases.values():
        assert _finite_positive(c["elements_per_s"])
        assert c["records"] == c["steps"] * r["sites_per_step"]
        assert c["mask_dataset_bytes"] <= c["file_bytes"]
    full = cases["full_entropy"]
    # Packed full-entropy noise cannot take less than one bit per element.
    assert 1.0 <= full["bits_per_noise_element_masks"] <= full["bits_per_noise_element_file"]
    assert isinstance(r["meets_target"], bool)
    # Broadcast masks are stored at noise shape: far under one bit per applied element.
    b = cases["broadcast_time"]
    assert b["noise_shape"][1] == 1 and b["applied_shape"][1] > 1
    assert b["bits_per_applied_element_file"] < 0.5 * b["bits_per_noise_element_file"]


def test_inspect_small_reports_throughput_and_memory_for_both_layouts(tmp_path):
    results = _run("bench_inspect.py", tmp_path, "--small")
    assert [r["layout"] for r in results] == ["large", "small"]
    for r in results:
        assert r["benchmark"] == "inspect"
        assert _finite_positive(r["mb_per_s"]) and _finite_positive(r["peak_rss_mib"])
        assert _finite_positive(r["mb_per_cpu_s"])
        assert r["records"] > 0 and r["packed_bytes"] > 0
        assert r["targets"]["peak_rss_mib"] == 200


def _check_overhead(fw: dict) -> None:
    variants = fw["variants"]
    assert set(variants) == {"baseline", "every_step", "every_10", "nothing_sampled"}
    for name, v in variants.items():
        assert _finite_positive(v["ms_per_step_median"])
        assert v["ratio"]["n"] == fw["rounds"]
        assert v["ratio"]["min"] <= v["ratio"]["median"] <= v["ratio"]["max"]
        assert len(v["block_seconds"]) == fw["rounds"]
        if name == "baseline":
            assert v["ratio"]["median"] == 1.0
        else:
            assert isinstance(v["target"], float) and isinstance(v["meets_target"], bool)
    every = fw["storage"]["every_step"]
    assert every["steps_recorded"] == every["training_steps"] > 0
    assert every["noise_elements"] > 0 and every["file_bytes"] > every["mask_dataset_bytes"] > 0
    # Rate-0.2 masks cannot be stored in much under their entropy (0.72 bits per element);
    # a smoke run's bytes are mostly chunk allocation, so no upper bound here.
    assert every["bits_per_noise_element_masks"] > 0.5
    assert every["noise_elements"] < every["applied_elements"]   # broadcast sites at noise shape
    none = fw["storage"]["nothing_sampled"]
    assert none["records"] == 0 and none["training_steps"] == every["training_steps"]
    ten = fw["storage"]["every_10"]
    assert 0 < ten["steps_recorded"] < every["steps_recorded"]


@pytest.mark.slow
@pytest.mark.skipif(not _has("torch"), reason="needs torch")
def test_overhead_smoke_torch(tmp_path):
    r = _run("bench_overhead.py", tmp_path, "--smoke", "--framework", "torch", "--threads", "1",
             "--rounds", "10")
    assert r["benchmark"] == "overhead" and "torch" in r and "keras" not in r
    assert r["machine"]["torch"]
    _check_overhead(r["torch"])


@pytest.mark.slow
@pytest.mark.skipif(not _has("torch", "tensorflow", "keras"), reason="needs tensorflow and keras")
def test_overhead_smoke_keras(tmp_path):
    r = _run("bench_overhead.py", tmp_path, "--smoke", "--framework", "keras", "--threads", "1",
             "--rounds", "4")
    assert r["machine"]["tensorflow"] and r["machine"]["keras"]
    _check_overhead(r["keras"])


@pytest.mark.slow
@pytest.mark.skipif(not _has("torch", "tensorflow", "keras"), reason="needs both frameworks")
def test_storage_smoke_both_models(tmp_path):
    r = _run("bench_storage.py", tmp_path, "--smoke")
    for fw in ("keras", "torch"):
        s = r[fw]
        assert s["steps_recorded"] == r["steps"]
        assert _finite_positive(s["bytes_per_step"]) and _finite_positive(s["mask_bytes_per_step"])
        assert s["records"] == sum(site["records"] for site in s["sites"].values())
        # Broadcast sites (SpatialDropout1D, Dropout1d) cost their noise, not the applied shape.
        broadcast = [site for site in s["sites"].values()
                     if site["records"] and site["noise_elements"] < site["applied_elements"]]
        assert broadcast


@pytest.mark.slow
@pytest.mark.skipif(not _has("torch", "tensorflow", "keras"), reason="needs both frameworks")
def test_alternatives_smoke(tmp_path):
    r = _run("bench_alternatives.py", tmp_path, "--smoke", "--threads", "1")
    k = r["keras"]["variants"]
    assert set(k) == {"baseline", "dropspy", "tf_debugger_full_tensor"}
    # The debugger dump holds every tensor of every op: far more than dropspy's packed masks.
    assert k["tf_debugger_full_tensor"]["bytes_per_step"] > k["dropspy"]["bytes_per_step"] > 0
    t = r["torch"]
    if "skipped" in t:
        assert "torchlens" in t["skipped"]
    else:
        assert set(t["variants"]) == {"baseline", "dropspy", "torchlens"}
        assert all(_finite_positive(v["ms_median"]) for v in t["variants"].values())


@pytest.mark.slow
@pytest.mark.skipif(not _has("torch"), reason="needs torch")
def test_scale_smoke_reports_ddp_per_rank_and_compiled_ratios(tmp_path):
    r = _run("bench_scale.py", tmp_path, "--smoke")
    assert r["benchmark"] == "scale" and r["smoke"] is True
    for rank in ("rank0", "rank1"):
        assert r["ddp"][rank]["n"] == 4 and _finite_positive(r["ddp"][rank]["median"])
    assert r["compiled"]["step"]["n"] == 4 and _finite_positive(r["compiled"]["step"]["median"])
    assert all(_finite_positive(t) for t in r["compiled"]["first_step_s"].values())


@pytest.mark.slow
@pytest.mark.skipif(not _has("torch", "transformers"), reason="needs torch and transformers")
def test_torch_models_smoke_reports_ratios_and_cost_per_call(tmp_path):
    r = _run("bench_torch_models.py", tmp_path, "--smoke", "--models",
             "transformer_encoder,awd_lstm")
    assert r["benchmark"] == "torch_models" and set(r["models"]) == {"transformer_encoder",
                                                                     "awd_lstm"}
    for m in r["models"].values():
        assert m["calls_per_step"] > 0 and m["sites"] > 0
        every = m["variants"]["every_step"]
        assert _finite_positive(every["ratio"]["median"]) and "us_per_call" in every
        assert isinstance(every["meets_target"], bool)
        assert m["variants"]["nothing_sampled"]["target"] == 1.01


@pytest.mark.slow
@pytest.mark.skipif(not _has("tensorflow", "keras", "jax", "torch"),
                    reason="needs tensorflow, jax and torch")
def test_keras_backends_smoke_reports_a_ratio_for_every_backend_and_variant(tmp_path):
    r = _run("bench_keras_backends.py", tmp_path, "--smoke", timeout=1500)
    cases = {(c["backend"], c["variant"]) for c in r["results"]}
    assert cases == {("tensorflow", "fit"), ("jax", "fit"), ("torch", "fit"),
                     ("tensorflow", "spe4"), ("jax", "spe4"), ("tensorflow", "mirrored"),
                     ("jax", "dataparallel")}
    for c in r["results"]:
        assert _finite_positive(c["ratio"]["median"]) and c["ratio"]["n"] == r["rounds"]
        assert _finite_positive(c["ms_per_step"])
