"""Shared test setup.

torch is imported before tensorflow when both are installed: in one process the other order can
crash (Keras' own test setup does the same).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# Tests mirror the package in subfolders; the shared helpers (_synth, _keras_util,
# fake_adapter...) live here, importable from every one of them.
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401  (import order matters, see above)
