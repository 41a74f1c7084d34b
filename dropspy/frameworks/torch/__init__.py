"""PyTorch: eager ``nn.Module`` training, recorded through module hooks and a function mode.

Modules by role (the same names in every framework package):

- ``adapter``: :class:`TorchAdapter`, the lifecycle (claims a model, attaches, steps, detaches).
- ``sites``: which modules and calls are sites, their names, axes and facts.
- ``capture``: the function mode that sees dropout calls and takes their exact masks.
- ``composite``, ``grab``: masks drawn inside composite ops (RNNs, attention) via dispatch.
- ``pack``: masks bit-packed on the device before they leave it.
"""

from __future__ import annotations

from dropspy.frameworks.torch.adapter import AUTO_MAX_FORWARDS, TorchAdapter

__all__ = ["TorchAdapter", "AUTO_MAX_FORWARDS"]
