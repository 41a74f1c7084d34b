"""Recording options as one validated value, checked once before anything is built."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dropspy.errors import OptionError

__all__ = ["RecordOptions", "ON_FULL"]

ON_FULL = ("block", "drop")


@dataclass(frozen=True)
class RecordOptions:
    """What :func:`dropspy.record` was asked to record, validated.

    Build it with :meth:`of`, which checks every value and turns what the user passed into one
    form (a generator given to ``steps`` is read exactly once; one pattern becomes a tuple).

    Attributes:
        every: Record every N-th training step (step % every == 0), N >= 1.
        steps: The steps to record (a ``range`` stays a range), or None for all.
        sites: Glob patterns on site names or layer paths, or None for every site.
        max_bytes: Budget of packed mask bytes (>= 0), or None for no budget.
        on_full: ``"block"`` or ``"drop"``: what happens when the writer falls behind.
    """

    every: int = 1
    steps: range | frozenset[int] | None = None
    sites: tuple[str, ...] | None = None
    max_bytes: int | None = None
    on_full: str = "block"

    @classmethod
    def of(
        cls,
        *,
        every: Any = 1,
        steps: Any = None,
        sites: Any = None,
        max_bytes: Any = None,
        on_full: Any = "block",
    ) -> RecordOptions:
        """Check the values ``record()`` received and return them as one value.

        Raises:
            OptionError: A value has the wrong type or range; the message names the argument,
                what was received and what was expected.
        """
        return cls(every=_every(every), steps=_steps(steps), sites=_sites(sites),
                   max_bytes=_max_bytes(max_bytes), on_full=_on_full(on_full))

    def wants(self, step: int) -> bool:
        """Whether records of ``step`` are wanted by the sampling policy."""
        if step % self.every:
            return False
        return self.steps is None or step in self.steps

    def describe(self) -> dict[str, Any]:
        """The options as plain values, for the run file's ``config`` attribute."""
        steps = self.steps
        if isinstance(steps, range):
            steps_text: str | None = f"range({steps.start}, {steps.stop}, {steps.step})"
        else:
            steps_text = None if steps is None else repr(sorted(steps))
        return {
            "every": self.every,
            "steps": steps_text,
            "sites": None if self.sites is None else list(self.sites),
            "max_bytes": self.max_bytes,
            "on_full": self.on_full,
        }


def _refuse(name: str, expected: str, value: Any) -> OptionError:
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return OptionError(f"Invalid value received for argument `{name}`. Expected {expected}. "
                       f"Received: {name}={shown}")


def _int(value: Any) -> int | None:
    """``value`` as an int when it is an integer (numpy ints too), else None. Bools are not."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _every(value: Any) -> int:
    n = _int(value)
    if n is None or n < 1:
        raise _refuse("every", "an int >= 1", value)
    return n


def _steps(value: Any) -> range | frozenset[int] | None:
    expected = "None, a range or an iterable of ints >= 0"
    if value is None:
        return None
    if isinstance(value, range):
        if len(value) and min(value[0], value[-1]) < 0:
            raise _refuse("steps", expected, value)
        return value
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
        raise _refuse("steps", expected, value)
    items = list(value)  # read once: a generator is not consumed twice
    out = set()
    for item in items:
        n = _int(item)
        if n is None or n < 0:
            raise OptionError(
                f"Invalid value received for argument `steps`. Expected {expected}. "
                f"Received: steps containing {item!r} ({type(item).__name__})")
        out.add(n)
    return frozenset(out)


def _sites(value: Any) -> tuple[str, ...] | None:
    expected = "None, a glob pattern (str) or an iterable of glob patterns"
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise _refuse("sites", expected, value)
    patterns = tuple(value)
    for p in patterns:
        if not isinstance(p, str):
            raise OptionError(
                f"Invalid value received for argument `sites`. Expected {expected}. "
                f"Received: sites containing {p!r} ({type(p).__name__})")
    return patterns


def _max_bytes(value: Any) -> int | None:
    expected = "None or a whole number of bytes >= 0"
    if value is None:
        return None
    n = _int(value)
    if n is None and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)  # max_bytes=1e9 is a natural way to write a budget
    if n is None or n < 0:
        raise _refuse("max_bytes", expected, value)
    return n


def _on_full(value: Any) -> str:
    if not isinstance(value, str) or value not in ON_FULL:
        raise _refuse("on_full", "'block' or 'drop'", value)
    return value
