"""Data-parallel wrappers and the facts of the process group, for the torch adapter.

DistributedDataParallel runs the wrapped module in its own process (``self.module(...)``)
and the optimizer steps the wrapped module's parameters, so recording the inner module in
every rank records exactly what that rank applied. Each rank writes its own file (see
:func:`dropspy.records.rank_path`): nothing on the recording path talks to other ranks. A
gather of masks measured 18-24% of a DDP step on 2 gloo ranks, and it would hang the job
the first time two ranks sample different steps.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any, cast

import torch

from dropspy.errors import UnsupportedModelError

__all__ = ["unwrap", "dist_meta", "named_modules"]


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, str | None]:
    """The module whose forward applies the masks, and the wrapper's name (None: unwrapped).

    Site names come from the returned module, so a DDP model's sites carry no ``module.``
    prefix and match the same model recorded without DDP.

    Raises:
        UnsupportedModelError: A ``DataParallel`` over several devices (replicas run on other
            threads).
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, "DistributedDataParallel"
    if isinstance(model, DataParallel):
        if len(model.device_ids or []) > 1:
            raise UnsupportedModelError(
                f"dropspy cannot record torch.nn.DataParallel over {len(model.device_ids)} "
                f"devices: it runs one replica per device on threads of its own, where "
                f"dropspy's capture is not active. Use DistributedDataParallel (one process "
                f"per device; each rank writes its own run file), or record the plain module "
                f"on one device: dropspy.record(model.module, ...).")
        # On CPU or one device DataParallel calls self.module(...) directly: nothing to split.
        return model.module, "DataParallel"
    if _is_fsdp1(model):
        # Its forward unshards, then calls the wrapped module: recorded like DDP. Nested
        # units' ``_fsdp_wrapped_module.`` is left out of names (see named_modules).
        # torch types FSDP1's wrapped module as Tensor | Module; it is always a Module.
        return cast(torch.nn.Module, model.module), "FullyShardedDataParallel"
    return model, None


def _is_fsdp1(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)


# Module names wrappers insert into a model's paths (legacy FSDP units, activation
# checkpointing): site names leave them out, so they match the unwrapped model's.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def named_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``model.named_modules()`` with wrapper path parts left out of the names."""
    for name, module in model.named_modules():
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        for part in _WRAPPER_PARTS:
            if name.endswith(part[:-1]):
                name = name[:-len(part)].rstrip(".")
        yield name, module


def dist_meta() -> dict[str, Any]:
    """Root attributes that place this process in its job: rank, world size, backend, run id.

    Read from ``torch.distributed`` when a default process group exists, else from the
    launcher's environment (``RANK``/``WORLD_SIZE``, as torchrun sets them). Reading them
    talks to no other rank.
    """
    rank, world, backend = 0, 1, ""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
    else:
        try:
            rank = int(os.environ.get("RANK", 0))
            world = int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            rank, world = 0, 1
    if world <= 1:
        return {"rank": rank, "world_size": world}
    meta: dict[str, Any] = {"rank": rank, "world_size": world, "dist_backend": backend}
    try:
        meta["local_rank"] = int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        meta["local_rank"] = -1  # the launcher did not say (torch.multiprocessing.spawn)
    run_id = _run_id(world)
    if run_id is not None:
        meta["run_id"] = run_id
    return meta


def _run_id(world: int) -> str | None:
    """An id every rank of one job computes alike without talking to the others.

    torchrun's ``TORCHELASTIC_RUN_ID`` when set; else the rendezvous address every rank was
    given (``MASTER_ADDR:MASTER_PORT``) with the world size, hashed. Two jobs launched one
    after the other on the same address and port share it; ``started`` tells them apart.
    """
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if elastic and elastic != "none":
        return elastic
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    digest = hashlib.sha1(f"{addr}:{port}:{world}".encode()).hexdigest()[:16]
    return f"{addr}:{port}/{digest}"
