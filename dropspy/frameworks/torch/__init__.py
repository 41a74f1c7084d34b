"""PyTorch: eager ``nn.Module`` training, recorded through dropout kernels and the Python stack.

Modules by role (the same names in every framework package):

- ``adapter``: :class:`TorchAdapter`, the lifecycle (claims a model, attaches, steps, detaches).
- ``sites``: which modules and calls are sites, their names, axes and facts.
- ``kernels``: dropspy's ATen kernels for ``aten::dropout``/``feature_dropout`` (the
  framework's own arithmetic, keeping the noise) and the few wrapped Python entry points.
- ``capture``: where a call was made (module, line, use), entries per step, hand-made masks.
- ``grab``: a short dispatch mode for the alpha dropouts; where-in-the-code formatting.
- ``pack``: masks bit-packed on the device before they leave it.
- ``distributed``: DDP / FSDP / DataParallel wrappers, the process group's root attributes.
- ``compiled``: ``torch.compile`` (inductor): a post-grad pass taps each mask node.
"""

from __future__ import annotations

from dropspy.frameworks.torch.adapter import AUTO_MAX_FORWARDS, TorchAdapter

__all__ = ["TorchAdapter", "AUTO_MAX_FORWARDS"]
