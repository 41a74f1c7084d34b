"""torch.compile (inductor, CPU) recorded exactly: a post-grad pass taps each mask node.

Compiles are slow on CPU (tens of seconds each), so one module-scoped run per compile style
serves several tests: the plain and the recorded training start from the same seeds.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch._inductor")

import dropspy
from dropspy.errors import DropspyWarning, UnsupportedModelError

nn = torch.nn
F = torch.nn.functional
P_DROP, P_FUNC, P_2D = 0.3, 0.1, 0.25


class Net(nn.Module):
    """Dropout, a functional dropout and a feature dropout; returns what each got and gave."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(P_DROP)
        self.d2 = nn.Dropout2d(P_2D)
        self.out = nn.Linear(8, 1)

    def forward(self, x: Any) -> Any:
        h = torch.relu(self.fc(x))  # exact zeros in the dropout's input
        y = self.drop(h)
        z = F.dropout(y, P_FUNC, training=self.training)
        f = self.d2(z.reshape(-1, 2, 2, 2))
        return self.out(f.reshape(-1, 8)).sum(), h, y, z, f


def _train(compile_fn: Any, path: Path | None, batches: list[int], warmup: bool = True,
           **compile_kw: Any) -> dict:
    torch.manual_seed(0)
    net = Net()
    model = compile_fn(net, **compile_kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.manual_seed(1)
    if warmup:  # compiled and run before record(): dropspy must swap the compile in
        model(torch.randn(4, 8))[0].backward()
        opt.step()
        opt.zero_grad()
    original = model.__dict__.get("forward", model.__dict__.get("_compiled_call_impl"))
    seen = []
    rec = dropspy.record(model, path) if path else None
    if rec is not None:
        rec.__enter__()
    try:
        for n in batches:
            out = model(torch.randn(n, 8))
            out[0].backward()
            opt.step()
            opt.zero_grad()
            seen.append([t.detach() for t in out[1:]])
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)
    after = model.__dict__.get("forward", model.__dict__.get("_compiled_call_impl"))
    return {"params": [p.detach().clone() for p in net.parameters()],
            "rng": torch.get_rng_state(), "seen": seen, "restored": after is original}


def _torch_compile(net: Any, **kw: Any) -> Any:
    return torch.compile(net, **kw)


def _method_compile(net: Any, **kw: Any) -> Any:
    net.compile(**kw)
    return net


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    # Every test compiles Net.forward anew; Dynamo's cache entries for one code object are
    # limited (recompile_limit), and tests must not spend each other's.
    torch._dynamo.reset()


BATCHES = [4, 4, 6]  # the last step recompiles (a new batch size)


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Any]:
    path = tmp_path_factory.mktemp("compiled") / "run.h5"
    torch._dynamo.reset()
    plain = _train(_torch_compile, None, BATCHES)
    recorded = _train(_torch_compile, path, BATCHES)
    return plain, recorded, dropspy.load(path)


def _assert_exact(run: Any, seen: list, formula: str = "inductor") -> None:
    drop, func, d2 = run["drop"], run["dropout"], run["d2"]
    assert len(drop) == len(func) == len(d2) == len(seen)
    for i, (h, y, z, f) in enumerate(seen):
        m = torch.from_numpy(drop.mask(i))
        expected = (h * m) * (1 / (1 - P_DROP)) if formula == "inductor" else (
            h * m * (1 / (1 - P_DROP)))
        assert torch.equal(y, expected)
        assert (h == 0).any()
        mf = torch.from_numpy(func.mask(i))
        assert torch.equal(z, (y * mf) * (1 / (1 - P_FUNC)) if formula == "inductor" else (
            y * mf * (1 / (1 - P_FUNC))))
        noise = torch.from_numpy(d2.noise(i)).float()
        assert d2.noise(i).shape == (z.shape[0], 2, 1, 1)
        assert torch.equal(f, z.reshape(-1, 2, 2, 2) * (noise / (1 - P_2D)))


def test_compiled_masks_are_exact_on_every_site(optimized: tuple) -> None:
    _, recorded, run = optimized
    assert not any("copied out no dropout mask" in n for n in run.notes)
    assert run.records_dropped.get("capture_error", 0) == 0
    assert run.sites == ("drop", "dropout", "d2")  # the eager model's own names
    assert run["drop"].extra["compiled"] == "inductor"
    _assert_exact(run, recorded["seen"])


def test_compiled_training_is_bit_identical_with_dropspy(optimized: tuple) -> None:
    plain, recorded, _ = optimized
    for a, b in zip(plain["params"], recorded["params"]):
        assert torch.equal(a, b)
    assert torch.equal(plain["rng"], recorded["rng"])
    for a, b in zip(plain["seen"], recorded["seen"]):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_compiled_steps_are_optimizer_steps_across_a_recompile(optimized: tuple) -> None:
    _, _, run = optimized
    assert run["drop"].steps.tolist() == [0, 1, 2]
    assert [tuple(s) for s in run["drop"].shapes] == [(4, 8), (4, 8), (6, 8)]


def test_the_users_compile_is_put_back_on_exit(optimized: tuple) -> None:
    _, recorded, run = optimized
    assert recorded["restored"]
    assert run.attrs["wrapper"] == "OptimizedModule"


