"""The one framework-free adapter the tests use: a 'model' that draws its masks with numpy.

Register it with ``register_adapter(trigger, "fake_adapter", "FakeAdapter")`` (``trigger``: any
module already imported, e.g. ``"fake_adapter"``). It follows
:class:`dropspy.frameworks.base.Adapter`; ``tests/test_recorder.py`` holds it to the protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dropspy.errors import RecordingError
from dropspy.frameworks.base import Session
from dropspy.records import Record, SiteInfo


@dataclass(frozen=True)
class FakeSite:
    """One site of a :class:`FakeModel`: its noise is drawn with ``noise_shape`` and broadcast
    to ``shape`` (so ``(8, 1, 16)`` over ``(8, 12, 16)`` shares the time axis)."""

    name: str
    layer_class: str = "Dropout"
    axes: tuple[str, ...] = ("batch", "feature")
    noise_shape: tuple[int, ...] = (4, 6)
    shape: tuple[int, ...] | None = None
    rate: float = 0.25

    @property
    def applied_shape(self) -> tuple[int, ...]:
        return self.noise_shape if self.shape is None else self.shape


DEFAULT_SITES = (FakeSite("enc.dropout"), FakeSite("dec.dropout"))
SPATIAL = FakeSite("spatial", "SpatialDropout1D", ("batch", "time", "feature"), (8, 1, 16),
                   (8, 12, 16))


class FakeModel:
    """Each ``train_step`` draws one mask per site (kept where uniform >= rate)."""

    def __init__(self, seed: int = 0,
                 sites: tuple[FakeSite | str, ...] = DEFAULT_SITES) -> None:
        self.rng = np.random.default_rng(seed)
        self.sites = tuple(FakeSite(s) if isinstance(s, str) else s for s in sites)
        self.hook: Callable[[str | None, int, np.ndarray | None], None] | None = None
        self.step = 0
        self.drawn: dict[tuple[str, int], np.ndarray] = {}

    def train_step(self) -> None:
        for site in self.sites:
            mask = self.rng.random(site.noise_shape) >= site.rate
            self.drawn[(site.name, self.step)] = mask
            if self.hook is not None:
                self.hook(site.name, self.step, mask)
        if self.hook is not None:
            self.hook(None, self.step, None)
        self.step += 1

    def fit(self, steps: int) -> None:
        for _ in range(steps):
            self.train_step()


class FakeAdapter:
    """Records a :class:`FakeModel`; counts attaches and detaches for lifecycle tests."""

    framework = "fake"
    attached = 0
    detached = 0
    session: Session

    @classmethod
    def claims(cls, model: Any) -> bool:
        return isinstance(model, FakeModel)

    def __init__(self, model: Any) -> None:
        self.model = model
        self.pending: list[Record] = []

    def meta(self) -> dict[str, Any]:
        return {"framework": "fake", "framework_version": "1.0", "backend": "numpy",
                "devices": ["cpu"]}

    def attach(self, session: Session) -> None:
        type(self).attached += 1
        self.session = session
        for site in self.model.sites:
            session.declare_site(SiteInfo(site.name, site.name, site.layer_class, "output",
                                          site.axes, site.rate, scale=1 / (1 - site.rate)))
        self.model.hook = self._hook

    def mark_step(self, step: int | None = None) -> None:
        raise RecordingError("The fake adapter counts steps itself; mark_step() is not "
                             "supported for it.")

    def _hook(self, name: str | None, step: int, mask: np.ndarray | None) -> None:
        if name is None:
            if self.pending:
                self.session.submit(step, self.pending)
            self.pending = []
        elif self.session.want_step(step):
            assert mask is not None
            shape = next(s.applied_shape for s in self.model.sites if s.name == name)
            self.pending.append(Record(name, step, 0, True, shape, noise=mask))

    def detach(self) -> None:
        type(self).detached += 1
        self.model.hook = None
