"""DistributedDataParallel and FSDP (fully_shard, and the legacy wrapper) recorded per rank:
2 processes on gloo, 127.0.0.1.

One spawn of two ranks runs every scenario (plain and recorded from the same seeds); the
tests read what the ranks saved. Exactness is per rank, against the inner dropout module's
input and output; zero perturbation is bit-identical weights and RNG state.
"""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch built without distributed", allow_module_level=True)

import _ddp_worker

import dropspy
from dropspy.records import DIST_ATTRS

SCENARIOS = ["plain", "static_graph", "unused", "accum", "sampling", "fsdp2", "fsdp1"]
P = 0.4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out: Path, scenarios: list[str], timeout: float = 240) -> list[int | None]:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker.main, args=(r, 2, port, str(out), scenarios))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    codes = _spawn(out, SCENARIOS)
    assert codes == [0, 0], f"rank exit codes {codes}"
    return out


def _path(out: Path, scenario: str, rank: int) -> Path:
    if scenario == "sampling":
        return out / f"sampling-{rank}.h5"
    return out / f"{scenario}.rank{rank}.h5"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_records_its_own_masks_exactly(ddp_out: Path, scenario: str, rank: int) -> None:
    saved = np.load(ddp_out / f"{scenario}.rank{rank}.npz")
    run = dropspy.load(_path(ddp_out, scenario, rank))
    assert run.sites == ("drop",)  # the inner module's name: no "module." prefix
    site = run["drop"]
    calls = len([k for k in saved.files if k.startswith("x/")])
    every = 2 if (scenario == "sampling" and rank == 1) else 1
    micro = 2 if scenario == "accum" else 1
    assert calls == 4 * micro
    steps = sorted(set(int(s) for s in site.steps))
    assert steps == [s for s in range(4) if s % every == 0]  # one step = one optimizer step
    assert len(site) == len(steps) * micro
    for i, (step, call) in enumerate(zip(site.steps, site.calls)):
        k = int(step) * micro + int(call)
        x, y = saved[f"x/{k}"], saved[f"y/{k}"]
        mask = site.mask(i)
        assert mask.shape == x.shape
        np.testing.assert_array_equal(y, x * mask * np.float32(1 / (1 - P)))
        assert (x == 0).any()


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("rank", [0, 1])
def test_recorded_ddp_training_is_bit_identical(ddp_out: Path, scenario: str, rank: int) -> None:
    saved = np.load(ddp_out / f"{scenario}.rank{rank}.npz")
    names = [k[len("plain/"):] for k in saved.files if k.startswith("plain/")]
    assert names
    for name in names:
        np.testing.assert_array_equal(saved[f"plain/{name}"], saved[f"rec/{name}"], err_msg=name)
    np.testing.assert_array_equal(saved["plain_rng"], saved["rec_rng"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rank_files_carry_rank_world_size_and_one_run_id(ddp_out: Path, scenario: str) -> None:
    attrs = [dropspy.load(_path(ddp_out, scenario, r)).attrs for r in range(2)]
    for r, a in enumerate(attrs):
        assert a["rank"] == r and a["world_size"] == 2 and a["local_rank"] == r
        assert a["dist_backend"] == "gloo"
        assert set(DIST_ATTRS) <= set(a)
    assert attrs[0]["run_id"] == attrs[1]["run_id"]
    assert not (ddp_out / f"{scenario}.h5").exists()  # never the shared, unsuffixed path


def test_ranks_seeded_alike_draw_the_same_masks(ddp_out: Path) -> None:
    runs = [dropspy.load(_path(ddp_out, "plain", r)) for r in range(2)]
    a, b = (r["drop"] for r in runs)
    assert len(a) == len(b) == 4
    for i in range(4):
        np.testing.assert_array_equal(a.mask(i), b.mask(i))


@pytest.mark.slow
def test_a_killed_rank_leaves_its_file_readable_and_the_other_untouched(tmp_path: Path) -> None:
    codes = _spawn(tmp_path, ["kill"], timeout=120)
    assert codes[1] == 3 and codes[0] == 0
    alive = dropspy.load(tmp_path / "kill.rank0.h5")
    dead = dropspy.load(tmp_path / "kill.rank1.h5")
    assert alive.complete and len(alive["drop"]) == 3
    assert not dead.complete
    assert 1 <= len(dead["drop"]) <= 3
    for i in range(len(dead["drop"])):
        np.testing.assert_array_equal(dead["drop"].mask(i), alive["drop"].mask(i))
