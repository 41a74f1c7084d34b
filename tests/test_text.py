"""File text printed by the CLI: literal, never markup, control characters escaped."""

from __future__ import annotations

from rich.console import Console

from dropspy._text import safe, text


def test_control_characters_and_bidi_overrides_are_escaped():
    assert safe("a\x1b[31mb\x07\n\u202ec\udc80") == "a\\x1b[31mb\\x07\\x0a\\u202ec\\udc80"


def test_plain_text_is_unchanged_and_limit_cuts_with_a_mark():
    assert safe("lstm/input/i ünï") == "lstm/input/i ünï"
    assert safe("x" * 10, limit=6) == "xxx..."


def test_markup_in_file_text_is_printed_literally():
    console = Console(record=True, width=200, color_system=None)
    console.print(text("[link=http://evil]site[/link] [/bold]"))
    assert console.export_text().strip() == "[link=http://evil]site[/link] [/bold]"
