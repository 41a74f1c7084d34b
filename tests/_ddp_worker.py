"""Worker processes for the 2-rank DDP/FSDP tests (spawned; gloo on 127.0.0.1).

Each rank runs every scenario twice from the same seeds, once plain and once recorded, and
saves what the test compares: final weights, RNG state, and each dropout call's input and
output (taken by a forward hook on the inner dropout module, beside dropspy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _model(torch: Any, unused: bool) -> Any:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 16)
            self.drop = torch.nn.Dropout(0.4)
            self.fc2 = torch.nn.Linear(16, 4)
            self.spare = torch.nn.Linear(16, 4)  # never called: find_unused_parameters

        def forward(self, x: Any) -> Any:
            return self.fc2(self.drop(torch.relu(self.fc1(x))))

    torch.manual_seed(0)
    net = Net()
    if not unused:
        del net.spare
    return net


def _train(torch: Any, scenario: str, rank: int, path: str | None, seen: list | None) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dropspy

    net = _model(torch, unused=scenario == "unused")
    if scenario == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(net.fc1)
        fully_shard(net)
        model = net
    elif scenario == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        cpu = torch.device("cpu")
        net.fc1 = FSDP(net.fc1, device_id=cpu)  # a nested unit: "_fsdp_wrapped_module" names
        model = FSDP(net, device_id=cpu)
    else:
        kwargs = {"static_graph": scenario == "static_graph",
                  "find_unused_parameters": scenario == "unused"}
        model = DDP(net, **kwargs)
    if seen is not None:
        net.drop.register_forward_hook(
            lambda m, a, out: seen.append((a[0].detach().clone(), out.detach().clone())))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    torch.manual_seed(1)  # the dropout stream: alike on every rank
    micro = 2 if scenario == "accum" else 1
    every = 2 if (scenario == "sampling" and rank == 1) else 1
    rec = dropspy.record(model, path, every=every) if path else None
    if rec is not None:
        rec.__enter__()
    try:
        for _ in range(4):
            for k in range(micro):
                x = torch.randn(6, 8, generator=gen)
                x[0, :3] = 0.0  # exact zeros in the input
                if k < micro - 1:
                    with model.no_sync():
                        model(x).square().mean().backward()
                else:
                    model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)
    full = model.state_dict() if scenario == "fsdp1" else net.state_dict()
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in full.items()}
    return {"params": state, "rng": torch.get_rng_state().clone()}


def main(rank: int, world: int, port: int, out: str, scenarios: list[str]) -> None:
    """One rank: init gloo, run ``scenarios``, save results under ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for scenario in scenarios:
            if scenario == "kill":
                _kill(torch, rank, out)
                continue
            path = (os.path.join(out, f"{scenario}-{{rank}}.h5") if scenario == "sampling"
                    else os.path.join(out, f"{scenario}.h5"))
            plain = _train(torch, scenario, rank, None, None)
            seen: list = []
            recorded = _train(torch, scenario, rank, path, seen)
            arrays = {f"plain/{k}": v.numpy() for k, v in plain["params"].items()}
            arrays.update({f"rec/{k}": v.numpy() for k, v in recorded["params"].items()})
            arrays["plain_rng"] = plain["rng"].numpy()
            arrays["rec_rng"] = recorded["rng"].numpy()
            for i, (x, y) in enumerate(seen):
                arrays[f"x/{i}"] = x.numpy()
                arrays[f"y/{i}"] = y.numpy()
            np.savez(os.path.join(out, f"{scenario}.rank{rank}.npz"), **arrays)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Every file is closed and every result saved by now. In one clean CI run a rank that had
    # finished all its scenarios still died at interpreter exit with SIGABRT ("terminate
    # called without an active exception": a C++ thread torn down during static destruction);
    # the parent judges the saved results, so the rank leaves without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _kill(torch: Any, rank: int, out: str) -> None:
    """Train 3 steps; rank 1 then dies (os._exit) inside a recorded forward, no cleanup."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dropspy

    net = _model(torch, unused=False)
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dropspy.record(model, os.path.join(out, "kill.h5")) as rec:
        rec.writer.flush_seconds = 0.05  # so the dying rank has flushed its earlier steps
        for _ in range(3):
            model(torch.randn(6, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        import time
        time.sleep(0.5)
        if rank == 1:
            net.drop.register_forward_hook(lambda *a: os._exit(3))
            with model.no_sync():
                model(torch.randn(6, 8))
