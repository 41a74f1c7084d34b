"""Bit-packing of one step's masks: on the host with numpy, on a GPU with torch ops.

The packed layout is the store's: ``np.packbits(noise.ravel(), bitorder="big")`` per record.
On a GPU all masks of a step are packed into one device buffer (each record byte-aligned) and
copied to pinned host memory without blocking; the copy is collected at the next step end, so
the training stream never waits for the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def pack_torch(masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Pack bool masks into one uint8 tensor on their device.

    A uint8 tensor in ``masks`` is taken as already packed (see :func:`pack_early`).

    Returns:
        The packed bytes and the byte offset of each mask (a last entry marks the end).
    """
    device = masks[0].device
    weights = _BIT_WEIGHTS.get(device)
    if weights is None:
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)
        _BIT_WEIGHTS[device] = weights
    parts, offsets, at = [], [0], 0
    for m in masks:
        if m.dtype != torch.bool and m.dtype != torch.uint8:
            m = m != 0  # dropout noise as torch draws it: kept elements are nonzero
        if m.dtype == torch.uint8:
            parts.append(m)
            at += m.numel()
        else:
            flat = m.reshape(-1).to(torch.uint8)
            pad = (-flat.numel()) % 8
            if pad:
                flat = torch.cat([flat, flat.new_zeros(pad)])
            parts.append((flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8))
            at += flat.numel() // 8
        offsets.append(at)
    packed = torch.cat(parts) if len(parts) > 1 else parts[0]
    return packed, offsets


def pack_early(mask: torch.Tensor) -> torch.Tensor:
    """Pack one bool mask now, on its device (bounds the memory a long step holds)."""
    return pack_torch([mask])[0]


def pack_host(mask: torch.Tensor) -> np.ndarray:
    """Pack one CPU mask with numpy (the store's bit order); uint8 is already packed."""
    if mask.dtype == torch.uint8:
        return mask.numpy().copy()
    if mask.dtype != torch.bool:
        mask = mask != 0  # dropout noise as torch draws it: kept elements are nonzero
    return np.packbits(mask.reshape(-1).numpy())


class DeviceCopy:
    """Masks of one step packed on a GPU and on their way to pinned host memory."""

    def __init__(self, masks: Sequence[torch.Tensor]) -> None:
        packed, self.offsets = pack_torch(masks)
        self.host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
        self.host.copy_(packed, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        self._keep = packed  # the source must outlive the asynchronous copy

    def result(self) -> list[np.ndarray]:
        """Wait for the copy and split it into one packed array per mask."""
        self.event.synchronize()
        data = self.host.numpy()
        return [data[a:b].copy() for a, b in zip(self.offsets[:-1], self.offsets[1:])]
