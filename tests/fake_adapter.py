"""A framework-free adapter for recorder tests: a 'model' that draws masks with numpy."""

from __future__ import annotations

import numpy as np

from dropspy.records import Record, SiteInfo


class FakeModel:
    """Two dropout sites (or ``sites``); each train_step draws one (4, 6) mask per site."""

    def __init__(self, seed: int = 0, sites: tuple[str, ...] = ("enc.dropout", "dec.dropout"),
                 ) -> None:
        self.sites = sites
        self.rng = np.random.default_rng(seed)
        self.hook = None
        self.step = 0
        self.drawn: dict[tuple[str, int], np.ndarray] = {}

    def train_step(self) -> None:
        for name in self.sites:
            mask = self.rng.random((4, 6)) >= 0.25
            self.drawn[(name, self.step)] = mask
            if self.hook is not None:
                self.hook(name, self.step, mask)
        if self.hook is not None:
            self.hook(None, self.step, None)
        self.step += 1


class FakeAdapter:
    framework = "fake"
    attached = 0
    detached = 0

    @classmethod
    def claims(cls, model):
        return isinstance(model, FakeModel)

    def __init__(self, model, session):
        self.model = model
        self.session = session
        self.pending = []

    def meta(self):
        return {"framework": "fake", "framework_version": "1.0", "backend": "numpy",
                "devices": ["cpu"]}

    def attach(self):
        type(self).attached += 1
        for name in self.model.sites:
            self.session.declare_site(SiteInfo(name, name, "Dropout", "output",
                                               ("batch", "feature"), 0.25, scale=4 / 3))
        self.model.hook = self._hook

    def _hook(self, name, step, mask):
        if name is None:
            if self.pending:
                self.session.submit(step, self.pending)
            self.pending = []
        elif self.session.want_step(step):
            self.pending.append(Record(name, step, 0, True, mask.shape, noise=mask))

    def detach(self):
        type(self).detached += 1
        self.model.hook = None
