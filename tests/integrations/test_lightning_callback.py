"""The Lightning callback: the same masks (and weights) as record() around the equivalent
hand-written loop, steps = trainer.global_step under gradient accumulation, validation only if
asked, the file closed when training raises, reuse refused at train start."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

import dropspy
from dropspy.errors import OptionError, RecordingError, UnsupportedModelError
from dropspy.integrations.lightning import DropspyCallback

STEPS, ACCUM = 3, 2
F = torch.nn.functional


class _Module(pl.LightningModule):
    """Dropout before a 2-layer LSTM with between-layer dropout, then a linear head."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.drop = torch.nn.Dropout(0.3)
        self.lstm = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.25, batch_first=True)
        self.head = torch.nn.Linear(4, 1)
        self.fail_at = fail_at

    def forward(self, x):
        out, _ = self.lstm(self.drop(x))
        return self.head(out[:, -1])

    def training_step(self, batch, i):
        if i == self.fail_at:
            raise RuntimeError("loss went bad")
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 5, 3, generator=g), torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2,
                                       shuffle=False)


def _module(**kw):
    torch.manual_seed(1)
    return _Module(**kw)


def _trainer(*callbacks, **kw):
    kw = {"max_steps": STEPS, "accumulate_grad_batches": ACCUM, "accelerator": "cpu",
          "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "enable_model_summary": False, "num_sanity_val_steps": 0, **kw}
    return pl.Trainer(callbacks=list(callbacks), **kw)


def test_lightning_callback_records_the_masks_of_the_equivalent_hand_written_loop(tmp_path,
                                                                               capsys):
    module = _module()
    pl.seed_everything(7)
    trainer = _trainer(DropspyCallback(tmp_path / "cb.h5"))
    trainer.fit(module, _loader())
    assert trainer.global_step == STEPS
    # The step clock is named truthfully: the user never called mark_step().
    err = capsys.readouterr().err
    assert "steps are Lightning's trainer.global_step" in err and "mark_step()" not in err

    hand = _module()
    pl.seed_everything(7)
    optimizer = torch.optim.SGD(hand.parameters(), lr=0.1)
    hand.train()
    with dropspy.record(hand, tmp_path / "hand.h5"):
        batches = iter(_loader())
        for _ in range(STEPS):
            for _ in range(ACCUM):
                x, y = next(batches)
                (F.mse_loss(hand(x), y) / ACCUM).backward()
            optimizer.step()
            optimizer.zero_grad()

    cb, ref = dropspy.load(tmp_path / "cb.h5"), dropspy.load(tmp_path / "hand.h5")
    assert cb.attrs["integration"] == "lightning"
    assert any(n.startswith("steps are Lightning's trainer.global_step") for n in cb.notes)
    assert cb.complete
    assert sorted(cb) == sorted(ref) == ["drop", "lstm/between_layers"]
    for name in cb:
        a, b = cb[name], ref[name]
        # trainer.global_step: one step per optimizer step, ACCUM forwards (calls) in each.
        assert a.steps.tolist() == [s for s in range(STEPS) for _ in range(ACCUM)], name
        assert a.calls.tolist() == b.calls.tolist()
        for i in range(len(a)):
            np.testing.assert_array_equal(a.mask(i), b.mask(i), err_msg=name)
    for p, q in zip(module.parameters(), hand.parameters()):   # and the same training
        assert torch.equal(p, q)
    assert not module._forward_pre_hooks and not module.drop._forward_hooks


@pytest.mark.parametrize("evaluate", [False, True])
def test_validation_is_recorded_only_if_asked(evaluate, tmp_path):
    trainer = _trainer(DropspyCallback(tmp_path / "run.h5", evaluate=evaluate),
                       accumulate_grad_batches=1, val_check_interval=2, limit_val_batches=1,
                       max_steps=STEPS + 1, num_sanity_val_steps=1)
    trainer.fit(_module(), _loader(), _loader(4))
    site = dropspy.load(tmp_path / "run.h5")["drop"]
    training = site.training.tolist()
    assert training.count(True) == STEPS + 1
    # Validation after steps 2 and 4 (one batch each; the sanity check runs before training
    # starts and is never recorded): eval-mode forwards, no mask applied.
    evals = [int(site.steps[i]) for i, t in enumerate(training) if not t]
    assert evals == ([2, 4] if evaluate else [])
    assert all(site.mask(i) is None for i, t in enumerate(training) if not t)


def test_an_exception_in_training_closes_the_file_and_restores_the_module(tmp_path):
    module = _module(fail_at=2)
    cb = DropspyCallback(tmp_path / "run.h5")
    with pytest.raises(RuntimeError, match="went bad"):
        _trainer(cb, accumulate_grad_batches=1).fit(module, _loader())
    run = dropspy.load(tmp_path / "run.h5")
    assert run.complete
    assert run["drop"].steps.tolist() == [0, 1]
    assert not module._forward_pre_hooks and not module.drop._forward_hooks


def test_a_second_fit_with_the_same_callback_fails_at_its_start(tmp_path):
    module = _module()
    cb = DropspyCallback(tmp_path / "run.h5")
    _trainer(cb, max_steps=1).fit(module, _loader())
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RecordingError, match="already used"):
        _trainer(cb, max_steps=1).fit(module, _loader())
    for p, q in zip(module.parameters(), before):
        assert torch.equal(p, q)


def test_a_module_dropspy_cannot_record_fails_at_train_start(tmp_path, monkeypatch):
    module = _module()
    monkeypatch.setattr(module, "lstm", torch.compile(module.lstm))   # compiled lazily
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(UnsupportedModelError, match="torch.compile"):
        _trainer(DropspyCallback(tmp_path / "run.h5")).fit(module, _loader())
    for p, q in zip(module.parameters(), before):
        assert torch.equal(p, q)


def test_bad_options_fail_when_the_callback_is_made(tmp_path):
    with pytest.raises(OptionError, match="sites"):
        DropspyCallback(tmp_path / "run.h5", sites=[1])


def test_the_same_callback_drives_a_pytorch_lightning_trainer_and_a_step_without_forward(
        tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")

    class Module(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.3)
            self.head = torch.nn.Linear(3, 1)

        def training_step(self, batch, i):   # submodules called, never self(x)
            x, y = batch
            return F.mse_loss(self.head(self.drop(x[:, -1])), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = ptl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False,
                          callbacks=[DropspyCallback(tmp_path / "run.h5")])
    trainer.fit(Module(), _loader())
    run = dropspy.load(tmp_path / "run.h5")
    assert run.attrs["integration"] == "lightning"
    assert run["drop"].steps.tolist() == list(range(STEPS)) == list(range(trainer.global_step))


def test_a_resumed_fit_records_steps_from_the_trainers_global_step(tmp_path):
    module = _module()
    first = _trainer(accumulate_grad_batches=1, max_steps=2)
    first.fit(module, _loader())
    first.save_checkpoint(tmp_path / "two.ckpt")
    resumed = _trainer(DropspyCallback(tmp_path / "run.h5"), accumulate_grad_batches=1,
                       max_steps=4)
    resumed.fit(_module(), _loader(), ckpt_path=tmp_path / "two.ckpt")
    assert resumed.global_step == 4
    assert dropspy.load(tmp_path / "run.h5")["drop"].steps.tolist() == [2, 3]
