"""Framework adapters, found without importing any framework.

An adapter module is imported only when its framework is already in ``sys.modules`` (the user
imported it), so ``import dropspy`` stays framework-free. Keras is checked before torch: under
Keras 3's torch backend every Keras layer is also a ``torch.nn.Module``. The contract every
adapter follows is :class:`~dropspy.frameworks.base.Adapter` (see ``base.py``).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any, cast

from dropspy.errors import UnsupportedModelError
from dropspy.frameworks.base import Adapter, Session

if TYPE_CHECKING:
    # Never imported at run time (that would import every framework): the type checker holds
    # each built-in adapter to the Adapter protocol through this list.
    from dropspy.frameworks.keras import KerasAdapter
    from dropspy.frameworks.tf_keras import TfKerasAdapter
    from dropspy.frameworks.torch import TorchAdapter

    _BUILT_IN: tuple[type[Adapter], ...] = (TfKerasAdapter, KerasAdapter, TorchAdapter)

__all__ = ["register_adapter", "find_adapter", "Adapter", "Session"]

# (module that must already be imported, adapter module, adapter class)
# Keras 2 (tf_keras) before Keras 3, so each claims its own models; both before torch.
_REGISTRY: list[tuple[str, str, str]] = [
    ("tf_keras", "dropspy.frameworks.tf_keras", "TfKerasAdapter"),
    ("keras", "dropspy.frameworks.keras", "KerasAdapter"),
    ("torch", "dropspy.frameworks.torch", "TorchAdapter"),
]


def register_adapter(trigger_module: str, adapter_module: str, adapter_class: str) -> None:
    """Add an adapter, tried after the built-in ones when ``trigger_module`` is imported."""
    entry = (trigger_module, adapter_module, adapter_class)
    if entry not in _REGISTRY:
        _REGISTRY.append(entry)


def find_adapter(model: Any) -> type[Adapter]:
    """Return the adapter class that claims ``model``.

    Raises:
        UnsupportedModelError: No imported framework's adapter claims the model.
    """
    tried: list[str] = []
    seen: set[tuple[str, str]] = set()
    for trigger, module_name, class_name in _REGISTRY:
        if trigger not in sys.modules or (module_name, class_name) in seen:
            continue
        seen.add((module_name, class_name))
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            tried.append(f"{module_name} (cannot import: {exc})")
            continue
        # Registered by name, so the type checker cannot see the class: the Protocol says
        # what it must be, and tests/test_recorder.py holds every built-in adapter to it.
        cls = cast("type[Adapter]", getattr(module, class_name))
        if cls.claims(model):
            return cls
        tried.append(class_name)
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    frameworks = [t for t, _, _ in _REGISTRY if t in sys.modules]
    raise UnsupportedModelError(
        f"No dropspy adapter for this model. Expected a Keras 3 model (keras.Model / "
        f"keras.layers.Layer, TensorFlow backend), a Keras 2 model (tf_keras.Model, or "
        f"tf.keras.Model under TF_USE_LEGACY_KERAS=1) or a torch.nn.Module, with its framework "
        f"imported. Received: {kind} (frameworks imported: {', '.join(frameworks) or 'none'}; "
        f"adapters tried: {', '.join(tried) or 'none'})"
    )
