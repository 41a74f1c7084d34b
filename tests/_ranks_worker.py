"""Worker of the real 2-rank run-set test: DDP on gloo (127.0.0.1), two recorded runs per rank.

``same/``: every rank seeds its dropout stream alike (``torch.manual_seed(1)``), as a script
that seeds once and launches per rank does; ``seeded/``: each rank seeds ``1 + rank``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dropspy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, seed in (("same", 1), ("seeded", 1 + rank)):
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.4),
                                      torch.nn.Linear(32, 4))
            model = DDP(net)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
            torch.manual_seed(seed)
            os.makedirs(os.path.join(out, name), exist_ok=True)
            with dropspy.record(model, os.path.join(out, name, "run.h5")):
                for _ in range(5):
                    model(torch.randn(16, 8, generator=gen)).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
    finally:
        dist.destroy_process_group()
