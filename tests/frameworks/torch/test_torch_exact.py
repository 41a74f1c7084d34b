"""Exactness: every recorded torch mask reproduces the output, bit for bit.

Inputs carry planted exact zeros, so a mask guessed from ``output == 0`` would fail here.
The expected output mirrors ATen's arithmetic (noise = mask / (1 - p), then input * noise), so
equality is bitwise, not approximate.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import dropspy
from dropspy.frameworks.torch.sites import ALPHA_CONSTANT


def _with_zeros(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x.view(-1)[::3] = 0.0
    return x


def _dropout_expected(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    return x * (mask.to(x.dtype) / (1 - p))


def _alpha_expected(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    a = 1.0 / math.sqrt((ALPHA_CONSTANT**2 * p + 1) * (1 - p))
    noise = mask.to(x.dtype)
    b = noise.add(-1).mul_(ALPHA_CONSTANT * a).add_(ALPHA_CONSTANT * a * p)
    noise.mul_(a)
    return (x * noise).add_(b)


class Probe(nn.Module):
    """Runs ``fn`` on its input and keeps copies of what went in and came out."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        self.seen_in = x.clone()
        out = self.fn(x)
        self.seen_out = out.clone()
        return out


def _record_once(model: nn.Module, x: torch.Tensor, path) -> dropspy.Run:
    with dropspy.record(model, path):
        model(x)
    return dropspy.load(path)


MODULE_CASES = [
    ("dropout", lambda: nn.Dropout(0.4), (6, 10), "dropout"),
    ("dropout_rank3", lambda: nn.Dropout(0.25), (3, 4, 5), "dropout"),
    ("dropout_inplace", lambda: nn.Dropout(0.5, inplace=True), (6, 10), "dropout"),
    ("dropout1d", lambda: nn.Dropout1d(0.5), (4, 6, 9), "dropout"),
    ("dropout1d_unbatched", lambda: nn.Dropout1d(0.5), (6, 9), "dropout"),
    ("dropout2d", lambda: nn.Dropout2d(0.3), (3, 5, 4, 4), "dropout"),
    ("dropout3d", lambda: nn.Dropout3d(0.3), (2, 5, 3, 3, 2), "dropout"),
    ("dropout3d_unbatched", lambda: nn.Dropout3d(0.3), (5, 3, 3, 2), "dropout"),
    ("alpha", lambda: nn.AlphaDropout(0.2), (6, 10), "alpha"),
    ("feature_alpha", lambda: nn.FeatureAlphaDropout(0.2), (3, 5, 4, 4), "alpha"),
]


@pytest.mark.parametrize("name,make,shape,formula", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_mask_reproduces_output_bitwise(tmp_path, name, make, shape, formula):
    layer = make()
    x = _with_zeros(*shape)
    seen = {}
    layer.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].clone()))
    layer.register_forward_hook(lambda m, a, out: seen.update(out=out.clone()))
    model = nn.Sequential(layer)
    run = _record_once(model, x, tmp_path / "run.h5")

    site = run["0"]
    assert site.role == "output" and site.layer == "0" and len(site) == 1
    assert bool(site.applied[0]) and bool(site.training[0])
    mask = torch.from_numpy(site.mask(0))
    x_aten = seen["x"].reshape(mask.shape)  # unbatched inputs gain ATen's batch dim of 1
    expected = (_alpha_expected if formula == "alpha" else _dropout_expected)(x_aten, mask, layer.p)
    assert torch.equal(expected.reshape(seen["out"].shape), seen["out"])


