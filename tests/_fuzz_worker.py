"""Runs every CLI command and load() on run files, under a memory limit, one case per line.

Started once per test session by ``tests/test_untrusted_files.py``: it reads one JSON case per
line on stdin (``{"path": ..., "clean": ..., "out": ...}``) and answers one JSON line per case
with each command's exit status, stderr lines, elapsed seconds and any exception that is not
a :class:`~dropspy.errors.DropspyError`. The parent bounds the wall-clock time of each case (a
hang is a failure) and RLIMIT_AS bounds memory here (a blow-up is a MemoryError, reported).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 3 << 30
resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

from typer.testing import CliRunner

import dropspy
import dropspy._isolate
from dropspy.cli import app
from dropspy.errors import DropspyError

runner = CliRunner()
# A hang inside HDF5 is stopped after this long (10 s by default, for large files on slow
# disks); every legitimate HDF5 call on these few-KB files takes milliseconds.
dropspy._isolate.HDF5_CALL_SECONDS = 2.0


def _cli(args: list[str]) -> dict:
    t = time.monotonic()
    r = runner.invoke(app, args)
    exc = r.exception
    bad = None
    if exc is not None and not isinstance(exc, SystemExit):
        bad = "".join(traceback.format_exception(exc))[-1500:]
    return {"cmd": " ".join(args[:1] + [a for a in args[2:] if a.startswith("-")]),
            "code": r.exit_code, "stdout": r.stdout[-50000:], "stderr": r.stderr[-3000:],
            "bad": bad, "secs": time.monotonic() - t}


def _load_and_iterate(path: str) -> dict:
    t = time.monotonic()
    bad, error, names = None, None, []
    try:
        with dropspy.load(path) as run:
            names = list(run.sites)
            for name in names:
                site = run[name]
                for i, _ in site.iter_noise():
                    if i < 3:
                        site.mask(i)
            _ = run.damage
    except DropspyError as exc:
        error = str(exc)
    except BaseException as exc:  # anything else is a failure of the reader
        bad = "".join(traceback.format_exception(exc))[-1500:]
    return {"cmd": "load", "code": 2 if error else 0, "stdout": "", "stderr": error or "",
            "bad": bad, "secs": time.monotonic() - t, "sites": names}


def run_case(case: dict) -> list[dict]:
    path, clean, out = case["path"], case["clean"], case["out"]
    results = [_load_and_iterate(path)]
    site = results[0]["sites"][0] if results[0]["sites"] else "site0"
    for args in (["inspect", path], ["inspect", path, "--json"],
                 ["check", path, "-e", "*: rate=0.5"], ["validate", path],
                 ["diff", path, clean], ["plot", path, "-s", site, "-o", out]):
        results.append(_cli(args))
    return results


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        print(json.dumps(run_case(case)), flush=True)


if __name__ == "__main__":
    main()
