"""The Keras callback on Keras 3's JAX and torch backends (each in a subprocess: the backend is
fixed when keras is first imported): training bit-identical with and without it, and the same
masks as record() around fit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

DRIVER = Path(__file__).with_name("keras_backend_driver.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow   # a subprocess that imports keras and fits three times: ~1 min on 2 cores
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_callback_is_unperturbed_and_matches_record_on_the_backend(backend, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(DRIVER), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    assert result["weights_identical"] and result["seed_states_identical"]
    assert result["same_masks_as_record"]
    assert result["integration"] == "keras"
    assert "spatial_dropout1d" in result["sites"] and "lstm/recurrent/i" in result["sites"]
    assert all(steps == list(range(6)) for steps in result["steps"].values())