@pytest.mark.parametrize("layer,noise_shape", [
    (nn.Dropout1d(0.5), (4, 6, 1)),
    (nn.Dropout2d(0.5), (4, 6, 1, 1)),
    (nn.Dropout3d(0.5), (4, 6, 1, 1, 1)),
    (nn.FeatureAlphaDropout(0.5), (4, 6, 1, 1)),
    (nn.Dropout(0.5), (4, 6, 3, 3)),
], ids=["1d", "2d", "3d", "feature_alpha", "elementwise"])
def test_feature_dropout_noise_is_per_sample_and_channel(tmp_path, layer, noise_shape):
    shape = noise_shape[:2] + (3,) * (len(noise_shape) - 2)
    run = _record_once(nn.Sequential(layer), _with_zeros(*shape), tmp_path / "run.h5")
    site = run["0"]
    assert tuple(site.noise_shapes[0]) == noise_shape
    assert tuple(site.shapes[0]) == shape
    assert site.axes[:2] == ("batch", "channel")


FUNCTIONAL_CASES = [
    ("F.dropout", lambda x: F.dropout(x, 0.3, True), "dropout", 0.3),
    ("F.dropout_inplace", lambda x: F.dropout(x, 0.3, True, inplace=True), "dropout", 0.3),
    ("F.dropout1d", lambda x: F.dropout1d(x.reshape(2, 3, -1), 0.5, True), "dropout", 0.5),
    ("F.dropout2d", lambda x: F.dropout2d(x.reshape(2, 3, 2, -1), 0.5, True), "dropout", 0.5),
    ("F.dropout3d", lambda x: F.dropout3d(x.reshape(2, 3, 1, 2, -1), 0.5, True), "dropout", 0.5),
    ("F.alpha_dropout", lambda x: F.alpha_dropout(x, 0.2, True), "alpha", 0.2),
    ("F.feature_alpha_dropout",
     lambda x: F.feature_alpha_dropout(x.reshape(2, 3, 2, -1), 0.2, True), "alpha", 0.2),
    ("torch.dropout", lambda x: torch.dropout(x, 0.6, True), "dropout", 0.6),
    ("torch.dropout_", lambda x: torch.dropout_(x, 0.6, True), "dropout", 0.6),
    ("torch.feature_dropout",
     lambda x: torch.feature_dropout(x.reshape(2, 3, -1), 0.5, True), "dropout", 0.5),
    ("torch.alpha_dropout_", lambda x: torch.alpha_dropout_(x, 0.2, True), "alpha", 0.2),
]


@pytest.mark.parametrize("name,fn,formula,p", FUNCTIONAL_CASES,
                         ids=[c[0] for c in FUNCTIONAL_CASES])
def test_functional_mask_reproduces_output_bitwise(tmp_path, name, fn, formula, p):
    probe = Probe(fn)
    run = _record_once(probe, _with_zeros(6, 8), tmp_path / "run.h5")
    (site_name,) = run.sites
    site = run[site_name]
    assert site.rate == pytest.approx(p) and site.extra["source"].startswith("test_torch_exact.py:")
    mask = torch.from_numpy(site.mask(0))
    out = probe.seen_out
    expected = (_alpha_expected if formula == "alpha" else _dropout_expected)(
        probe.seen_in.reshape(out.shape), mask.reshape(out.shape) if mask.numel() == out.numel()
        else mask, p)
    assert torch.equal(expected, out)


def test_two_functional_calls_in_one_forward_are_two_sites(tmp_path):
    probe = Probe(lambda x: F.dropout(F.dropout(x, 0.5, True), 0.5, True))
    run = _record_once(probe, _with_zeros(4, 4), tmp_path / "run.h5")
    assert run.sites == ("dropout", "dropout_1")


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_degenerate_rates_record_the_constant_mask(tmp_path, p):
    layer = nn.Dropout(p)
    x = _with_zeros(3, 5)
    run = _record_once(nn.Sequential(layer), x, tmp_path / "run.h5")
    mask = run["0"].mask(0)
    assert mask.shape == (3, 5)
    assert bool(mask.all()) == bool(mask.any()) == (p == 0.0)


