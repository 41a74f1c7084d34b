"""The torch adapter's lifecycle, steps, attribution, refusals and metadata."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import dropspy
from dropspy.errors import RecordingError, UnsupportedModelError
from dropspy.frameworks.torch import AUTO_MAX_FORWARDS, TorchAdapter
from dropspy.frameworks.torch.pack import pack_torch


def _mlp(p: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Dropout(p), nn.Linear(6, 1))


def _function_modes() -> int:
    return torch._C._len_torch_function_stack()


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _global_optimizer_hooks() -> int:
    from torch.optim import optimizer

    return len(optimizer._global_optimizer_post_hooks)


def test_claims_torch_modules_only():
    assert TorchAdapter.claims(nn.Linear(2, 2))
    assert not TorchAdapter.claims(object())


def test_meta_names_framework_backend_and_devices(tmp_path):
    with dropspy.record(_mlp(), tmp_path / "run.h5") as rec:
        meta = rec.adapter.meta()
    assert meta["framework"] == "torch" and meta["framework_version"] == str(torch.__version__)
    assert meta["backend"] == "cpu" and meta["devices"] == ["cpu"]
    run = dropspy.load(tmp_path / "run.h5")
    assert run.framework == "torch" and run.attrs["backend"] == "cpu"


def test_no_function_mode_is_on_the_stack_unless_a_hand_made_mask_is_followed(tmp_path):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(_function_modes())
            return x

    class Hand(nn.Module):
        def forward(self, x):
            m = x.new_empty(x.shape).bernoulli_(0.5)
            seen.append(_function_modes())
            return x * m

    model = nn.Sequential(nn.Dropout(0.5), Probe(), Hand(), Probe())
    modes = _function_modes()
    with dropspy.record(model, tmp_path / "run.h5"):
        assert _function_modes() == modes
        model(torch.randn(3, 4))
        assert _function_modes() == modes
    # nn.Dropout needs no mode; a hand-made draw puts it on until the forward ends.
    assert seen == [modes, modes + 1, modes + 1]


def test_kernels_are_in_place_only_while_recording(tmp_path):
    from dropspy.frameworks.torch import kernels

    original = (torch.Tensor.bernoulli_, F.scaled_dot_product_attention, torch.bernoulli)
    with dropspy.record(_mlp(), tmp_path / "run.h5"):
        assert kernels.installed() and torch.Tensor.bernoulli_ is not original[0]
        assert kernels.kernels_in_place()
    assert not kernels.installed() and not kernels.kernels_in_place()
    # Steps nobody samples run torch's own kernels.
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with dropspy.record(model, tmp_path / "every2.h5", every=2):
        for _ in range(4):
            seen.append(kernels.kernels_in_place())
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
    assert seen == [True, False, True, False]
    with dropspy.record(_mlp(), tmp_path / "none.h5", steps=[]):
        assert kernels.installed() and not kernels.kernels_in_place()
    assert (torch.Tensor.bernoulli_, F.scaled_dot_product_attention, torch.bernoulli) == original
    x = torch.randn(4, 4)
    torch.manual_seed(0)
    a = F.dropout(x, 0.5)
    torch.manual_seed(0)
    b = torch._VF.dropout(x, 0.5, True)
    assert torch.equal(a, b)


def test_detach_removes_every_hook_and_mode(tmp_path):
    model = _mlp()
    modes, opt_hooks = _function_modes(), _global_optimizer_hooks()
    with dropspy.record(model, tmp_path / "run.h5"):
        assert _hook_counts(model) > 0 and _global_optimizer_hooks() == opt_hooks + 1
        model(torch.randn(3, 4))
    assert _function_modes() == modes
    assert _hook_counts(model) == 0 and _global_optimizer_hooks() == opt_hooks


def test_only_modules_whose_calls_must_be_seen_without_a_draw_are_hooked(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return F.dropout(self.lin(x), 0.5, self.training)

    class MyDropout(nn.Module):
        def forward(self, x):
            return x * x.new_empty(x.shape).bernoulli_(0.5) if self.training else x

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(Block(), nn.Dropout(0.5)),
                          MyDropout(), nn.LSTM(4, 4, 2, dropout=0.5))
    with dropspy.record(model, tmp_path / "run.h5"):
        hooked = {name for name, m in model.named_modules() if m._forward_pre_hooks}
        model(torch.randn(2, 4))
    # The model (step clock), a user's dropout (eval calls), a stacked RNN (eval calls).
    assert hooked == {"", "3", "4"}
    assert dropspy.load(tmp_path / "run.h5").sites[:3] == ("2.0/dropout", "2.1", "3")


def test_detach_cleans_up_when_training_raises_and_keeps_earlier_records(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    modes = _function_modes()
    with pytest.raises(ZeroDivisionError):
        with dropspy.record(model, tmp_path / "run.h5"):
            for step in range(3):
                opt.zero_grad()
                model(torch.randn(3, 4)).sum().backward()
                opt.step()
                if step == 1:
                    _ = 1 / 0
    assert _function_modes() == modes and _hook_counts(model) == 0
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete and run["1"].steps.tolist() == [0, 1]


def test_detach_when_a_forward_raises_midway(tmp_path):
    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    model = nn.Sequential(nn.Dropout(0.5), Boom())
    modes = _function_modes()
    with pytest.raises(ValueError):
        with dropspy.record(model, tmp_path / "run.h5"):
            model(torch.randn(2, 3))
    assert _function_modes() == modes and _hook_counts(model) == 0
    assert len(dropspy.load(tmp_path / "run.h5")["0"]) == 1


def test_recording_the_same_model_twice_at_once_is_refused(tmp_path):
    model = _mlp()
    with dropspy.record(model, tmp_path / "a.h5"):
        with pytest.raises(RecordingError, match="already being recorded"):
            with dropspy.record(model, tmp_path / "b.h5"):
                pass


def test_nested_recordings_of_model_and_submodule_both_see_the_same_mask(tmp_path):
    inner = nn.Sequential(nn.Dropout(0.5))
    model = nn.Sequential(nn.Linear(4, 4), inner)
    with dropspy.record(model, tmp_path / "outer.h5"):
        with dropspy.record(inner, tmp_path / "inner.h5"):
            model(torch.randn(3, 4))
    outer, nested = dropspy.load(tmp_path / "outer.h5"), dropspy.load(tmp_path / "inner.h5")
    assert np.array_equal(outer["1.0"].mask(0), nested["0"].mask(0))


def test_recordings_closed_out_of_order_both_stay_complete(tmp_path):
    a, b = _mlp(), _mlp()
    modes = _function_modes()
    rec_a = dropspy.record(a, tmp_path / "a.h5").__enter__()
    rec_b = dropspy.record(b, tmp_path / "b.h5").__enter__()
    a(torch.randn(2, 4))
    rec_a.__exit__(None, None, None)
    b(torch.randn(2, 4))
    rec_b.__exit__(None, None, None)
    assert _function_modes() == modes and _hook_counts(a) == _hook_counts(b) == 0
    for name in ("a.h5", "b.h5"):
        assert len(dropspy.load(tmp_path / name)["1"]) == 1


def test_a_mode_left_behind_by_a_failing_forward_stays_in_place(tmp_path):
    from torch.overrides import BaseTorchFunctionMode

    leftover = BaseTorchFunctionMode()

    class Leaky(nn.Module):
        def forward(self, x):
            leftover.__enter__()  # entered, never exited: the forward raises
            raise RuntimeError("leak")

    model = nn.Sequential(nn.Dropout(0.5), Leaky())
    modes = _function_modes()
    with pytest.raises(RuntimeError, match="leak"):
        with dropspy.record(model, tmp_path / "run.h5"):
            model(torch.randn(2, 4))
    from torch.overrides import _get_current_function_mode_stack, _pop_mode

    assert _get_current_function_mode_stack()[-1] is leftover
    _pop_mode()
    assert _function_modes() == modes


def test_sequential_re_entry_records_into_each_file(tmp_path):
    model = _mlp()
    for name in ("a.h5", "b.h5"):
        with dropspy.record(model, tmp_path / name):
            model(torch.randn(2, 4))
    for name in ("a.h5", "b.h5"):
        assert len(dropspy.load(tmp_path / name)["1"]) == 1


def test_data_parallel_over_several_devices_is_refused_pointing_to_ddp(tmp_path):
    dp = nn.DataParallel.__new__(nn.DataParallel)
    nn.Module.__init__(dp)
    dp.module, dp.device_ids = _mlp(), [0, 1]
    with pytest.raises(UnsupportedModelError, match="2 devices.*DistributedDataParallel"):
        dropspy.record(dp, tmp_path / "run.h5").__enter__()


def test_cpu_data_parallel_records_the_module_it_wraps(tmp_path):
    dp = nn.DataParallel(_mlp())  # no GPU: DataParallel calls self.module(...) directly
    seen = []
    dp.module[1].register_forward_hook(lambda m, a, out: seen.append((a[0].clone(), out)))
    with dropspy.record(dp, tmp_path / "run.h5"):
        dp(torch.randn(8, 4))
    run = dropspy.load(tmp_path / "run.h5")
    assert run.sites == ("1",) and run.attrs["wrapper"] == "DataParallel"
    (x, y), = seen
    np.testing.assert_array_equal(y.detach().numpy(),
                                  x.detach().numpy() * run["1"].mask(0) * np.float32(2.0))


def test_ddp_nested_inside_a_model_is_refused_by_name(tmp_path):
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel.__new__(DistributedDataParallel)
    nn.Module.__init__(ddp)
    outer = nn.Sequential(nn.Linear(4, 4), ddp)
    with pytest.raises(UnsupportedModelError, match="nested inside the model.*'1'"):
        dropspy.record(outer, tmp_path / "run.h5").__enter__()


def test_a_one_process_ddp_wrapper_records_under_the_inner_names(tmp_path):
    import socket

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with no process group yet")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with dropspy.record(ddp, tmp_path / "run.h5"):
            for _ in range(3):
                opt.zero_grad()
                ddp(torch.randn(2, 4)).sum().backward()
                opt.step()
    finally:
        dist.destroy_process_group()
    run = dropspy.load(tmp_path / "run.h5")  # world size 1: the path as given
    assert run["1"].steps.tolist() == [0, 1, 2]
    assert run.attrs["world_size"] == 1 and run.attrs["wrapper"] == "DistributedDataParallel"


def test_torchscript_module_is_refused_by_name(tmp_path):
    scripted = torch.jit.script(_mlp())
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        dropspy.record(scripted, tmp_path / "run.h5").__enter__()


def test_a_torchscript_submodule_is_refused_by_name_before_anything_is_hooked(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), torch.jit.script(_mlp()))
    with pytest.raises(UnsupportedModelError, match=r"TorchScript submodule \(at '1'\)"):
        dropspy.record(model, tmp_path / "run.h5").__enter__()
    # Refused before attach: no hook is left behind, the model runs as before.
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.children())


def test_invalid_cudnn_rnn_option_says_what_it_got(monkeypatch):
    monkeypatch.setenv("DROPSPY_TORCH_CUDNN_RNN", "fast")
    with pytest.raises(ValueError, match="Received: cudnn_rnn='fast'"):
        TorchAdapter(_mlp())


def test_forward_on_another_thread_is_refused_by_name(tmp_path):
    model = _mlp()
    errors = []

    def worker():
        try:
            model(torch.randn(2, 4))
        except RecordingError as exc:
            errors.append(exc)

    with dropspy.record(model, tmp_path / "run.h5"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert errors and "thread" in str(errors[0])


def test_eval_calls_are_recorded_as_not_applied(tmp_path):
    model = _mlp()
    model.eval()
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(2, 4))
    site = dropspy.load(tmp_path / "run.h5")["1"]
    assert len(site) == 1 and not site.applied[0] and not site.training[0]
    assert site.mask(0) is None


def test_dropout_forced_on_in_eval_is_recorded_with_training_false(tmp_path):
    class MCDropout(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, training=True)

    model = MCDropout().eval()
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(4, 4))
    site = dropspy.load(tmp_path / "run.h5")["dropout"]
    assert site.applied[0] and not site.training[0] and site.mask(0).shape == (4, 4)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_eval_transformer_keeps_its_fast_path_and_bitwise_output(tmp_path, grad):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 7, 16)
    mha_calls = []
    model.layers[0].self_attn.forward = _counting(model.layers[0].self_attn.forward, mha_calls)
    with torch.set_grad_enabled(grad):
        plain = model(x)
        plain_calls = len(mha_calls)
        with dropspy.record(model, tmp_path / "run.h5"):
            assert not any(m._forward_pre_hooks for m in model.layers.modules())
            recorded = model(x)
    assert torch.equal(plain, recorded)
    # The same path as without dropspy: no slow-path MHA call on the fast path, one on the slow.
    assert len(mha_calls) == 2 * plain_calls == (2 if grad else 0)
    run = dropspy.load(tmp_path / "run.h5")
    if grad:  # the slow path calls its dropouts with training=False: not applied
        assert "layers.0.self_attn/attention" in run.sites
    assert all(len(run[n]) == 1 and not run[n].applied.any() for n in run.sites)


def _counting(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapper


def test_hand_made_dropout_in_eval_is_recorded_as_not_applied(tmp_path):
    class LockedDropout(nn.Module):
        def forward(self, x):
            if not self.training:
                return x
            return x * x.new_empty(1, *x.shape[1:]).bernoulli_(0.5) / 0.5

    model = nn.Sequential(LockedDropout())
    with dropspy.record(model, tmp_path / "run.h5") as rec:
        model(torch.randn(4, 2, 3))
        rec.mark_step()
        model.eval()
        model(torch.randn(4, 2, 3))
    site = dropspy.load(tmp_path / "run.h5")["0"]
    assert site.applied.tolist() == [True, False] and site.training.tolist() == [True, False]
    assert [tuple(s) for s in site.shapes] == [(4, 2, 3), (4, 2, 3)]


def test_single_layer_rnn_dropout_is_configured_but_never_applied(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about this very config
        lstm = nn.LSTM(3, 4, num_layers=1, dropout=0.5)
    with dropspy.record(lstm, tmp_path / "run.h5"):
        lstm(torch.randn(5, 2, 3))
    site = dropspy.load(tmp_path / "run.h5")["between_layers"]
    assert site.rate == 0.5 and "num_layers=1" in site.extra["never_applied"]
    assert len(site) == 1 and not site.applied.any()


def test_step_is_one_optimizer_step_with_gradient_accumulation(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dropspy.record(model, tmp_path / "run.h5"):
        for _ in range(3):
            for _ in range(2):
                model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    site = dropspy.load(tmp_path / "run.h5")["1"]
    assert site.steps.tolist() == [0, 0, 1, 1, 2, 2]
    assert site.calls.tolist() == [0, 1, 0, 1, 0, 1]


def test_another_models_optimizer_does_not_advance_the_step(tmp_path):
    model, other = _mlp(), _mlp()
    opt, other_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, other))
    with dropspy.record(model, tmp_path / "run.h5"):
        for _ in range(2):
            model(torch.randn(2, 4)).sum().backward()
            other(torch.randn(2, 4)).sum().backward()
            other_opt.step()
            opt.step()
    assert dropspy.load(tmp_path / "run.h5")["1"].steps.tolist() == [0, 1]


def test_without_optimizer_each_training_forward_is_a_step(tmp_path):
    model = _mlp()
    n = AUTO_MAX_FORWARDS + 3
    with dropspy.record(model, tmp_path / "run.h5"):
        for _ in range(n):
            model(torch.randn(2, 4))
    run = dropspy.load(tmp_path / "run.h5")
    assert run["1"].steps.tolist() == list(range(n))
    assert any("one top-level training forward" in note for note in run.notes)


def test_few_forwards_without_optimizer_are_steps_at_exit(tmp_path):
    model = _mlp()
    with dropspy.record(model, tmp_path / "run.h5"):
        for _ in range(3):
            model(torch.randn(2, 4))
    assert dropspy.load(tmp_path / "run.h5")["1"].steps.tolist() == [0, 1, 2]


def test_mark_step_sets_steps_explicitly(tmp_path):
    model = _mlp()
    with dropspy.record(model, tmp_path / "run.h5") as rec:
        model(torch.randn(2, 4))
        model(torch.randn(2, 4))
        rec.mark_step()
        model(torch.randn(2, 4))
        rec.mark_step(10)
        model(torch.randn(2, 4))
    site = dropspy.load(tmp_path / "run.h5")["1"]
    assert site.steps.tolist() == [0, 0, 1, 10] and site.calls.tolist() == [0, 1, 0, 0]


def test_sampled_out_steps_are_not_captured(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dropspy.record(model, tmp_path / "run.h5", steps=[1, 3]) as rec:
        capture = rec.adapter._capture
        for step in range(5):
            model(torch.randn(2, 4)).sum().backward()
            if step in (2, 4):
                assert not capture.entries  # an unsampled step holds nothing
            opt.step()
            assert capture.capturing == (step + 1 in (1, 3))
    assert dropspy.load(tmp_path / "run.h5")["1"].steps.tolist() == [1, 3]


def test_site_filter_leaves_unselected_sites_out(tmp_path):
    model = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))
    with dropspy.record(model, tmp_path / "run.h5", sites=["1"]):
        model(torch.randn(2, 4))
    run = dropspy.load(tmp_path / "run.h5")
    assert run.sites == ("1",)


def test_random_draws_in_a_dropout_like_module_are_reported_untracked(tmp_path):
    class HandDropout(nn.Module):
        def forward(self, x):
            return x * (torch.rand_like(x) > 0.5)

    model = nn.Sequential(HandDropout())
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(2, 4))
    run = dropspy.load(tmp_path / "run.h5")
    (name,) = run.sites
    assert "rand_like" in run[name].opaque and run[name].role == "custom"
    assert any("untracked" in note for note in run.notes)


def test_activation_checkpointing_re_runs_are_not_recorded_twice(tmp_path):
    from torch.utils.checkpoint import checkpoint

    block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dropspy.record(model, tmp_path / "run.h5"):
        for _ in range(2):
            model(torch.randn(3, 4, requires_grad=True)).sum().backward()
            opt.step()
    run = dropspy.load(tmp_path / "run.h5")
    assert run["block.1"].steps.tolist() == [0, 1]
    assert any("checkpointing" in note for note in run.notes)


def test_rank_change_at_a_site_gets_its_own_site(tmp_path):
    model = nn.Sequential(nn.Dropout(0.5))
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(2, 4))
        model(torch.randn(2, 3, 4))
    assert dropspy.load(tmp_path / "run.h5").sites == ("0", "0@3d")


@pytest.mark.parametrize("sizes", [[1], [8], [13, 3], [0, 5, 64, 7]])
def test_torch_bit_packing_matches_numpy(sizes):
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(n, generator=g) > 0.5 for n in sizes]
    packed, offsets = pack_torch(masks)
    for m, a, b in zip(masks, offsets[:-1], offsets[1:]):
        assert np.array_equal(packed[a:b].numpy(), np.packbits(m.numpy()))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_dropout_mask_is_the_fused_kernels_mask(tmp_path):
    layer = nn.Dropout(0.3).cuda()
    model = nn.Sequential(layer, nn.Dropout2d(0.5)).cuda()
    x = torch.randn(64, 33, 4, 4, device="cuda")
    x[:, ::3] = 0
    seen = {}
    layer.register_forward_hook(lambda m, a, out: seen.update(out=out.clone()))
    state = torch.cuda.get_rng_state()
    with dropspy.record(model, tmp_path / "run.h5"):
        model(x)
    run = dropspy.load(tmp_path / "run.h5")
    assert run.attrs["backend"] == "cuda"
    mask = torch.from_numpy(run["0"].mask(0)).cuda()
    # Witness: replaying the same generator state through native_dropout draws this mask.
    torch.cuda.set_rng_state(state)
    out, replayed = torch.native_dropout(x, 0.3, True)
    assert torch.equal(mask, replayed) and torch.equal(out, seen["out"])
    assert torch.equal(seen["out"][~mask], torch.zeros_like(seen["out"][~mask]))
    assert tuple(run["1"].noise_shapes[0]) == (64, 33, 1, 1)


@pytest.mark.gpu
@cuda
def test_cuda_training_with_record_is_bit_identical(tmp_path):
    def train(path=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3), nn.Linear(16, 1)).cuda()
        opt = torch.optim.Adam(model.parameters())
        x = torch.randn(32, 16, device="cuda")

        def loop():
            for _ in range(5):
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()

        if path is None:
            loop()
        else:
            with dropspy.record(model, path):
                loop()
        return [p.detach().clone() for p in model.parameters()], torch.cuda.get_rng_state()

    (plain, plain_rng), (rec, rec_rng) = train(), train(tmp_path / "run.h5")
    assert torch.equal(plain_rng, rec_rng)
    assert all(torch.equal(a, b) for a, b in zip(plain, rec))
    assert dropspy.load(tmp_path / "run.h5")["1"].steps.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.gpu
@cuda
def test_cudnn_exact_mode_records_masks_and_says_it_perturbs(tmp_path, monkeypatch):
    monkeypatch.setenv("DROPSPY_TORCH_CUDNN_RNN", "exact")
    lstm = nn.LSTM(8, 8, num_layers=2, dropout=0.5).cuda()
    with pytest.warns(dropspy.DropspyWarning, match="without cuDNN"):
        with dropspy.record(lstm, tmp_path / "run.h5"):
            lstm(torch.randn(5, 3, 8, device="cuda"))
    run = dropspy.load(tmp_path / "run.h5")
    site = run["between_layers"]
    assert site.opaque in (None, "") and len(site) == 1 and site.applied[0]
    assert any("perturbation" in note for note in run.notes)


@pytest.mark.gpu
@cuda
def test_cudnn_lstm_between_layer_dropout_is_opaque(tmp_path):
    lstm = nn.LSTM(8, 8, num_layers=2, dropout=0.5).cuda()
    with dropspy.record(lstm, tmp_path / "run.h5"):
        lstm(torch.randn(5, 3, 8, device="cuda"))
    site = dropspy.load(tmp_path / "run.h5")["between_layers"]
    assert "cuDNN" in site.opaque and len(site) == 0


@pytest.mark.gpu
@cuda
def test_fused_sdpa_dropout_is_opaque_on_cuda(tmp_path):
    class Attn(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, dropout_p=0.5)

    model = Attn()
    x = torch.randn(2, 4, 16, 64, device="cuda", dtype=torch.float16)
    with dropspy.record(model, tmp_path / "run.h5"):
        model(x)
    run = dropspy.load(tmp_path / "run.h5")
    (name,) = run.sites
    assert "fused attention kernel" in run[name].opaque and len(run[name]) == 0


def test_long_inference_loops_hand_over_not_applied_records_as_they_go(tmp_path, monkeypatch):
    import dropspy.frameworks.torch.adapter as adapter_module

    monkeypatch.setattr(adapter_module, "EVAL_MAX_ENTRIES", 2)
    model = _mlp().eval()
    with dropspy.record(model, tmp_path / "run.h5") as rec:
        for _ in range(4):
            model(torch.randn(2, 4))
        held = len(rec.adapter._held) + len(rec.adapter._capture.entries)
    assert held <= 2
    site = dropspy.load(tmp_path / "run.h5")["1"]
    assert len(site) == 4 and not site.applied.any()


def test_an_internal_error_never_breaks_or_repeats_the_users_call(tmp_path, monkeypatch):
    from dropspy.frameworks.torch.capture import Capture

    def broken(self):
        raise RuntimeError("dropspy bug")

    monkeypatch.setattr(Capture, "locate", broken)
    probe = nn.Sequential(nn.Linear(4, 4))
    probe.forward = lambda x: F.dropout(x, 0.5, True)
    x = torch.randn(3, 4)
    torch.manual_seed(0)
    plain = F.dropout(x, 0.5, True)
    torch.manual_seed(0)
    with dropspy.record(probe, tmp_path / "run.h5"):
        with pytest.warns(dropspy.DropspyWarning, match="dropspy bug"):
            recorded = probe(x)
    assert torch.equal(plain, recorded)  # ran exactly once, with the same draw
    run = dropspy.load(tmp_path / "run.h5")
    assert any("internal error" in note for note in run.notes)
    assert run.records_dropped["capture_error"] == 1


def test_the_frameworks_own_errors_propagate_unchanged(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return F.dropout(x, 1.5, True)

    with dropspy.record(Bad(), tmp_path / "run.h5") as rec:
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
            rec.model(torch.randn(2, 2))


def test_an_iteration_whose_step_grad_scaler_skips_is_still_a_step(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    original_update = torch.amp.GradScaler.update
    with dropspy.record(model, tmp_path / "run.h5"):
        for step in range(3):
            opt.zero_grad()
            scaler.scale(model(torch.randn(2, 4)).sum()).backward()
            if step == 1:
                model[0].weight.grad[0, 0] = float("inf")  # the scaler skips this step
            scaler.step(opt)
            scaler.update()
    assert torch.amp.GradScaler.update is original_update
    run = dropspy.load(tmp_path / "run.h5")
    assert run["1"].steps.tolist() == [0, 1, 2]
    assert any("GradScaler skipped" in note for note in run.notes)


def test_a_step_holding_many_mask_bytes_packs_them_early(tmp_path, monkeypatch):
    import dropspy.frameworks.torch.capture as capture_module

    monkeypatch.setattr(capture_module, "PACK_EARLY_BYTES", 100)
    model = nn.Sequential(nn.Dropout(0.5), nn.Dropout2d(0.5))
    x = torch.randn(4, 8, 3, 3)
    with dropspy.record(model, tmp_path / "run.h5") as rec:
        torch.manual_seed(0)
        model(x)
        held = [e.noise.dtype for group in rec.adapter._held for e in group]
    # The first exceeded the budget: packed; the second is still the noise torch drew.
    assert held[0] == torch.uint8 and held[1] != torch.uint8
    early = dropspy.load(tmp_path / "run.h5")
    monkeypatch.setattr(capture_module, "PACK_EARLY_BYTES", 1 << 30)
    with dropspy.record(model, tmp_path / "late.h5"):
        torch.manual_seed(0)
        model(x)
    late = dropspy.load(tmp_path / "late.h5")
    for name in ("0", "1"):
        assert np.array_equal(early[name].mask(0), late[name].mask(0))
        assert tuple(early[name].noise_shapes[0]) == tuple(late[name].noise_shapes[0])


def test_dropout_modules_never_sampled_are_named_in_the_run(tmp_path):
    import torch

    import dropspy

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3),
                                torch.nn.Linear(8, 8), torch.nn.Dropout1d(0.2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dropspy.record(model, tmp_path / "none.h5", steps=[]):
        for _ in range(2):
            opt.zero_grad()
            model(torch.ones(3, 8, 4)).sum().backward()
            opt.step()
    run = dropspy.load(tmp_path / "none.h5")
    assert run.sites == ()
    assert any("2 dropout module(s)" in n and "1, 3" in n for n in run.notes)
    with dropspy.record(model, tmp_path / "all.h5"):
        opt.zero_grad()
        model(torch.ones(3, 8, 4)).sum().backward()
        opt.step()
    assert not any("dropout module(s)" in n for n in dropspy.load(tmp_path / "all.h5").notes)


def test_function_mode_leaves_once_a_hand_made_mask_met_its_multiplication(tmp_path):
    # AWD-LSTM's embedded_dropout draws in the model's own forward: every torch call made
    # under dropspy's function mode pays a Python round trip, so it must be gone by the next
    # hooked module's call (a dropout-looking one), and not outlive a mask's multiplication.
    seen: dict[str, int] = {}

    class Probe(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            seen[self.name] = _function_modes()
            return x

    class HandLockDropout(nn.Module):
        def forward(self, x):
            seen["lockdrop_before_draw"] = _function_modes()
            m = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(0.5)
            return x * m / 0.5

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 4))
            self.drop, self.last = HandLockDropout(), Probe("last")

        def forward(self, x):
            mask = self.weight.new_empty(5, 1).bernoulli_(0.5)
            w = mask * self.weight  # applied: the mode has nothing left to follow
            return self.last(self.drop(x @ w))

    modes = _function_modes()
    model = Model()
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(3, 2, 5))  # the lockdrop's first call runs under the mode (probe)
        seen.clear()
        model(torch.randn(3, 2, 5))
    assert seen == {"lockdrop_before_draw": modes, "last": modes}
    run = dropspy.load(tmp_path / "run.h5")
    shapes = {name: tuple(run[name].shapes[1]) for name in run.sites}
    assert sorted(shapes.values()) == [(3, 2, 4), (5, 4)]


def test_random_draws_by_tensor_methods_in_a_dropout_like_module_are_untracked(tmp_path):
    class UniformDropout(nn.Module):
        def forward(self, x):
            return x * (torch.empty_like(x).uniform_() > 0.5)

    model = nn.Sequential(nn.Linear(4, 4), UniformDropout())
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(2, 4))
        # outside any forward: nn.init draws are nobody's mask
        nn.init.uniform_(model[0].weight)
    run = dropspy.load(tmp_path / "run.h5")
    (name,) = run.sites
    assert name.startswith("1") and "uniform_" in run[name].opaque


_RAND_LIKE = torch.rand_like  # bound before any recording: dropspy's wrapper never sees it


def test_a_random_draw_through_a_name_bound_before_recording_is_still_untracked(tmp_path):
    class ImportedRandDropout(nn.Module):
        def forward(self, x):
            return x * (_RAND_LIKE(x) > 0.5)

    model = nn.Sequential(ImportedRandDropout())
    with dropspy.record(model, tmp_path / "run.h5"):
        for _ in range(2):
            model(torch.randn(2, 4))
    run = dropspy.load(tmp_path / "run.h5")
    (name,) = run.sites
    assert "rand_like" in run[name].opaque


def _scripted_dropout(x: torch.Tensor) -> torch.Tensor:
    return F.dropout(x, 0.5, True) + F.alpha_dropout(x, 0.2, True)


def _scripted_draws(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rand_like(x) + torch.bernoulli(torch.full_like(x, 0.5))


def _scripted_attention(x: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(x, x, x)


class _ScriptedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) * x.bernoulli(0.5)


def test_torch_jit_script_works_while_a_recording_is_open(tmp_path):
    # dropspy's wrappers of F.dropout, torch.rand_like, ... must never reach TorchScript: it
    # compiles the functions they stand for, and the scripted code computes what it would
    # without dropspy.
    model = _mlp()
    x = torch.randn(2, 3, 4, 5)
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(2, 4))
        scripted = [torch.jit.script(fn) for fn in (_scripted_dropout, _scripted_draws,
                                                    _scripted_attention, _ScriptedBlock())]
        torch.manual_seed(3)
        inside = [fn(x) for fn in scripted]
    torch.manual_seed(3)
    eager = [fn(x) for fn in (_scripted_dropout, _scripted_draws, _scripted_attention,
                              _ScriptedBlock())]
    for got, want in zip(inside, eager):
        assert torch.equal(got, want)
