"""Site naming and description for the torch adapter.

A site is found lazily, the first time a mask is drawn (or a dropout call is made) inside a
module of the recorded model. This module turns what the capture saw (module path, kind of
call, where in the user's code, rank of the applied mask) into a stable, unique site name and a
:class:`~dropspy.records.SiteInfo`, and declares it to the session once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dropspy.records import SiteInfo

# Kinds of dropout calls. "feature" kinds draw one Bernoulli per (sample, channel).
ELEMENTWISE = frozenset({"dropout", "alpha_dropout", "native_dropout"})
FEATURE = frozenset({"dropout1d", "dropout2d", "dropout3d", "feature_dropout",
                     "feature_alpha_dropout"})
ALPHA = frozenset({"alpha_dropout", "feature_alpha_dropout"})

# ATen's alpha dropout constant (aten/src/ATen/native/Dropout.cpp), SELU's -scale*alpha.
ALPHA_CONSTANT = 1.7580993408473766


class SiteKey(NamedTuple):
    """What identifies one site: module path, kind of call, and where it was made.

    ``where`` is None for a call a module makes on its own behalf (an ``nn.Dropout`` calling
    ``F.dropout``, an ``nn.LSTM``'s gap ``g``); for a functional call or a hand-made mask in
    a user's ``forward`` it is ``"file.py:line"``, so two ``F.dropout`` calls in one
    ``forward`` are two sites. ``use`` is the line that called the module: one module called
    from several lines (AWD-LSTM's one ``LockedDropout`` at four places) is several sites.

    A named tuple, not a frozen dataclass: a key is made and hashed at every dropout call,
    and a tuple's construction and hash run in C (a dataclass's ``__init__`` and ``__hash__``
    in Python, ~3 us a call together).
    """

    path: str
    kind: str
    where: str | None = None
    use: str | None = None  # the line that called the module: one use of it


@dataclass
class SiteFacts:
    """What the capture knows about a site when it first sees it."""

    layer_class: str
    role: str
    rate: float | None
    own: bool = False  # the module is a dropout module and this is its own mask
    scale: float | None = None
    opaque: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    layout: tuple[str, ...] | None = None  # axis names when the capture knows them


def dropout_scale(kind: str, p: float) -> float | None:
    """The multiplier torch applies to kept elements (None for alpha dropout or p == 1)."""
    if kind in ALPHA or p >= 1.0:
        return None
    return 1.0 / (1.0 - p)


def alpha_coefficients(p: float) -> dict[str, float]:
    """ATen's alpha dropout affine map: ``out = input * mask * a + b(mask)``.

    ``b = (mask - 1) * alpha * a + alpha * a * p``; kept elements get ``input * a + alpha*a*p``.
    """
    a = 1.0 / math.sqrt((ALPHA_CONSTANT * ALPHA_CONSTANT * p + 1) * (1 - p)) if p < 1 else 0.0
    return {"alpha": ALPHA_CONSTANT, "a": a, "b_kept": ALPHA_CONSTANT * a * p,
            "b_dropped": ALPHA_CONSTANT * a * (p - 1)}


def rate_of_keep(p: Any) -> float | None:
    """Drop rate from a Bernoulli keep-probability (a float, or a constant tensor).

    ``1 - 0.9`` is ``0.09999999999999998`` in binary floating point; the configured rate is
    what the user wrote, so the rate is rounded to 12 significant digits.
    """
    value: float | None = None
    if isinstance(p, (int, float)):
        value = float(p)
    else:
        import torch

        if isinstance(p, torch.Tensor) and p.numel() > 0:
            flat = p.reshape(-1)
            if bool((flat == flat[0]).all()):
                value = float(flat[0])
    return None if value is None else clean_rate(1.0 - value)


def clean_rate(rate: float) -> float:
    """``rate`` without the binary noise of ``1 - keep`` (12 significant digits)."""
    clean = _CLEAN.get(rate)
    if clean is None:
        clean = float(f"{rate:.12g}")
        if len(_CLEAN) < 4096:  # a model uses a handful of rates; bounded if it varies them
            _CLEAN[rate] = clean
    return clean


_CLEAN: dict[float, float] = {}


def axes_for(kind: str, rank: int, layout3: tuple[str, ...] | None) -> tuple[tuple[str, ...], str]:
    """Axis names for a mask of ``rank`` applied by a call of ``kind``, and where they come from.

    torch is channels-first: feature dropouts read ``(N, C, L)``, ``(N, C, H, W)``,
    ``(N, C, D, H, W)``. A plain dropout on a rank-3 tensor takes the layout of the model's
    sequence modules (``batch_first``) when they agree, else says it does not know.
    """
    generic = tuple(f"axis{i}" for i in range(rank))
    if kind.startswith("between_layers"):
        if rank == 3:
            return ("time", "batch", "feature"), "torch RNN layer outputs are time-major"
        if rank == 2:
            return ("axis0", "feature"), "packed sequence: rows are (time, batch) pairs"
        return generic, "unknown layout"
    if kind == "attention":
        if rank == 4:
            return (("batch", "head", "query", "key"),
                    "attention probabilities (batch, head, query, key)")
        return generic, "attention weights"
    if kind in FEATURE:
        named = {2: ("batch", "channel"), 3: ("batch", "channel", "time"),
                 4: ("batch", "channel", "height", "width"),
                 5: ("batch", "channel", "depth", "height", "width")}
        if rank in named:
            return named[rank], "torch feature dropout: (N, C, *spatial)"
        return generic, "unknown layout"
    if rank == 1:
        return ("feature",), "rank 1"
    if rank == 2:
        return ("batch", "feature"), "rank 2: (batch, feature)"
    if rank == 3:
        if layout3 is not None:
            return layout3, "batch_first of the model's sequence modules"
        return ("axis0", "axis1", "feature"), "rank 3, layout unknown (features last)"
    if rank == 4:
        return ("batch", "channel", "height", "width"), "rank 4 read as (N, C, H, W)"
    if rank == 5:
        return ("batch", "channel", "depth", "height", "width"), "rank 5 read as (N, C, D, H, W)"
    return generic, "unknown layout"


class SiteRegistry:
    """Names sites, builds their SiteInfo and declares them to the session, each once.

    Args:
        declare: ``Session.declare_site``; returns whether the site is selected.
        taken: Names not to reuse (every module path of the recorded model).
        layout3: Axis names for rank-3 plain-dropout masks, or None when unknown.
    """

    def __init__(self, declare: Callable[[SiteInfo], bool], taken: Iterable[str],
                 layout3: tuple[str, ...] | None) -> None:
        self._declare = declare
        self._taken = set(taken)
        self._layout3 = layout3
        self._base: dict[SiteKey, str] = {}
        self._facts: dict[SiteKey, SiteFacts] = {}
        self._resolved: dict[tuple[SiteKey, int], str | None] = {}
        self._modules_named: set[str] = set()
        self._uses: dict[SiteKey, list[str | None]] = {}
        self._first: dict[SiteKey, str] = {}
        self.infos: dict[str, SiteInfo] = {}

    def facts(self, key: SiteKey) -> SiteFacts | None:
        """Facts recorded for ``key`` (None if never seen)."""
        return self._facts.get(key)

    def known(self, key: SiteKey) -> SiteFacts:
        """Facts of a key already learned (``KeyError`` otherwise)."""
        return self._facts[key]

    def learn(self, key: SiteKey, facts: Callable[[], SiteFacts]) -> None:
        """Remember the facts of ``key`` the first time it is seen (``facts`` is called once)."""
        if key not in self._facts:
            self._facts[key] = facts()

    def resolve(self, key: SiteKey, rank: int) -> str | None:
        """The site name for ``key`` at ``rank``; declares it on first use.

        Returns None when the session's ``sites`` patterns leave the site out.
        """
        got = self._resolved.get((key, rank), "")
        if got != "":
            return got
        base = self._base.get(key)
        if base is None:
            base = self._base[key] = self._name(key)
            name = base
        else:
            # One site has one rank; the same call at another rank (packed vs padded RNN
            # input, batched vs unbatched) becomes its own site.
            name = self._unique(f"{base}@{rank}d")
        facts = self._facts[key]
        if facts.layout is not None and len(facts.layout) == rank:
            axes = facts.layout
            axes_from = ("a parameter's own axes" if facts.extra.get("applied_to") == "parameter"
                         else "known to the capture")
        else:
            axes, axes_from = axes_for(key.kind, rank, self._layout3)
        extra = dict(facts.extra)
        extra.setdefault("kind", key.kind)
        extra["axes_from"] = axes_from
        if key.where is not None:
            extra["source"] = key.where
        if key.use is not None:
            extra["called_from"] = key.use
            extra["use"] = self._uses[self._unused(key)].index(key.use)
        noise_shape = None
        if facts.opaque is None and key.kind in FEATURE and rank >= 2:
            noise_shape = (None, None) + (1,) * (rank - 2)
        elif facts.opaque is None and (key.kind in ELEMENTWISE or key.kind == "attention"
                                       or key.kind.startswith("between_layers")):
            noise_shape = (None,) * rank
        info = SiteInfo(name=name, layer=key.path, layer_class=facts.layer_class,
                        role=facts.role, axes=axes, rate=facts.rate, noise_shape=noise_shape,
                        scale=facts.scale, opaque=facts.opaque, extra=extra)
        selected = self._declare(info)
        self.infos[name] = info
        self._resolved[(key, rank)] = name if selected else None
        return name if selected else None

    @staticmethod
    def _unused(key: SiteKey) -> SiteKey:
        return SiteKey(key.path, key.kind, key.where, None)

    def _name(self, key: SiteKey) -> str:
        """The first use of a call gets the plain name, later uses ``<name>/use<k>``."""
        base = self._unused(key)
        uses = self._uses.setdefault(base, [])
        if key.use not in uses:
            uses.append(key.use)
        k = uses.index(key.use)
        if k == 0:
            name = self._first[base] = self._plain_name(key)
            return name
        first = self._first.get(base)
        if first is None:
            first = self._first[base] = self._plain_name(key)
        return self._unique(f"{first}/use{k}")

    def _plain_name(self, key: SiteKey) -> str:
        facts = self._facts[key]
        path = key.path
        if facts.own and path not in self._modules_named:
            # A dropout module's own mask is named after the module, as DESIGN.md says.
            self._modules_named.add(path)
            if path:
                self._taken.discard(path)
                return self._unique(path)
            return self._unique(facts.layer_class.lower())
        return self._unique(f"{path}/{key.kind}" if path else key.kind)

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self._taken:
            candidate = f"{name}_{i}"
            i += 1
        self._taken.add(candidate)
        return candidate
