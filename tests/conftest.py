"""Shared test setup.

torch is imported before tensorflow when both are installed: in one process the other order can
crash (Keras' own test setup does the same).
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401  (import order matters, see above)
