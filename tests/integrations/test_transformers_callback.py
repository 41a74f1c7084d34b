"""The transformers Trainer callback: the same masks as record() around the equivalent
hand-written loop, steps as the Trainer counts them (gradient accumulation), evaluation only if
asked, next to other callbacks with report_to="none", and reuse refused at train start."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import dropspy
from dropspy.errors import OptionError, RecordingError
from dropspy.integrations.transformers import DropspyCallback

STEPS, ACCUM, BATCH = 3, 2, 2


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 40, (n, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2():
    """A 2-layer GPT-2 from config: random weights, nothing downloaded."""
    torch.manual_seed(1)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _args(tmp_path, **kw):
    kw = {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": ACCUM,
          "max_steps": STEPS, "report_to": "none", "seed": 42, "save_strategy": "no",
          "train_sampling_strategy": "sequential", "logging_strategy": "no",
          "use_cpu": True, "disable_tqdm": True, **kw}
    return TrainingArguments(output_dir=str(tmp_path / "out"), **kw)


def _masks(site):
    return [site.mask(i) for i in range(len(site))]


def test_trainer_callback_records_the_masks_of_the_equivalent_hand_written_loop(tmp_path,
                                                                                capsys):
    model = _gpt2()

    class Seen(TrainerCallback):   # another callback next to dropspy's sees every step
        steps = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(),
                      callbacks=[Seen(), DropspyCallback(tmp_path / "cb.h5"), PrinterCallback])
    trainer.train()
    assert Seen.steps == [1, 2, 3]
    # The step clock is named truthfully: the user never called mark_step().
    err = capsys.readouterr().err
    assert "steps are the Trainer's optimizer steps" in err and "mark_step()" not in err

    hand = _gpt2()
    set_seed(42)   # what Trainer.__init__ does
    optimizer = torch.optim.AdamW(hand.parameters(), lr=5e-5)
    loader = torch.utils.data.DataLoader(_Tokens(), batch_size=BATCH, shuffle=False)
    hand.train()
    with dropspy.record(hand, tmp_path / "hand.h5"):
        batches = iter(loader)
        for _ in range(STEPS):
            for _ in range(ACCUM):
                (hand(**next(batches)).loss / ACCUM).backward()
            optimizer.step()
            optimizer.zero_grad()

    cb, ref = dropspy.load(tmp_path / "cb.h5"), dropspy.load(tmp_path / "hand.h5")
    assert cb.attrs["integration"] == "transformers"
    assert [n for n in cb.notes if n.startswith("steps are")] == [
        "steps are the Trainer's optimizer steps (state.global_step), marked by the "
        "transformers DropspyCallback"]
    assert cb.complete
    assert sorted(cb) == sorted(ref)
    assert len(cb) >= 5
    for name in cb:
        a, b = cb[name], ref[name]
        # Optimizer steps as the Trainer counts them: ACCUM forwards (calls) in each.
        assert a.steps.tolist() == [s for s in range(STEPS) for _ in range(ACCUM)], name
        assert a.steps.tolist() == b.steps.tolist() and a.calls.tolist() == b.calls.tolist()
        for ma, mb in zip(_masks(a), _masks(b)):
            np.testing.assert_array_equal(ma, mb, err_msg=name)
    # The model is handed back without dropspy's hooks.
    assert not model._forward_pre_hooks and not model.transformer.drop._forward_hooks


@pytest.mark.parametrize("evaluate", [pytest.param(False, marks=pytest.mark.slow), True])
def test_evaluation_during_training_is_recorded_only_if_asked(evaluate, tmp_path):
    class Evaluations(TrainerCallback):
        def __init__(self):
            self.at = []

        def on_evaluate(self, args, state, control, **kwargs):
            self.at.append(state.global_step)

    seen = Evaluations()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
                 gradient_accumulation_steps=1)
    trainer = Trainer(model=_gpt2(), args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(4),
                      callbacks=[seen, DropspyCallback(tmp_path / "run.h5", evaluate=evaluate)])
    trainer.train()
    assert seen.at   # the Trainer evaluated (one batch each time)
    site = dropspy.load(tmp_path / "run.h5")["transformer.drop"]
    training = site.training.tolist()
    assert training.count(True) == STEPS
    evals = [(int(site.steps[i]), site.mask(i)) for i, t in enumerate(training) if not t]
    # Eval-mode forwards, no mask applied, at the step after the last optimizer step.
    assert [step for step, _ in evals] == (seen.at if evaluate else [])
    assert all(mask is None for _, mask in evals)


def test_a_second_train_with_the_same_callback_fails_at_its_start(tmp_path):
    cb = DropspyCallback(tmp_path / "run.h5")
    trainer = Trainer(model=_gpt2(), args=_args(tmp_path, max_steps=1), train_dataset=_Tokens(),
                      callbacks=[cb])
    trainer.train()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(RecordingError, match="already used"):
        trainer.train()
    for p, q in zip(trainer.model.parameters(), before):
        assert torch.equal(p, q)


def test_bad_options_fail_when_the_callback_is_made(tmp_path):
    with pytest.raises(OptionError, match="every"):
        DropspyCallback(tmp_path / "run.h5", every=-1)