def test_inference_graph_of_module_compile_is_recorded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    net.compile()
    x = torch.randn(4, 8)
    seen = []
    with dropspy.record(net, tmp_path / "run.h5"), torch.no_grad():
        for _ in range(2):
            seen.append(net(x)[1:])
    run = dropspy.load(tmp_path / "run.h5")
    assert run.attrs["wrapper"] == "module.compile()"
    assert "_compiled_call_impl" in net.__dict__ and net._compiled_call_impl is not None
    _assert_exact(run, seen)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{"fullgraph": True, "dynamic": True}], ids=["fullgraph-dynamic"])
def test_fullgraph_dynamic_compile_is_exact_and_unperturbed(tmp_path: Path, kw: dict) -> None:
    plain = _train(_method_compile, None, [4, 6], warmup=False, **kw)
    recorded = _train(_method_compile, tmp_path / "run.h5", [4, 6], warmup=False, **kw)
    run = dropspy.load(tmp_path / "run.h5")
    # One graph for both batch sizes: the feature dropout's applied shape is read at run time.
    assert run["drop"].steps.tolist() == [0, 1]
    assert [tuple(s) for s in run["d2"].shapes] == [(4, 2, 2, 2), (6, 2, 2, 2)]
    assert run.records_dropped.get("capture_error", 0) == 0
    _assert_exact(run, recorded["seen"])
    for a, b in zip(plain["params"], recorded["params"]):
        assert torch.equal(a, b)
    assert torch.equal(plain["rng"], recorded["rng"])


@pytest.mark.slow
def test_fallback_random_compile_records_eagers_masks(tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        plain = _train(_torch_compile, None, [4], warmup=False)
        recorded = _train(_torch_compile, tmp_path / "run.h5", [4], warmup=False)
    run = dropspy.load(tmp_path / "run.h5")
    assert run["drop"].extra["formula"] == "x * mask * (1 / (1 - p))"
    _assert_exact(run, recorded["seen"], formula="eager")
    for a, b in zip(plain["params"], recorded["params"]):
        assert torch.equal(a, b)
    assert torch.equal(plain["rng"], recorded["rng"])


def test_a_backend_dropspy_cannot_instrument_gives_opaque_sites_and_a_warning(
        tmp_path: Path) -> None:
    plain = _train(_torch_compile, None, [4], warmup=False, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorded = _train(_torch_compile, tmp_path / "run.h5", [4], warmup=False,
                          backend="aot_eager")
    assert any(issubclass(w.category, DropspyWarning) and "aot_eager" in str(w.message)
               for w in caught)
    run = dropspy.load(tmp_path / "run.h5")
    assert set(run.sites) == {"drop", "d2"}
    assert all("aot_eager" in run[s].opaque for s in run.sites)
    for a, b in zip(plain["params"], recorded["params"]):
        assert torch.equal(a, b)
    assert torch.equal(plain["rng"], recorded["rng"])


def test_recording_a_compiled_model_again_reuses_its_compiled_code(tmp_path: Path) -> None:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch.manual_seed(0)
    net = Net()
    model = torch.compile(net)
    counts = []
    for k in range(3):
        with dropspy.record(model, tmp_path / f"run{k}.h5"), torch.no_grad():
            model(torch.randn(4, 8))
        counts.append(len(_debug_get_cache_entry_list(Net.forward.__code__)))
        assert len(dropspy.load(tmp_path / f"run{k}.h5")["drop"]) == 1
    assert counts[0] == counts[1] == counts[2]


def test_dropout_that_dynamo_leaves_to_eager_is_said_not_recorded(tmp_path: Path) -> None:
    class Eager(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        @torch._dynamo.disable
        def forward(self, x: Any) -> Any:
            return self.drop(x)

    model = torch.compile(Eager())
    with pytest.warns(DropspyWarning, match="drop should apply one.*not recorded"):
        with dropspy.record(model, tmp_path / "run.h5"):
            model(torch.randn(4, 8))
    assert any("outside inductor's graphs" in n for n in dropspy.load(tmp_path / "run.h5").notes)


def test_a_dynamo_cache_at_its_limit_gives_opaque_sites_not_another_compile(
        tmp_path: Path) -> None:
    model = torch.compile(Net())
    users = model.__dict__["forward"]
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.warns(DropspyWarning, match="recompile_limit"):
            with dropspy.record(model, tmp_path / "run.h5"):
                assert model.__dict__["forward"] is users  # no swap, no extra compile
    run = dropspy.load(tmp_path / "run.h5")
    assert set(run.sites) == {"drop", "d2"}
    assert all("recompile_limit" in run[s].opaque for s in run.sites)


def test_a_compiled_submodule_of_an_eager_model_is_refused_by_name(tmp_path: Path) -> None:
    outer = nn.Sequential(nn.Linear(4, 4), torch.compile(nn.Dropout(0.5)))
    with pytest.raises(UnsupportedModelError, match="compile'd submodule.*'1'"):
        dropspy.record(outer, tmp_path / "run.h5").__enter__()


class RNNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 4, num_layers=2, dropout=0.5)

    def forward(self, x: Any) -> Any:
        return self.rnn(x)[0]


@pytest.mark.slow
def test_an_lstm_left_to_eager_by_dynamo_is_an_opaque_site(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.compile(RNNNet())
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(3, 2, 4))
    run = dropspy.load(tmp_path / "run.h5")
    assert "allow_rnn" in run["rnn/between_layers"].opaque
    assert np.isclose(run["rnn/between_layers"].rate, 0.5)
