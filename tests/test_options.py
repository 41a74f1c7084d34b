"""record()'s options: one validated value, checked before anything is built."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_adapter import FakeModel

import dropspy
from dropspy.errors import DropspyError, OptionError
from dropspy.frameworks import _REGISTRY, register_adapter
from dropspy.options import RecordOptions


@pytest.fixture(autouse=True)
def _fake_adapter():
    entry = ("dropspy", "fake_adapter", "FakeAdapter")
    register_adapter(*entry)
    yield
    _REGISTRY.remove(entry)


def _generator_of(values):
    yield from values


BAD = [
    ("every", 0, "an int >= 1", "every=0"),
    ("every", 1.5, "an int >= 1", "every=1.5"),
    ("every", True, "an int >= 1", "every=True"),
    ("every", "2", "an int >= 1", "every='2'"),
    ("steps", [1.7], "iterable of ints >= 0", "steps containing 1.7 (float)"),
    ("steps", [2, -1], "iterable of ints >= 0", "steps containing -1 (int)"),
    ("steps", ["x"], "iterable of ints >= 0", "steps containing 'x' (str)"),
    ("steps", "12", "iterable of ints >= 0", "steps='12'"),
    ("steps", 5, "iterable of ints >= 0", "steps=5"),
    ("steps", range(-2, 3), "iterable of ints >= 0", "steps=range(-2, 3)"),
    ("max_bytes", float("nan"), "bytes >= 0", "max_bytes=nan"),
    ("max_bytes", float("inf"), "bytes >= 0", "max_bytes=inf"),
    ("max_bytes", 10.5, "bytes >= 0", "max_bytes=10.5"),
    ("max_bytes", "10", "bytes >= 0", "max_bytes='10'"),
    ("max_bytes", -1, "bytes >= 0", "max_bytes=-1"),
    ("sites", 5, "glob pattern", "sites=5"),
    ("sites", [5], "glob pattern", "sites containing 5 (int)"),
    ("sites", b"1", "glob pattern", "sites=b'1'"),
    ("sites", ["enc.*", None], "glob pattern", "sites containing None (NoneType)"),
    ("on_full", "wait", "'block' or 'drop'", "on_full='wait'"),
    ("on_full", None, "'block' or 'drop'", "on_full=None"),
]


@pytest.mark.parametrize("name, value, expected, received", BAD,
                         ids=[f"{n}={v!r}" for n, v, _, _ in BAD])
def test_a_bad_option_is_refused_by_name_before_any_file_exists(tmp_path, name, value, expected,
                                                                received):
    path = tmp_path / "bad.h5"
    with pytest.raises(OptionError) as err:
        dropspy.record(FakeModel(), path, **{name: value})
    message = str(err.value)
    assert f"argument `{name}`" in message
    assert expected in message.split("Received")[0]
    assert f"Received: {received}" in message
    assert isinstance(err.value, DropspyError) and isinstance(err.value, ValueError)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_options_are_checked_before_the_model_is_looked_at(tmp_path):
    # An unknown model with a bad option: the option is named, not the model.
    with pytest.raises(OptionError, match="`every`"):
        dropspy.record(object(), tmp_path / "x.h5", every=0)


def test_a_generator_of_steps_is_read_once_and_recorded(tmp_path):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "g.h5", steps=_generator_of([1, 3])):
        model.fit(5)
    run = dropspy.load(tmp_path / "g.h5")
    assert run["enc.dropout"].steps.tolist() == [1, 3]
    assert json.loads(run.attrs["config"])["steps"] == "[1, 3]"


def test_numpy_integers_and_whole_float_budgets_are_accepted():
    opts = RecordOptions.of(every=np.int64(2), steps=np.array([4, 0, 4]), max_bytes=1e3,
                            sites=(p for p in ["enc.*", "dec.*"]))
    assert opts == RecordOptions(every=2, steps=frozenset({0, 4}), sites=("enc.*", "dec.*"),
                                 max_bytes=1000, on_full="block")
    assert type(opts.every) is int and type(opts.max_bytes) is int
    assert [s for s in range(10) if opts.wants(s)] == [0, 4]


def test_one_pattern_becomes_a_tuple_and_a_range_stays_a_range():
    opts = RecordOptions.of(sites="enc.*", steps=range(3, 9), every=2)
    assert opts.sites == ("enc.*",)
    assert opts.steps == range(3, 9)
    assert [s for s in range(12) if opts.wants(s)] == [4, 6, 8]
    assert opts.describe() == {"every": 2, "steps": "range(3, 9, 1)", "sites": ["enc.*"],
                               "max_bytes": None, "on_full": "block"}


def test_options_are_frozen():
    opts = RecordOptions.of()
    with pytest.raises(AttributeError):
        opts.every = 3  # type: ignore[misc]


def test_the_run_file_keeps_the_options_it_was_recorded_with(tmp_path):
    model = FakeModel()
    with dropspy.record(model, tmp_path / "c.h5", every=2, sites=["enc.*"], max_bytes=1 << 20,
                        on_full="drop"):
        model.fit(4)
    run = dropspy.load(tmp_path / "c.h5")
    assert json.loads(run.attrs["config"]) == {"every": 2, "steps": None, "sites": ["enc.*"],
                                               "max_bytes": 1 << 20, "on_full": "drop"}
    assert run["enc.dropout"].steps.tolist() == [0, 2]