class LockedDropout(nn.Module):
    """AWD-LSTM's locked (variational) dropout: one mask per sequence, shared over time."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        m = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - self.p)
        self.seen_in = x.clone()
        out = m.div(1 - self.p).expand_as(x) * x
        self.seen_out = out.clone()
        return out


class AWD(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 5)
        self.lockdrop = LockedDropout(0.4)

    def forward(self, x):
        return self.lockdrop(self.lstm(x)[0])


def test_locked_dropout_mask_is_exact_and_shared_over_time(tmp_path):
    model = AWD()
    run = _record_once(model, _with_zeros(7, 3, 5), tmp_path / "run.h5")
    site = run["lockdrop"]
    assert site.role == "custom" and site.layer_class == "LockedDropout"
    assert site.axes == ("time", "batch", "feature")
    assert tuple(site.shapes[0]) == (7, 3, 5) and tuple(site.noise_shapes[0]) == (1, 3, 5)
    assert site.rate == pytest.approx(0.4)
    mask = torch.from_numpy(site.mask(0))
    lock = model.lockdrop
    assert torch.equal(lock.seen_in * (mask.to(torch.float32) / (1 - 0.4)), lock.seen_out)


class VariationalCell(nn.Module):
    """A hand-written recurrent loop: one (B, H) mask drawn per sequence, used every step."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(4, 4)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], 4)
        mask = torch.bernoulli(x.new_full((x.shape[1], 4), 0.75))
        self.mask_seen = mask.clone()
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h * mask, c))
        return h


def test_bernoulli_of_probabilities_is_recorded_with_its_rate(tmp_path):
    model = VariationalCell()
    run = _record_once(model, _with_zeros(5, 3, 4), tmp_path / "run.h5")
    (name,) = run.sites
    site = run[name]
    assert site.rate == pytest.approx(0.25) and len(site) == 1
    assert torch.equal(torch.from_numpy(site.mask(0)), model.mask_seen != 0)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [False, True])
def test_rnn_between_layer_masks_rebuild_the_stacked_output_bitwise(tmp_path, cls, batch_first):
    layers, p = 3, 0.4
    torch.manual_seed(0)
    net = cls(6, 5, num_layers=layers, dropout=p, batch_first=batch_first, bidirectional=True)
    x = _with_zeros(4, 7, 6)
    with dropspy.record(net, tmp_path / "run.h5"):
        out, _ = net(x)
    run = dropspy.load(tmp_path / "run.h5")
    assert run.sites == ("between_layers/0", "between_layers/1")
    h = x
    for layer in range(layers):
        single = cls(h.shape[-1], 5, num_layers=1, batch_first=batch_first, bidirectional=True)
        with torch.no_grad():
            for sfx in ("", "_reverse"):
                for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(single, f"{w}_l0{sfx}").copy_(getattr(net, f"{w}_l{layer}{sfx}"))
        h, _ = single(h)
        if layer < layers - 1:
            site = run[f"between_layers/{layer}"]
            assert site.axes == ("time", "batch", "feature")
            mask = torch.from_numpy(site.mask(0))
            if batch_first:  # ATen's layer stack is time-major even with batch_first
                mask = mask.transpose(0, 1)
            h = h * (mask.to(h.dtype) / (1 - p))
    assert torch.equal(h, out)


class DispatchWitness(torch.utils._python_dispatch.TorchDispatchMode):
    """Independent witness: logs each multiplication by a freshly drawn Bernoulli noise."""

    def __init__(self):
        super().__init__()
        self.noise_ids = set()
        self.muls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.bernoulli_.float:
            self.noise_ids.add(id(out))
        elif func is torch.ops.aten.mul.Tensor and id(args[1]) in self.noise_ids:
            self.muls.append((args[0].clone(), args[1].clone(), out.clone()))
        return out


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_mask_is_the_one_applied(tmp_path, need_weights, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=batch_first)
    q = _with_zeros(3, 5, 8)
    witness = DispatchWitness()
    with dropspy.record(mha, tmp_path / "run.h5"):
        with witness:
            mha(q, q, q, need_weights=need_weights)
    run = dropspy.load(tmp_path / "run.h5")
    site = run["attention"]
    assert site.role == "attention" and site.layer_class == "MultiheadAttention"
    batch = 3 if batch_first else 5
    length = 5 if batch_first else 3
    assert tuple(site.shapes[0]) == (batch, 2, length, length)
    (weights, noise, out) = witness.muls[0]
    mask = torch.from_numpy(site.mask(0)).reshape(noise.shape)
    assert torch.equal(mask, noise != 0)
    assert torch.equal(weights * (mask.to(weights.dtype) / (1 - 0.3)), out)


