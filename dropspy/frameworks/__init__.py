"""Framework adapters, found without importing any framework.

An adapter module is imported only when its framework is already in ``sys.modules`` (the user
imported it), so ``import dropspy`` stays framework-free. Keras is checked before torch: under
Keras 3's torch backend every Keras layer is also a ``torch.nn.Module``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from dropspy.errors import UnsupportedModelError

__all__ = ["register_adapter", "find_adapter"]

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


def find_adapter(model: Any) -> type:
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
        cls = getattr(module, class_name)
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
