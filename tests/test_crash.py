"""A writer killed with SIGKILL at any moment leaves a run file that opens and keeps what it
flushed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dropspy.runset import load
from dropspy.store import validate_file

_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from dropspy.records import Record, SiteInfo
    from dropspy.writer import RunWriter

    path = sys.argv[1]
    w = RunWriter(path, {"framework": "test"}, flush_seconds=0.02, flush_bytes=2000)
    def declare(k):
        w.declare_site(SiteInfo(f"site{k}", f"site{k}", "Dropout", "output",
                                ("batch", "feature"), 0.3))
    declare(0)
    print("ready", flush=True)
    last = -1
    for step in range(10**9):
        if step % 25 == 0:
            declare(step // 25 + 1)   # sites discovered while recording, as adapters do
        noise = np.random.default_rng(step).random((16, 40)) > 0.3
        w.submit([Record(f"site{k}", step, 0, True, (16, 40), noise=noise)
                  for k in range(step // 25 + 1)])
        flushed = w.stats["records_flushed"]
        if flushed != last:
            print(flushed, flush=True)
            last = flushed
        time.sleep(0.001)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("delay", np.linspace(0.0, 1.6, 12).round(3).tolist())
def test_sigkill_at_any_moment_keeps_every_flushed_record(tmp_path, delay):
    path = tmp_path / "crash.h5"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    flushed = [int(x) for x in out.split()]
    if delay >= 1.0:
        assert flushed and flushed[-1] > 0, (
            "the child flushed nothing: the test would prove nothing")
    run = load(path)
    assert not run.complete
    readable = run.records_readable
    assert readable >= (flushed[-1] if flushed else 0)
    for name in run.sites:
        site = run[name]
        for i, noise in site.iter_noise():
            want = np.random.default_rng(int(site.steps[i])).random((16, 40)) > 0.3
            assert np.array_equal(noise, want), (name, i)
    assert not [p for p in validate_file(path) if "differ in length" not in p]
