"""ATen-level mask copying, and where in the user's code a call was made.

:class:`Grabber` is the short-lived ``TorchDispatchMode`` entered only inside a dropout entry
point or a composite: it copies every keep-mask ATen draws (``bernoulli_``'s output the moment
it returns, because ATen scales it in place right after; ``native_dropout``'s mask on CUDA).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_DROPSPY_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SEEDED = torch.Tag.nondeterministic_seeded


class Draw:
    """A mask ATen drew while a :class:`Grabber` was active."""

    __slots__ = ("op", "mask", "p", "dtype")

    def __init__(self, op: str, mask: torch.Tensor, p: Any, dtype: torch.dtype) -> None:
        self.op = op
        self.mask = mask
        self.p = p
        self.dtype = dtype


def _watch_table() -> dict[Any, str]:
    table = {}
    for packet, what in ((_aten.bernoulli_, "bernoulli_"), (_aten.bernoulli, "bernoulli"),
                         (_aten.native_dropout, "native_dropout")):
        for name in packet.overloads():
            table[getattr(packet, name)] = what
    return table


_WATCH = _watch_table()
_SEEDED_CACHE: dict[Any, bool] = {}


class Grabber(TorchDispatchMode):
    """Copies every keep-mask ATen draws while active; lists other seeded (random) ops."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[Draw] = []
        self.other_random: list[str] = []
        self.error: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **kwargs) if kwargs else func(*args)
        what = _WATCH.get(func)
        if what is None:
            seeded = _SEEDED_CACHE.get(func)
            if seeded is None:
                seeded = _SEEDED_CACHE[func] = _SEEDED in func.tags
            if seeded:
                self.other_random.append(str(func.overloadpacket))
            return out
        try:
            self._grab(what, func, args, kwargs or {}, out)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        return out

    def _grab(self, what: str, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if what == "native_dropout":
            train = args[2] if len(args) > 2 else kwargs.get("train")
            if train is not False:
                self.draws.append(Draw("native_dropout", out[1].clone(), args[1], args[0].dtype))
        elif func is _aten.bernoulli.default:
            self.draws.append(Draw("bernoulli", out != 0, args[0], out.dtype))  # p: a tensor
        else:
            # Copied now: ATen scales this very tensor in place right after. The dispatcher
            # drops arguments equal to their default, so bernoulli_(0.5) arrives without p.
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            self.draws.append(Draw(what, out != 0, p, out.dtype))


# By (id(code), lasti), holding the code so the id stays its own: hashing a code object
# hashes its bytecode and constants (~0.9 us for torch's Module._call_impl) at every lookup.
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_DROPSPY_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DROPSPY_DIR += os.sep


def user_code(code: Any) -> bool:
    """Whether ``code`` is the user's (not torch's or dropspy's own); cached by code object."""
    hit = _USER_CODE.get(id(code))
    if hit is not None and hit[0] is code:
        return hit[1]
    name = code.co_filename
    user = not name.startswith(_TORCH_DIR) and not name.startswith(_DROPSPY_DIR)
    if len(_USER_CODE) < 65536:
        _USER_CODE[id(code)] = (code, user)
    return user


# By id, holding the code so the id stays its own (hashing a code object is slow: see _WHERE).
_USER_CODE: dict[int, tuple[Any, bool]] = {}


_WHERE: dict[tuple[int, int], tuple[Any, str]] = {}


def where_of(code: Any, lasti: int, function: str | None = None) -> str:
    """``"file.py:line:col"`` of the instruction ``lasti`` in ``code`` (cached).

    The column tells apart two calls on one line (``F.dropout(F.dropout(x))``).
    """
    key = (id(code), lasti)
    hit = _WHERE.get(key)
    if hit is not None and hit[0] is code:
        return hit[1]
    line, col = code.co_firstlineno, None
    if hasattr(code, "co_positions"):
        positions = list(code.co_positions())
        index = lasti // 2
        if index < len(positions):
            line = positions[index][0] or line
            col = positions[index][2]
    where = f"{os.path.basename(code.co_filename)}:{line}"
    if col is not None:
        where += f":{col}"
    if len(_WHERE) < 65536:
        _WHERE[key] = (code, where)
    return where