def test_scaled_dot_product_attention_dropout_is_recorded_on_cpu(tmp_path):
    q = _with_zeros(2, 3, 4, 8)
    probe = Probe(lambda x: F.scaled_dot_product_attention(x, x, x, dropout_p=0.5))
    witness = DispatchWitness()
    with dropspy.record(probe, tmp_path / "run.h5"):
        with witness:
            probe(q)
    run = dropspy.load(tmp_path / "run.h5")
    (name,) = run.sites
    site = run[name]
    assert site.role == "attention" and tuple(site.shapes[0]) == (2, 3, 4, 4)
    (weights, noise, out) = witness.muls[0]
    mask = torch.from_numpy(site.mask(0))
    assert torch.equal(mask, noise != 0)
    assert torch.equal(weights * (mask.to(weights.dtype) / 0.5), out)


def test_packed_sequence_between_layer_mask_has_packed_layout(tmp_path):
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    x = _with_zeros(5, 3, 3)
    packed = pack_padded_sequence(x, [5, 4, 2])
    with dropspy.record(lstm, tmp_path / "run.h5"):
        out, _ = lstm(packed)
    run = dropspy.load(tmp_path / "run.h5")
    site = run["between_layers"]
    assert site.axes == ("axis0", "feature") and tuple(site.shapes[0]) == (11, 4)
    first = nn.LSTM(3, 4)
    second = nn.LSTM(4, 4)
    with torch.no_grad():
        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(first, f"{w}_l0").copy_(getattr(lstm, f"{w}_l0"))
            getattr(second, f"{w}_l0").copy_(getattr(lstm, f"{w}_l1"))
    h, _ = first(packed)
    mask = torch.from_numpy(site.mask(0))
    h = h._replace(data=h.data * (mask.to(h.data.dtype) / 0.5))
    rebuilt, _ = second(h)
    assert torch.equal(rebuilt.data, out.data)


def test_hand_made_mask_scaled_by_a_tensor_is_followed_to_its_application(tmp_path):
    class Locked(nn.Module):
        def forward(self, x):
            scale = torch.tensor(1 / 0.6)
            mask = x.new_empty(1, x.shape[1]).bernoulli_(0.6) * scale
            return x * mask.expand(x.shape[0], -1)

    model = nn.Sequential(Locked())
    run = _record_once(model, _with_zeros(5, 4), tmp_path / "run.h5")
    site = run["0/bernoulli"]  # not a dropout-looking class: named after the call
    assert tuple(site.shapes[0]) == (5, 4) and tuple(site.noise_shapes[0]) == (1, 4)


def test_stacked_rnn_in_eval_records_every_gap_as_not_applied(tmp_path):
    gru = nn.GRU(3, 4, num_layers=3, dropout=0.5, batch_first=True).eval()
    run = _record_once(gru, _with_zeros(2, 5, 3), tmp_path / "run.h5")
    for name in ("between_layers/0", "between_layers/1"):
        site = run[name]
        assert len(site) == 1 and not site.applied[0] and tuple(site.shapes[0]) == (5, 2, 4)


class WeightDrop(nn.Module):
    """AWD-LSTM's DropConnect on a recurrent weight: F.dropout applied to a Parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        self.seen_w = F.dropout(self.weight, 0.5, self.training)
        return x @ self.seen_w.t()


class EmbeddingDropout(nn.Module):
    """AWD-LSTM's embedded_dropout: whole rows of the embedding matrix dropped."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, tokens):
        w = self.embed.weight
        mask = w.new_empty(w.size(0), 1).bernoulli_(0.8).expand_as(w) / 0.8
        self.seen = (w.detach().clone(), (mask * w).detach().clone())
        return F.embedding(tokens, mask * w)


