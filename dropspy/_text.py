"""Text read from a run file, made safe to print: never markup, no control characters.

Site names, layer classes, framework strings, notes and stop reasons come from the file, and a
file is untrusted input: printed as rich markup, ``[link=...]`` in a site name became a live
link and ``[/bold]`` crashed the table with a MarkupError; printed raw, ESC sequences moved the
cursor or recoloured the terminal. Everything the CLI prints that came from a file goes
through :func:`safe` (plain output) or :func:`text` (rich renderables).
"""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text

__all__ = ["safe", "text"]

# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows
# (a name that reads "ok" on screen while holding something else). Tab and newline too: every
# value is printed on one line or in one table cell.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: Any, limit: int | None = None) -> str:
    """``value`` as one line of plain text, control characters shown as ``\\xNN`` escapes.

    Args:
        value: Anything; ``str()`` of it is taken.
        limit: Longest result in characters (longer text is cut, ``...`` marks the cut).
    """
    out = _UNSAFE.sub(_escape, str(value))
    if limit is not None and len(out) > limit:
        out = out[: max(limit - 3, 0)] + "..."
    return out


def text(value: Any, style: str = "", limit: int | None = None) -> Text:
    """``value`` as a rich :class:`~rich.text.Text`: shown literally, never parsed as markup."""
    return Text(safe(value, limit), style=style)
