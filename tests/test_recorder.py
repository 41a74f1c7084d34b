"""record(): detection, sampling policy, lifecycle, summary, errors."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from fake_adapter import FakeAdapter, FakeModel

import dropspy
from dropspy.errors import OptionError, RecordingError, UnsupportedModelError
from dropspy.frameworks import _REGISTRY, register_adapter
from dropspy.frameworks.base import Adapter, Session
from dropspy.recorder import Session as RecorderSession


@pytest.fixture(autouse=True)
def _fake_adapter():
    # "dropspy" is always imported, so the fake adapter is always a candidate.
    entry = ("dropspy", "fake_adapter", "FakeAdapter")
    register_adapter(*entry)
    yield
    _REGISTRY.remove(entry)


def test_records_every_mask_exactly(tmp_path):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "r.h5"):
        for _ in range(5):
            model.train_step()
    run = dropspy.load(tmp_path / "r.h5")
    assert run.sites == ("enc.dropout", "dec.dropout")
    assert run.framework == "fake" and run.attrs["framework_version"] == "1.0"
    assert run.complete and run.records_written == 10
    for name in run.sites:
        site = run[name]
        assert site.steps.tolist() == [0, 1, 2, 3, 4]
        for i, step in enumerate(site.steps):
            assert np.array_equal(site.mask(i), model.drawn[(name, int(step))])


@pytest.mark.parametrize(
    "kwargs, steps",
    [
        (dict(every=3), [0, 3, 6, 9]),
        (dict(steps=range(2, 5)), [2, 3, 4]),
        (dict(steps=[1, 7], every=1), [1, 7]),
        (dict(every=2, steps=range(3, 9)), [4, 6, 8]),
        (dict(steps=[]), []),
    ],
)
def test_sampling_policy_picks_the_steps(tmp_path, kwargs, steps):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "s.h5", **kwargs):
        for _ in range(10):
            model.train_step()
    run = dropspy.load(tmp_path / "s.h5")
    assert run["enc.dropout"].steps.tolist() == steps


def test_site_globs_leave_other_sites_out_and_say_so(tmp_path):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "g.h5", sites="enc.*"):
        model.train_step()
    run = dropspy.load(tmp_path / "g.h5")
    assert run.sites == ("enc.dropout",)
    assert any("dec.dropout" in n for n in run.notes)
    assert run.records_dropped["site_filter"] == 1


def test_summary_line_tells_policy_skips_from_losses(tmp_path, capsys):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "p.h5", sites="enc.*"):
        model.train_step()
    err = capsys.readouterr().err
    assert "0 records dropped, 1 left out by sites=" in err


def test_summary_line_on_exit(tmp_path, capsys):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "x.h5"):
        model.train_step()
    err = capsys.readouterr().err
    assert "2 sites, 2 records" in err and "0 records dropped" in err


def test_detaches_when_training_raises(tmp_path):
    model = FakeModel()
    before = FakeAdapter.detached
    with pytest.raises(ZeroDivisionError):
        with dropspy.record(model, tmp_path / "e.h5"):
            model.train_step()
            _ = 1 / 0
    assert FakeAdapter.detached == before + 1 and model.hook is None
    run = dropspy.load(tmp_path / "e.h5")
    assert run.complete and len(run["enc.dropout"]) == 1


def test_nesting_on_one_model_is_refused_and_sequential_use_works(tmp_path):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "a.h5"):
        with pytest.raises(RecordingError, match="already being recorded"):
            with dropspy.record(model, tmp_path / "b.h5"):
                pass
        model.train_step()
    rec = dropspy.record(model, tmp_path / "c.h5")
    with rec:
        model.train_step()
    with pytest.raises(RecordingError, match="already used"):
        with rec:
            pass
    assert len(dropspy.load(tmp_path / "a.h5")["enc.dropout"]) == 1
    assert dropspy.load(tmp_path / "c.h5")["enc.dropout"].steps.tolist() == [1]


def test_two_models_record_side_by_side(tmp_path):
    a, b = FakeModel(1), FakeModel(2)
    with dropspy.record(a, tmp_path / "a.h5"), dropspy.record(b, tmp_path / "b.h5"):
        a.train_step()
        b.train_step()
    assert np.array_equal(dropspy.load(tmp_path / "b.h5")["enc.dropout"].mask(0),
                          b.drawn[("enc.dropout", 0)])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(every=0), "every"), (dict(on_full="wait"), "on_full"), (dict(steps=["x"]), "steps")],
)
def test_bad_arguments_say_what_was_received(tmp_path, kwargs, match):
    with pytest.raises(OptionError, match=match):
        with dropspy.record(FakeModel(), tmp_path / "bad.h5", **kwargs):
            pass


def test_unknown_model_names_what_was_received(tmp_path):
    with pytest.raises(UnsupportedModelError, match="Received: builtins.object") as exc:
        dropspy.record(object(), tmp_path / "n.h5")
    assert "Keras 3" in str(exc.value) and "tf_keras.Model" in str(exc.value)
    assert "torch.nn.Module" in str(exc.value)


def test_start_and_stop_record_like_with(tmp_path, capsys):
    model = FakeModel()
    rec = dropspy.record(model, tmp_path / "ss.h5")
    assert rec.start() is rec
    for _ in range(3):
        model.train_step()
    rec.stop()
    rec.stop()  # a second stop does nothing
    assert model.hook is None
    run = dropspy.load(tmp_path / "ss.h5")
    assert run.complete and run["enc.dropout"].steps.tolist() == [0, 1, 2]
    assert capsys.readouterr().err.count("dropspy: ") == 1  # one summary line


def test_stop_before_start_says_how_to_start(tmp_path):
    rec = dropspy.record(FakeModel(), tmp_path / "x.h5")
    with pytest.raises(RecordingError, match="never started"):
        rec.stop()
    rec.start()
    rec.stop()


def test_a_recording_never_started_warns_when_collected(tmp_path):
    import gc

    with pytest.warns(dropspy.DropspyWarning,
                      match=r"x\.h5'\) was never started: nothing was recorded"):
        dropspy.record(FakeModel(), tmp_path / "x.h5")
        gc.collect()
    assert not (tmp_path / "x.h5").exists()


def test_a_started_recording_does_not_warn_when_collected(tmp_path, recwarn):
    import gc

    with dropspy.record(FakeModel(), tmp_path / "ok.h5"):
        pass
    gc.collect()
    assert not [w for w in recwarn if "never started" in str(w.message)]


def test_a_model_without_dropout_warns_naming_the_model_and_what_dropspy_looks_for(tmp_path):
    with pytest.warns(dropspy.DropspyWarning,
                      match="found no dropout in FakeModel.*looks for") as caught:
        with dropspy.record(FakeModel(sites=()), tmp_path / "none.h5") as rec:
            rec.model.train_step()
    assert caught[0].filename == __file__  # points at the user's `with`, not into dropspy
    rec = dropspy.record(FakeModel(sites=()), tmp_path / "none2.h5").start()
    with pytest.warns(dropspy.DropspyWarning, match="found no dropout") as caught:
        rec.stop()
    assert caught[0].filename == __file__


def test_a_sites_pattern_matching_nothing_lists_the_sites_that_exist(tmp_path):
    model = FakeModel()
    with pytest.warns(dropspy.DropspyWarning,
                      match=r"sites='dropuot\*' matched no site of FakeModel; its sites: "
                            r"enc.dropout, dec.dropout"):
        with dropspy.record(model, tmp_path / "typo.h5", sites="dropuot*"):
            model.train_step()


def test_a_pattern_that_matches_gives_no_warning(tmp_path, recwarn):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "m.h5", sites=["enc.*", "dec.dropout"]):
        model.train_step()
    assert not [w for w in recwarn if issubclass(w.category, dropspy.DropspyWarning)]


@pytest.mark.parametrize("nbytes, text", [(0, "0 bytes"), (1, "1 byte"), (999, "999 bytes"),
                                          (12_345, "12.3 KB"), (1_048_576, "1.05 MB")])
def test_summary_line_sizes_in_units_a_person_reads(nbytes, text):
    from dropspy.recorder import _summary_line

    stats = {"sites": 1, "records_written": 1, "bytes": nbytes, "records_dropped": {},
             "error": None}
    assert _summary_line("r.h5", stats) == (
        f"dropspy: r.h5: 1 site, 1 record, {text} of masks, 0 records dropped")


def _members(protocol):
    return {name: value for name, value in vars(protocol).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, classmethod))}


def _parameters(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls, protocol", [(FakeAdapter, Adapter), (RecorderSession, Session)])
def test_the_fake_adapter_and_the_session_follow_the_contract(cls, protocol):
    # mypy holds the built-in adapters to the protocol (frameworks/__init__.py); this holds the
    # test double to it, so the recorder tests exercise the contract the adapters follow.
    members = _members(protocol)
    assert members, "the protocol has no methods: the test would prove nothing"
    for name in members:
        assert _parameters(getattr(cls, name)) == _parameters(getattr(protocol, name)), name
    if protocol is Adapter:
        assert _parameters(cls.__init__) == _parameters(protocol.__init__)
        assert isinstance(cls.framework, str)


def test_the_adapter_meets_a_complete_session_after_the_file_is_open(tmp_path, monkeypatch):
    seen = {}
    attach = FakeAdapter.attach

    def spy(self, session):
        seen["writer_open"] = session.writer is not None and session.writer.error is None
        seen["file_exists"] = (tmp_path / "o.h5").exists()
        attach(self, session)

    monkeypatch.setattr(FakeAdapter, "attach", spy)
    with dropspy.record(FakeModel(), tmp_path / "o.h5"):
        pass
    assert seen == {"writer_open": True, "file_exists": True}


def test_mark_step_outside_the_with_block_or_on_a_self_counting_adapter_says_so(tmp_path):
    model = FakeModel()
    rec = dropspy.record(model, tmp_path / "m.h5")
    with pytest.raises(RecordingError, match="inside the `with"):
        rec.mark_step()
    with rec:
        with pytest.raises(RecordingError, match="counts steps itself"):
            rec.mark_step()


def test_a_torch_model_without_dropout_warns_naming_torch_dropout_kinds(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(dropspy.DropspyWarning,
                      match=r"found no dropout in Sequential.*nn\.Dropout"):
        with dropspy.record(model, tmp_path / "plain.h5"):
            opt.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
    assert dropspy.load(tmp_path / "plain.h5").sites == ()


def test_a_run_that_samples_no_step_does_not_claim_the_model_has_no_dropout(tmp_path, recwarn):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    with dropspy.record(model, tmp_path / "nothing.h5", steps=[]):
        model(torch.ones(2, 4))
    assert not [w for w in recwarn if "found no dropout" in str(w.message)]
    # The same model, sampled, has its dropout found: the silence above is not a blind spot...
    with dropspy.record(model, tmp_path / "one.h5", steps=[0]):
        model(torch.ones(2, 4))
    assert [s.name for s in dropspy.load(tmp_path / "one.h5").values()] == ["1"]
    # ...and a model without dropout, sampled through steps=, is still warned about.
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.warns(dropspy.DropspyWarning, match="found no dropout in Sequential"):
        with dropspy.record(plain, tmp_path / "plain.h5", steps=[0]):
            plain(torch.ones(2, 4))
