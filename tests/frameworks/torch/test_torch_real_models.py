"""Real model code nobody here wrote: AWD-LSTM's locked, embedding and weight dropout in the
styles real code writes them, GPT-2 and BERT from a transformers config (random weights,
nothing downloaded), ``nn.TransformerEncoder`` in eval with a padding mask; and the guarantee
that a failure inside dropspy never reaches the user's forward."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import _torch_models as M
from typer.testing import CliRunner

import dropspy
from dropspy.cli import app


def _train(model, steps, path=None, seed=0, data=None):
    """``steps`` training steps; returns the final weights and the RNG state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = M.lm_data(steps, seed=seed) if data is None else data

    def loop():
        torch.manual_seed(seed)
        for tokens, targets in data:
            M.lm_step(model, opt, tokens, targets)

    return M.train_state(model, loop, path)


def _assert_same_training(make, tmp_path, steps=2):
    plain_w, plain_rng = _train(make(), steps)
    rec_w, rec_rng = _train(make(), steps, tmp_path / "run.h5")
    assert all(torch.equal(a, b) for a, b in zip(plain_w, rec_w))
    assert torch.equal(plain_rng, rec_rng)
    return dropspy.load(tmp_path / "run.h5")


# -- AWD-LSTM -----------------------------------------------------------------------------


def test_awd_lstm_training_is_bit_identical_and_each_lockdrop_use_is_a_site(tmp_path):
    run = _assert_same_training(M.awd_lstm, tmp_path)
    uses = {name: run[name] for name in ("lockdrop", "lockdrop/use1", "lockdrop/use2")}
    # One module called from three lines of AWD's forward, at the rates each line passes.
    assert [s.rate for s in uses.values()] == [0.65, 0.3, 0.4]
    assert [len(s) for s in uses.values()] == [2, 4, 2]  # the middle line runs in a loop
    for site in uses.values():
        assert site.axes == ("time", "batch", "feature")
        assert np.allclose(site.rates, site.rate)
        assert (site.noise_shapes[:, 0] == 1).all() and (site.shapes[:, 0] == M.SEQ).all()
        assert site.extra["called_from"].startswith("_torch_models.py:")
    assert uses["lockdrop/use1"].extra["use"] == 1
    report = run.report()
    for name in uses:
        s = report[name]
        assert s.rate.verdict == "ok"
        assert not any(f.code == "rate-mismatch" for f in s.findings)
        assert [a.name for a in s.axes if a.verdict == "shared"] == ["time"]


def test_dropspy_check_expects_time_shared_lockdrop_on_awd_lstm(tmp_path):
    _train(M.awd_lstm(), 2, tmp_path / "run.h5")
    result = CliRunner().invoke(app, ["check", str(tmp_path / "run.h5"),
                                      "--expect", "lockdrop: shared=time"])
    assert result.exit_code == 0, result.output


def test_embedded_dropout_is_named_after_its_function_with_the_configured_rate(tmp_path):
    run = _assert_same_training(M.awd_lstm, tmp_path, steps=1)
    site = run["embedded_dropout"]
    assert site.rate == 0.1  # 1 - 0.9 in floats is 0.09999999999999998: not what was set
    assert site.extra["applied_to"] == "parameter" and site.axes == ("axis0", "axis1")
    assert tuple(site.shapes[0]) == (M.VOCAB, 32) and tuple(site.noise_shapes[0]) == (M.VOCAB, 1)


def test_weight_dropout_of_each_layer_is_its_own_site(tmp_path):
    run = _assert_same_training(M.awd_lstm, tmp_path, steps=1)
    for i in range(3):
        site = run[f"rnns.{i}/dropout"]
        assert site.rate == 0.5 and site.extra["applied_to"] == "parameter"


@pytest.mark.parametrize("style", ["awd", *M.LOCKED_STYLES])
def test_locked_dropout_is_followed_to_its_applied_mask_in_every_style(tmp_path, style):
    lock = M.LockedDropout() if style == "awd" else M.StyledLockedDropout(style)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lock = lock

        def forward(self, x):
            self.seen = self.lock(x, 0.4)
            return self.seen

    net = Net()
    x = torch.randn(6, 3, 5) + 3.0  # no zeros: the output's zeros are the dropped elements
    torch.manual_seed(1)
    plain = net(x)
    torch.manual_seed(1)
    with dropspy.record(net, tmp_path / "run.h5"):
        recorded = net(x)
    assert torch.equal(plain, recorded)
    (name,) = dropspy.load(tmp_path / "run.h5").sites
    site = dropspy.load(tmp_path / "run.h5")[name]
    assert tuple(site.shapes[0]) == (6, 3, 5) and tuple(site.noise_shapes[0]) == (1, 3, 5)
    assert site.axes == ("axis0", "axis1", "feature") or site.axes[2] == "feature"
    assert site.rate == pytest.approx(0.4)
    mask = np.broadcast_to(site.mask(0), (6, 3, 5))
    assert np.array_equal(mask, recorded.detach().numpy() != 0)


