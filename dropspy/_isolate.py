"""Run HDF5 reading in a forked child, so that a crash or hang inside the HDF5 C library
becomes one clear error instead of killing or freezing the caller.

Some damage makes HDF5 1.14.6 itself fail where no check in Python can follow: one flipped
byte in a global heap collection (the sizes of its objects, its signature) of a complete file
segfaulted the process or sent it into an endless loop when a dimension label was read. The
read layer validates what it can before HDF5 follows it; this module is the backstop for
whatever HDF5 mishandles that dropspy does not know about.

:func:`call` forks (cheap: no new interpreter, nothing to import again), runs the function in
the child under a memory limit, sends back its pickled result or its DropspyError, and
watches every HDF5 call the child makes through :func:`dropspy._h5read.guard`: a single call
that lasts longer than :data:`HDF5_CALL_SECONDS` is a hang. Pure Python work in the child has
no deadline (a large file legitimately takes minutes to analyse). A child killed by a signal,
or one that hangs, becomes a :class:`~dropspy.errors.RunFileError` naming the file and the
object it was reading.

Where ``os.fork`` does not exist (Windows), the function runs in the calling process.
"""

from __future__ import annotations

import faulthandler
import gc
import mmap
import os
import pickle
import select
import signal
import struct
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from dropspy.errors import DropspyError, RunFileError

__all__ = ["call", "watched", "progress", "isolated", "available", "HDF5_CALL_SECONDS",
           "IsolatedBug"]

T = TypeVar("T")

#: Longest one HDF5 call may take in an isolated child. The slowest legitimate calls read
#: one block of at most 16 MiB of mask bits or 65536 index rows (milliseconds); a damaged
#: global heap looped for ever.
HDF5_CALL_SECONDS = 10.0
#: Environment variable that overrides it (storage so slow that one 16 MiB read takes longer).
DEADLINE_ENV = "DROPSPY_HDF5_CALL_SECONDS"


def _deadline() -> float:
    try:
        value = float(os.environ.get(DEADLINE_ENV, ""))
    except ValueError:
        return HDF5_CALL_SECONDS
    return value if value > 0 and value == value else HDF5_CALL_SECONDS
#: Address space a child may add to its parent's: a file that makes HDF5 allocate without
#: bound fails an allocation there instead of exhausting the machine.
MEMORY_BYTES = 8 << 30

# Monotonic start of the current HDF5 call (0: none), len(where), then progress: work done
# and its total (bytes of masks analysed), drawn by the parent (the child's output is not
# the caller's: under a test runner its streams are Python objects of the parent).
_STATE = struct.Struct("<dIqq")
_WHERE = 480                   # bytes of "file: object" kept for the error message
_shared: mmap.mmap | None = None  # set in an isolated child: what the parent watches
_depth = 0


# Signals by which a library crashes (the rest come from outside: the OOM killer, a user).
_CRASHES = frozenset(int(getattr(signal, name)) for name in (
    "SIGSEGV", "SIGBUS", "SIGABRT", "SIGFPE", "SIGILL", "SIGSYS", "SIGTRAP")
    if hasattr(signal, name))


class IsolatedBug(Exception):
    """An exception in the child that is not a DropspyError: a bug, with its traceback."""


def isolated() -> bool:
    """Whether this process is an isolated child (what it reads cannot crash the caller)."""
    return _shared is not None


def available() -> bool:
    """Whether calls can be isolated here (a POSIX ``fork``)."""
    return hasattr(os, "fork")


@contextmanager
def watched(path: object, where: str) -> Iterator[None]:
    """Mark an HDF5 call on ``where`` in file ``path`` for the parent's deadline."""
    global _depth
    if _shared is None:
        yield
        return
    _depth += 1
    if _depth == 1:
        text = f"{path}: {where}".encode("utf-8", "replace")[:_WHERE]
        _shared[_STATE.size:_STATE.size + len(text)] = text
        _STATE.pack_into(_shared, 0, time.monotonic(), len(text),
                         *_STATE.unpack_from(_shared, 0)[2:])
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:  # the object stays named: a crash outside a marked call says it
            _STATE.pack_into(_shared, 0, 0.0, *_STATE.unpack_from(_shared, 0)[1:])


def progress(total: int) -> Callable[[int], None] | None:
    """In an isolated child: a callback advancing the parent's progress by its argument.

    None outside a child (the caller draws its own progress).
    """
    shared = _shared
    if shared is None:
        return None
    state = [0]

    def advance(amount: int) -> None:
        state[0] += int(amount)
        started, n, _, _ = _STATE.unpack_from(shared, 0)
        _STATE.pack_into(shared, 0, started, n, state[0], total)

    advance(0)
    return advance