def test_weight_dropout_is_named_on_the_weights_axes(tmp_path):
    model = WeightDrop()
    run = _record_once(model, torch.randn(2, 4), tmp_path / "run.h5")
    (name,) = run.sites
    site = run[name]
    assert site.axes == ("axis0", "axis1") and site.extra["applied_to"] == "parameter"
    mask = torch.from_numpy(site.mask(0))
    assert torch.equal(_dropout_expected(model.weight.detach(), mask, 0.5), model.seen_w.detach())


def test_embedding_dropout_drops_whole_rows(tmp_path):
    model = EmbeddingDropout()
    run = _record_once(model, torch.tensor([[1, 2, 3]]), tmp_path / "run.h5")
    site = run[run.sites[0]]
    assert site.axes == ("axis0", "axis1") and site.extra["applied_to"] == "parameter"
    assert tuple(site.shapes[0]) == (10, 4) and tuple(site.noise_shapes[0]) == (10, 1)
    weight, applied = model.seen
    mask = torch.from_numpy(site.mask(0))
    assert torch.equal(mask.to(weight.dtype) / 0.8 * weight, applied)


class DropPath(nn.Module):
    """timm's stochastic depth: one Bernoulli per sample, scaled in place, shared by the rest."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        keep = 1 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        noise.div_(keep)
        self.seen_in = x.clone()
        out = x * noise
        self.seen_out = out.clone()
        return out


def test_drop_path_mask_is_per_sample(tmp_path):
    model = nn.Sequential(DropPath(0.5))
    run = _record_once(model, _with_zeros(8, 3, 2, 2), tmp_path / "run.h5")
    site = run["0"]
    assert tuple(site.shapes[0]) == (8, 3, 2, 2) and tuple(site.noise_shapes[0]) == (8, 1, 1, 1)
    mask = torch.from_numpy(site.mask(0))
    block = model[0]
    assert torch.equal(block.seen_in * (mask.to(torch.float32) / 0.5), block.seen_out)


def test_a_scheduled_rate_change_is_noted(tmp_path):
    layer = nn.Dropout(0.5)
    model = nn.Sequential(layer)
    with dropspy.record(model, tmp_path / "run.h5"):
        model(torch.randn(2, 4))
        layer.p = 0.1
        model(torch.randn(2, 4))
    run = dropspy.load(tmp_path / "run.h5")
    assert run["0"].rate == 0.5 and len(run["0"]) == 2
    assert any("changed from 0.5 to 0.1" in note for note in run.notes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16],
                         ids=["float64", "bfloat16", "float16"])
@pytest.mark.parametrize("make", [lambda: nn.Dropout(0.3), lambda: nn.Dropout2d(0.3)],
                         ids=["Dropout", "Dropout2d"])
def test_masks_are_exact_in_every_float_dtype(tmp_path, dtype, make):
    layer = make()
    x = _with_zeros(4, 6, 3, 3).to(dtype)
    seen = {}
    layer.register_forward_hook(lambda m, a, out: seen.update(out=out.clone()))
    run = _record_once(nn.Sequential(layer), x, tmp_path / "run.h5")
    mask = torch.from_numpy(run["0"].mask(0))
    assert torch.equal(_dropout_expected(x, mask, 0.3), seen["out"])


def test_grouped_query_sdpa_records_query_heads(tmp_path):
    class GQA(nn.Module):
        def forward(self, q, k):
            p = 0.3 if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, k, dropout_p=p, enable_gqa=True)

    model = GQA()
    q, k = _with_zeros(2, 8, 5, 4), _with_zeros(2, 2, 6, 4, seed=1)
    with dropspy.record(model, tmp_path / "run.h5"):
        model(q, k)
        model.eval()
        model(q, k)
    site = dropspy.load(tmp_path / "run.h5")["attention"]
    assert [tuple(s) for s in site.shapes] == [(2, 8, 5, 6), (2, 8, 5, 6)]
    assert site.applied.tolist() == [True, False]
