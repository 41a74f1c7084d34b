"""The CLI on run files crafted to attack the terminal: file text is printed, never obeyed."""

from __future__ import annotations

import pytest
from _synth import info, records, write_run
from typer.testing import CliRunner

from dropspy.cli import app

runner = CliRunner()
EVIL = "[link=http://evil.example]x[/link][/bold]\x1b]8;;http://evil\x07\x1b[2J\u202e"


@pytest.fixture(scope="module")
def evil_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("evil")
    return write_run(d / "evil.h5", [
        (info(EVIL, layer_class="Drop\x1b[31mout"), records(EVIL, (8, 4, 6), (8, 1, 6), 0.3)),
    ], notes=["note \x1b[2J" + EVIL], meta={"framework": "fw\x1b[5m[bold]"})


@pytest.mark.parametrize("args", [["inspect", "-v"], ["check", "-e", "*: rate=0.9"],
                                  ["diff"], ["validate"]])
def test_file_text_reaches_the_terminal_as_literal_escaped_text(evil_path, args):
    cmd = [args[0], str(evil_path), *args[1:]]
    if args[0] == "diff":
        cmd.append(str(evil_path))
    result = runner.invoke(app, cmd)
    assert result.exit_code in (0, 1), result.output
    out = result.output
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    if args[0] in ("inspect", "check"):
        assert "\\x1b[2J" in out
    if args[0] == "inspect":
        assert "[link=http://evil.example]x[/link][/bold]" in out.replace("\n", "")