def _limit_memory() -> None:
    import resource  # POSIX only, like fork

    try:
        with open("/proc/self/statm") as fh:
            current = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return  # no /proc: no limit (macOS); the read layer bounds what it asks for
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = current + MEMORY_BYTES
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft == resource.RLIM_INFINITY or want < soft:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def _child(fn: Callable[[], Any], shared: mmap.mmap, out: int, what: str) -> None:
    global _shared, _depth
    _shared, _depth = shared, 0
    try:
        # A crash here is reported by the parent in one line: no "Fatal Python error" dump
        # (pytest and PYTHONFAULTHANDLER enable one) on the user's terminal.
        faulthandler.disable()
        _limit_memory()
        try:
            payload = ("ok", fn())
        except DropspyError as exc:
            payload = ("error", exc)
        except MemoryError:
            payload = ("error", RunFileError(
                f"{what}: reading it needed more than {MEMORY_BYTES >> 20} MiB of memory "
                f"beyond what was in use; the file asks for more than its contents justify"))
        except BaseException as exc:
            # Exceptions the caller handles itself (the CLI's usage errors, typer's exit)
            # come back as they are when they pickle; anything else is a bug, with its text.
            payload = ("raise", exc) if _pickles(exc) else (
                "bug", "".join(traceback.format_exception(exc)))
        try:
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            data = pickle.dumps(("bug", traceback.format_exc()))
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
    finally:
        os._exit(0)  # no atexit handlers, no HDF5 teardown of the parent's state


def _pickles(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def call(fn: Callable[[], T], what: str,
         on_progress: Callable[[int, int], None] | None = None) -> T:
    """``fn()`` in a forked child; its result, or its exception raised here.

    Args:
        fn: Reads run files; its result and exceptions must pickle.
        what: The file(s) read, for the message when the child crashes before naming one.
        on_progress: Called here with ``(done, total)`` whenever the child's
            :func:`progress` callback advanced.

    Raises:
        RunFileError: The child was killed by a signal (HDF5 crashed) or one HDF5 call
            outlived :data:`HDF5_CALL_SECONDS`; the message names the file and object.
        IsolatedBug: ``fn`` raised something that is not a DropspyError and does not pickle.
    """
    if not available():
        return fn()
    # Nested calls (a label read while ``validate`` runs isolated) fork again: the damage
    # then ends only that read, and the rest of the file is still reported.
    shared = mmap.mmap(-1, _STATE.size + _WHERE)
    read_end, write_end = os.pipe()
    # Objects that exist now are left out of the child's garbage collections: collecting
    # them would write to (and so copy) most of the parent's pages.
    gc.freeze()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns on fork in a threaded process (numpy's BLAS pool is one):
            # the child runs only the read (no thread of the parent is needed there), and a
            # lock left held would stall a watched HDF5 call, which the deadline stops.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid != 0:
        gc.unfreeze()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        os.close(read_end)
        _child(fn, shared, write_end, what)
    os.close(write_end)
    chunks: list[bytes] = []
    hung: str | None = None
    deadline = _deadline()
    shown = (0, 0)
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], 0.05)
            if ready:
                chunk = os.read(read_end, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                continue
            started, n, done, total = _STATE.unpack_from(shared, 0)
            if on_progress is not None and total and (done, total) != shown:
                shown = (done, total)
                on_progress(done, total)
            if started and time.monotonic() - started > deadline:
                hung = bytes(shared[_STATE.size:_STATE.size + n]).decode("utf-8", "replace")
                os.kill(pid, signal.SIGKILL)
                break
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        _, n, done, total = _STATE.unpack_from(shared, 0)
        if on_progress is not None and total and (done, total) != shown and hung is None:
            on_progress(done, total)  # a child faster than one poll still shows its end
        where = bytes(shared[_STATE.size:_STATE.size + n]).decode("utf-8", "replace") or what
        shared.close()
    if hung is not None:
        raise RunFileError(f"{hung or what}: HDF5 did not answer within {deadline:g} s "
                           f"(stopped); the file is damaged, or its storage slower than "
                           f"{DEADLINE_ENV} allows")
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number in _CRASHES:
            raise RunFileError(f"{where}: reading it crashed the HDF5 library "
                               f"({_signal_name(number)}, in a child process that dropspy "
                               f"started for the purpose); the file is damaged")
        raise RunFileError(f"{where}: the process reading it was killed "
                           f"({_signal_name(number)}; out of memory, or stopped by a user)")
    try:
        kind, value = pickle.loads(b"".join(chunks))
    except Exception as exc:
        raise RunFileError(f"{what}: the process reading it ended without an answer "
                           f"(exit status {os.WEXITSTATUS(status)})") from exc
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    if kind in ("error", "raise"):
        raise value
    raise IsolatedBug(value)

