"""Zero perturbation and RNG completeness for the torch adapter.

- Training with ``record`` gives bit-identical parameters and RNG state to training without it.
- The completeness audit: replaying every captured draw, in order, from the same seed yields the
  same masks and leaves the generator exactly where the real forward left it. A dropout that
  dropspy missed (e.g. inside a composite) would leave the states apart.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import _torch_models as M

import dropspy


class LockedDropout(nn.Module):
    def forward(self, x, p=0.3):
        if not self.training:
            return x
        mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
        return mask.expand_as(x) * x


class Zoo(nn.Module):
    """One of every site kind dropspy records on CPU."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.drop_inplace = nn.Dropout(0.2, inplace=True)
        self.drop1d = nn.Dropout1d(0.3)
        self.drop2d = nn.Dropout2d(0.3)
        self.drop3d = nn.Dropout3d(0.3)
        self.alpha = nn.AlphaDropout(0.2)
        self.feature_alpha = nn.FeatureAlphaDropout(0.2)
        self.lstm = nn.LSTM(8, 8, num_layers=3, dropout=0.25)
        self.gru = nn.GRU(8, 8, num_layers=2, dropout=0.25, batch_first=True)
        self.lock = LockedDropout()
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.2)
        self.out = nn.Linear(8, 1)

    def forward(self, x):  # x: (T, B, 8)
        h = self.drop(torch.tanh(self.inp(x)))
        h = self.drop_inplace(h * 1.0)
        h = F.dropout(h, 0.1, self.training)
        h = torch.dropout(h, 0.15, self.training)
        h = self.drop1d(h.permute(1, 2, 0)).permute(2, 0, 1)
        h = self.drop2d(h.unsqueeze(-1)).squeeze(-1)
        h = self.drop3d(h.unsqueeze(-1).unsqueeze(-1)).squeeze(-1).squeeze(-1)
        h = self.alpha(h)
        h = self.feature_alpha(h.unsqueeze(-1)).squeeze(-1)
        h, _ = self.lstm(h)
        h = self.gru(h.transpose(0, 1))[0].transpose(0, 1)
        h = self.lock(h)
        h, _ = self.mha(h, h, h, need_weights=False)
        h = F.scaled_dot_product_attention(h, h, h, dropout_p=0.1 if self.training else 0.0)
        keep = torch.bernoulli(torch.full_like(h, 0.9))
        return self.out(h * keep).mean()


def _train(steps: int, path=None, **record_kwargs):
    torch.manual_seed(1234)
    model = Zoo()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(6, 4, 8)
    x[::2, :, ::3] = 0.0

    def loop():
        for _ in range(steps):
            opt.zero_grad()
            model(x).backward()
            opt.step()

    if path is None:
        loop()
    else:
        with dropspy.record(model, path, **record_kwargs):
            loop()
    return model, torch.get_rng_state()


@pytest.mark.parametrize("record_kwargs", [{}, {"every": 2}], ids=["every_step", "every_2"])
def test_training_with_record_is_bit_identical(tmp_path, record_kwargs):
    steps = 5
    plain, plain_rng = _train(steps)
    recorded, recorded_rng = _train(steps, tmp_path / "run.h5", **record_kwargs)
    assert torch.equal(plain_rng, recorded_rng)
    for (name, a), (_, b) in zip(plain.named_parameters(), recorded.named_parameters()):
        assert torch.equal(a, b), name
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete and run.records_written > 0
    every = record_kwargs.get("every", 1)
    assert sorted(set(run["drop"].steps.tolist())) == list(range(0, steps, every))


def test_rng_completeness_audit(tmp_path):
    torch.manual_seed(7)
    model = Zoo()
    x = torch.randn(6, 4, 8)
    with dropspy.record(model, tmp_path / "run.h5") as rec:
        log = rec.adapter._capture.draw_log = []
        torch.manual_seed(99)
        model(x)
        after = torch.get_rng_state()
    # 9 dropout calls + 2 LSTM gaps + 1 GRU gap + locked + MHA + SDPA + bernoulli = 16 draws
    assert len(log) == 16
    torch.manual_seed(99)
    for draw in log:
        if draw.op == "bernoulli" and isinstance(draw.p, torch.Tensor):
            again = torch.bernoulli(draw.p)
        else:
            again = torch.empty_like(draw.mask, dtype=draw.dtype).bernoulli_(draw.p)
        assert torch.equal(again != 0, draw.mask)
    assert torch.equal(torch.get_rng_state(), after)


def test_every_zoo_site_is_recorded_with_masks(tmp_path):
    _train(2, tmp_path / "run.h5")
    run = dropspy.load(tmp_path / "run.h5")
    expected = {"drop", "drop_inplace", "drop1d", "drop2d", "drop3d", "alpha", "feature_alpha",
                "lstm/between_layers/0", "lstm/between_layers/1", "gru/between_layers", "lock",
                "mha/attention"}
    assert expected <= set(run.sites)
    functional = [n for n in run.sites if n not in expected]
    assert len(functional) == 4  # F.dropout, torch.dropout, SDPA, bernoulli in Zoo.forward
    for name in run.sites:
        site = run[name]
        assert len(site) == 2 and site.applied.all(), name


def test_rng_audit_catches_a_draw_that_is_not_a_mask(tmp_path):
    class HandDropout(nn.Module):
        def forward(self, x):
            return x * (torch.rand_like(x) > 0.3) / 0.7

    model = nn.Sequential(nn.Dropout(0.5), HandDropout())
    with dropspy.record(model, tmp_path / "run.h5") as rec:
        log = rec.adapter._capture.draw_log = []
        torch.manual_seed(5)
        model(torch.randn(4, 4))
        after = torch.get_rng_state()
    torch.manual_seed(5)
    for draw in log:
        torch.empty_like(draw.mask, dtype=draw.dtype).bernoulli_(draw.p)
    assert len(log) == 1 and not torch.equal(torch.get_rng_state(), after)
    run = dropspy.load(tmp_path / "run.h5")
    assert run["1/untracked"].opaque


def test_cpu_autocast_training_is_bit_identical(tmp_path):
    def train(path=None):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.LSTM(8, 8, 2, dropout=0.3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(5, 2, 8)

        def loop():
            for _ in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x)[0]
                out.float().sum().backward()
                opt.step()

        return M.train_state(model, loop, path)

    (plain, plain_rng), (rec, rec_rng) = train(), train(tmp_path / "run.h5")
    assert torch.equal(plain_rng, rec_rng)
    assert all(torch.equal(a, b) for a, b in zip(plain, rec))
    assert len(dropspy.load(tmp_path / "run.h5")["2/between_layers"]) == 3