# -- transformers --------------------------------------------------------------------------


pytest.importorskip("transformers")


def _gpt2(attn):
    return lambda: M.HFLogits(M.gpt2(attn))


@pytest.mark.parametrize("attn", ["eager", pytest.param("sdpa", marks=pytest.mark.slow)])
def test_gpt2_training_is_bit_identical(tmp_path, attn):
    run = _assert_same_training(_gpt2(attn), tmp_path)
    attention = [n for n in run.sites if run[n].role == "attention"]
    assert attention == ["model.transformer.h.0.attn/attention",
                         "model.transformer.h.1.attn/attention"]
    for name in attention:
        assert run[name].axes == ("batch", "head", "query", "key")
        assert tuple(run[name].shapes[0]) == (M.BATCH, 4, M.SEQ, M.SEQ)
        assert run[name].rate == 0.1
    assert not any("attn_dropout" in note for note in run.notes)


def test_gpt2_eager_and_sdpa_give_the_same_sites_and_axes(tmp_path):
    _train(_gpt2("eager")(), 1, tmp_path / "eager.h5")
    _train(_gpt2("sdpa")(), 1, tmp_path / "sdpa.h5")
    eager, sdpa = dropspy.load(tmp_path / "eager.h5"), dropspy.load(tmp_path / "sdpa.h5")
    assert eager.sites == sdpa.sites
    for name in eager.sites:
        assert eager[name].axes == sdpa[name].axes
    result = CliRunner().invoke(app, ["diff", str(tmp_path / "eager.h5"),
                                      str(tmp_path / "sdpa.h5")])
    assert result.exit_code in (0, 1), result.output
    assert "only in" not in result.output


def test_gpt2_attention_mask_is_the_one_applied(tmp_path, monkeypatch):
    model = M.gpt2("eager")
    probs = []
    softmax = F.softmax

    def spy(x, dim=None, **kwargs):  # the attention probabilities, before their dropout
        out = softmax(x, dim=dim, **kwargs)
        probs.append(out.detach().clone())
        return out

    tokens = M.lm_data(1)[0][0]
    with dropspy.record(model, tmp_path / "run.h5"):
        monkeypatch.setattr(F, "softmax", spy)
        out = model(input_ids=tokens, output_attentions=True)
        monkeypatch.setattr(F, "softmax", softmax)
    run = dropspy.load(tmp_path / "run.h5")
    for layer in range(2):
        mask = torch.from_numpy(run[f"transformer.h.{layer}.attn/attention"].mask(0))
        expected = probs[layer] * (mask.to(torch.float32) / 0.9)
        assert torch.equal(expected, out.attentions[layer].detach())


@pytest.mark.slow
def test_bert_attention_sites_are_batch_head_query_key(tmp_path):
    run = _assert_same_training(lambda: M.HFLogits(M.bert("eager")), tmp_path, steps=1)
    attention = [n for n in run.sites if run[n].role == "attention"]
    assert len(attention) == 2
    assert all(run[n].axes == ("batch", "head", "query", "key") for n in attention)


# -- never break the user's forward ------------------------------------------------------


def test_transformer_encoder_eval_with_padding_mask_runs_as_without_dropspy(tmp_path):
    model = M.transformer_lm()
    tokens = M.lm_data(1)[0][0]
    padding = torch.zeros(tokens.shape, dtype=torch.bool)
    padding[:, -5:] = True  # left-aligned padding: the nested-tensor fast path
    model.eval()
    with torch.no_grad():
        plain = model(tokens, padding)
        with dropspy.record(model, tmp_path / "run.h5"):
            model.train()
            model(tokens).sum()
            model.eval()
            recorded = model(tokens, padding)
    assert torch.equal(plain, recorded)
    run = dropspy.load(tmp_path / "run.h5")
    assert run.records_dropped.get("capture_error", 0) == 0


def test_transformer_encoder_lm_training_is_bit_identical(tmp_path):
    run = _assert_same_training(M.transformer_lm, tmp_path)
    assert run["encoder.layers.0.self_attn/attention"].axes == ("batch", "head", "query", "key")


