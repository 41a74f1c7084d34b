"""The framework-free vocabulary: the per-rank path rule."""

from __future__ import annotations

import os

import pytest

from dropspy.records import rank_path


@pytest.mark.parametrize(("path", "rank", "world", "expected"), [
    ("run.h5", 1, 2, "run.rank1.h5"),
    (os.path.join("out", "run.h5"), 0, 4, os.path.join("out", "run.rank0.h5")),
    ("run", 3, 4, "run.rank3"),
    (os.path.join("a.b", "run.x.h5"), 1, 2, os.path.join("a.b", "run.x.rank1.h5")),
])
def test_rank_suffix_goes_before_the_suffix_when_world_size_above_one(
        path: str, rank: int, world: int, expected: str) -> None:
    assert rank_path(path, rank, world) == expected


def test_single_process_keeps_the_path_as_given() -> None:
    assert rank_path("run.h5", 0, 1) == "run.h5"


@pytest.mark.parametrize("world", [1, 8])
def test_rank_placeholder_is_replaced_whatever_the_world_size(world: int) -> None:
    assert rank_path("runs/{rank}/masks-{rank}.h5", 5, world) == "runs/5/masks-5.h5"


def test_every_rank_gets_its_own_path() -> None:
    paths = {rank_path("run.h5", r, 16) for r in range(16)}
    assert len(paths) == 16 and "run.h5" not in paths
