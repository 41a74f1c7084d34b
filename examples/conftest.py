"""Setup for running the examples' tests from a checkout.

torch is imported before tensorflow when both are installed: in one process the other order
can crash (Keras' own test setup does the same).

With dropspy installed (``pip install dropspy``) its pytest plugin provides the
``dropspy_record`` fixture to every test suite; from a bare checkout (``python -m pytest``
without installing) the plugin is not registered, so the fixture is imported here instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if importlib.util.find_spec("torch") is not None:
    import torch  # noqa: F401  (import order matters, see above)

if not any(ep.name == "dropspy" for ep in importlib.metadata.entry_points(group="pytest11")):
    from dropspy.testing import dropspy_record  # noqa: F401