def _faults():
    from dropspy.frameworks.torch.adapter import TorchAdapter
    from dropspy.frameworks.torch.capture import Capture

    return [
        (Capture, "on_dropout"), (Capture, "on_bernoulli"), (Capture, "locate"),
        (Capture, "propagate"), (Capture, "end_module"), (Capture, "rnn_done"),
        (Capture, "on_attention_without_draw"), (Capture, "forward_done"),
        (TorchAdapter, "_begin_forward"), (TorchAdapter, "_end_forward"),
        (TorchAdapter, "_flush"), (TorchAdapter, "_optimizer_stepped"),
    ]


class _Everything(nn.Module):
    """Every hooked and observed path: nn.Dropout, F.dropout, a hand-made locked mask, an
    AWD-style user dropout module (hooked), a stacked LSTM (hooked), MHA, SDPA."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(M.VOCAB, 8)
        self.drop = nn.Dropout(0.2)
        self.lockdrop = M.LockedDropout()
        self.lstm = nn.LSTM(8, 8, num_layers=2, dropout=0.3)
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.1)
        self.head = nn.Linear(8, M.VOCAB)

    def forward(self, tokens):
        h = self.drop(self.embed(tokens.t()))
        h = self.lockdrop(h, 0.3)
        h, _ = self.lstm(h)
        h, _ = self.mha(h, h, h, need_weights=False)
        h = F.scaled_dot_product_attention(h, h, h, dropout_p=0.1 if self.training else 0.0)
        return self.head(F.dropout(h, 0.1, self.training)).transpose(0, 1)


@pytest.mark.parametrize("owner, name", _faults(), ids=lambda x: getattr(x, "__name__", x))
def test_a_fault_in_any_dropspy_hook_never_reaches_the_users_code(tmp_path, monkeypatch,
                                                                   owner, name):
    def make():
        torch.manual_seed(0)
        return _Everything()

    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, M.VOCAB, (2, 4, 9), generator=g)
    data = [(s[:, :-1], s[:, 1:]) for s in seqs]
    plain_w, plain_rng = _train(make(), 2, data=data)

    def broken(*args, **kwargs):
        raise RuntimeError(f"injected fault in {name}")

    monkeypatch.setattr(owner, name, broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec_w, rec_rng = _train(make(), 2, tmp_path / "run.h5", data=data)
    with warnings.catch_warnings(record=True) as caught_eval:
        warnings.simplefilter("always")
        model = make().eval()
        tokens = data[0][0]
        plain_eval = model(tokens)
        with dropspy.record(model, tmp_path / "eval.h5"):
            assert torch.equal(model(tokens), plain_eval)
    assert all(torch.equal(a, b) for a, b in zip(plain_w, rec_w))
    assert torch.equal(plain_rng, rec_rng)
    warned = 0
    for log, path in ((caught, "run.h5"), (caught_eval, "eval.h5")):
        ours = [str(w.message) for w in log if issubclass(w.category, dropspy.DropspyWarning)
                and "injected fault" in str(w.message)]
        assert len(ours) <= 1  # once per recording and cause, not per call
        dropped = dropspy.load(tmp_path / path).records_dropped.get("capture_error", 0)
        assert (len(ours) == 1) == (dropped >= 1)  # every warned miss is counted, and back
        warned += len(ours)
    assert warned >= 1  # the fault was hit and said


# -- rates per record ----------------------------------------------------------------------


def test_functional_dropout_with_a_varying_rate_is_judged_record_by_record(tmp_path):
    class Net(nn.Module):
        def forward(self, x, p):
            return F.dropout(x, p, True)

    net = Net()
    x = torch.ones(64, 256)
    with dropspy.record(net, tmp_path / "run.h5"):
        for p in (0.1, 0.5, 0.1, 0.5):
            net(x, p)
    run = dropspy.load(tmp_path / "run.h5")
    (name,) = run.sites
    site = run[name]
    assert site.rates.tolist() == pytest.approx([0.1, 0.5, 0.1, 0.5])
    analysis = run.report()[name]
    assert analysis.rate.verdict == "ok" and analysis.rate.configured == pytest.approx(0.3)
    assert analysis.extra["record_rates"] == [0.1, 0.5]


def test_version_1_files_read_the_site_rate_for_every_record(tmp_path):
    import h5py

    net = nn.Sequential(nn.Dropout(0.25))
    with dropspy.record(net, tmp_path / "run.h5"):
        net(torch.ones(4, 4))
        net(torch.ones(4, 4))
    with h5py.File(tmp_path / "run.h5", "r+") as f:
        f.attrs["format_version"] = 1
        for key in f["sites"]:
            del f["sites"][key]["rate"]
            del f["sites"][key]["replica"]
    site = dropspy.load(tmp_path / "run.h5")["0"]
    assert site.rates.tolist() == [0.25, 0.25]
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "run.h5")])
    assert result.exit_code == 0, result.output
