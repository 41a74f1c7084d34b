"""``dropspy.record``: the front door. Lifecycle, framework detection, sampling policy."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from dropspy.errors import DropspyWarning, RecordingError
from dropspy.frameworks import find_adapter
from dropspy.frameworks.base import Adapter
from dropspy.options import RecordOptions
from dropspy.records import POLICY_CAUSES, Record, SiteInfo, rank_path, site_matches
from dropspy.writer import RunWriter

__all__ = ["record", "Recording", "Session", "RecordOptions"]

_ACTIVE: dict[int, Recording] = {}
_ACTIVE_LOCK = threading.Lock()


class Session:
    """What an adapter sees of the recorder (the :class:`dropspy.frameworks.base.Session`
    protocol): declare sites, ask for steps, submit records.

    Args:
        writer: The run file writer, already open.
        options: The validated recording options (sampling policy and site patterns).
    """

    def __init__(self, writer: RunWriter, options: RecordOptions | None = None) -> None:
        self.writer = writer
        self.options = RecordOptions() if options is None else options
        self.patterns = self.options.sites
        self._selected: dict[str, bool] = {}
        self._warned_error = False
        self.excluded: list[str] = []
        self.declared: list[str] = []
        self.matched: set[str] = set()
        # Whether evaluation and inference batches (Keras test/predict steps, torch forwards
        # of the model in eval mode) are recorded; the integrations record them only if asked.
        self.record_eval = True
        # Who marks the steps when an integration drives the clock through mark_step(): the
        # adapter's note says this instead of "marked explicitly with mark_step()".
        self.step_clock: str | None = None
        # Whether any step was sampled: a run that sampled nothing (``steps=[]``) cannot tell
        # whether the model has dropout, so it is not warned about finding none.
        self.sampled = False

    def declare_site(self, info: SiteInfo) -> bool:
        """Declare a site; returns whether it is selected by the ``sites`` patterns.

        Sites left out by the patterns are not written to the file; the run notes how many.
        """
        known = self._selected.get(info.name)
        if known is not None:
            if known:
                self.writer.declare_site(info)
            return known
        self.declared.append(info.name)
        hits = {p for p in self.patterns or () if site_matches(p, info.name, info.layer)}
        self.matched |= hits
        selected = self.patterns is None or bool(hits)
        self._selected[info.name] = selected
        if selected:
            self.writer.declare_site(info)
        else:
            self.excluded.append(info.name)
        return selected

    def want_step(self, step: int) -> bool:
        """Whether records of ``step`` are wanted by the sampling policy."""
        wanted = self.options.wants(step)
        self.sampled |= wanted
        return wanted

    def submit(self, step: int, records: list[Record]) -> None:
        """Hand over the records of one step (call once per recorded step)."""
        self.sampled = True
        if self.patterns is not None:
            kept = [r for r in records if self._selected.get(r.site, False)]
            if len(kept) != len(records):
                self.writer.count_dropped("site_filter", len(records) - len(kept))
            records = kept
        self.writer.submit(records)
        if self.writer.error is not None and not self._warned_error:
            self._warned_error = True
            warnings.warn(
                f"dropspy stopped writing {self.writer.path}: {self.writer.error}. Training goes "
                f"on; further records are counted as dropped (write_error) in the file.",
                DropspyWarning,
                stacklevel=2,
            )

    def count_dropped(self, cause: str, n: int = 1) -> None:
        """Count records that were drawn but will not be written."""
        self.writer.count_dropped(cause, n)

    def note(self, message: str) -> None:
        """Tell the user something about this recording (also stored in the file)."""
        self.writer.note(message)
        print(f"dropspy: {message}", file=sys.stderr)

    def warn_perturbation(self, message: str) -> None:
        """Say, before recording, that this path cannot keep training bit-identical."""
        self.writer.note(f"perturbation: {message}")
        warnings.warn(f"dropspy changes this training run: {message}", DropspyWarning, stacklevel=2)


class Recording:
    """A recording in progress; returned by :func:`record` and used as a context manager.

    Args:
        model: The model to record.
        path: The run file to create (a rank's own file in a distributed job).
        options: The validated options (see :class:`dropspy.options.RecordOptions`).
        integration: The callback that drives this recording (``keras``, ``transformers``,
            ``lightning``; see :mod:`dropspy.integrations`), stored as the run file's root
            attribute ``integration``; None for :func:`record`.
    """

    def __init__(self, model: Any, path: str | os.PathLike[str],
                 options: RecordOptions | None = None, *,
                 integration: str | None = None) -> None:
        self.model = model
        #: The path given to record(); :attr:`path` is the file this process writes (the
        #: rank's own file in a distributed job, see :func:`dropspy.records.rank_path`).
        self.requested_path = os.fspath(path)
        self.path = self.requested_path
        self.options = RecordOptions() if options is None else options
        self.integration = integration
        self._adapter_cls = find_adapter(model)
        self.adapter: Adapter | None = None
        self.session: Session | None = None
        self.writer: RunWriter | None = None
        self._used = False
        self._stopped = False

    def __enter__(self) -> Recording:
        return self.start()

    def start(self) -> Recording:
        """Start recording (what ``with`` does on entry), for code that cannot use ``with``.

        Call :meth:`stop` when training is done, also when it raised (``try``/``finally``):
        until then the model's dropout calls stay patched and the file stays open.

        Returns:
            This recording.

        Raises:
            RecordingError: The recording was started before, or the model is already being
                recorded.
        """
        if self._used:
            raise RecordingError(
                "This recording was already used; call dropspy.record(model, path) again "
                "for a new one."
            )
        self._used = True
        key = id(self.model)
        with _ACTIVE_LOCK:
            if key in _ACTIVE:
                raise RecordingError(
                    f"This model is already being recorded into {_ACTIVE[key].path}; "
                    f"dropspy records one model into one file at a time. Received a second "
                    f"record() into {self.path}."
                )
            _ACTIVE[key] = self
        try:
            self._start()
        except BaseException:
            self._stop(print_summary=False)
            raise
        return self

    def _start(self) -> None:
        # The adapter checks the model before any file exists; its metadata goes into the file
        # before SWMR writing starts (root attributes are not rewritten after that); only then
        # does it meet a session, complete with its writer.
        adapter = self.adapter = self._adapter_cls(self.model)
        opts = self.options
        meta = {**adapter.meta(), "config": opts.describe()}
        # Each rank writes its own file (no collective on the recording path: ranks that
        # sample differently must never wait for each other).
        self.path = rank_path(self.requested_path, int(meta.get("rank", 0)),
                              int(meta.get("world_size", 1)))
        if self.integration is not None:
            meta["integration"] = self.integration
        writer = self.writer = RunWriter(self.path, meta, max_bytes=opts.max_bytes,
                                         on_full=opts.on_full)
        session = self.session = Session(writer, opts)
        adapter.attach(session)
        if session.excluded:
            writer.note(
                f"{len(session.excluded)} site(s) left out by sites="
                f"{list(opts.sites or ())!r}: {', '.join(session.excluded)}"
            )

    def mark_step(self, step: int | None = None) -> None:
        """Start a new step explicitly (torch loops without an optimizer in sight).

        Raises:
            RecordingError: The recording has not started (call it inside the ``with``
                block), or the adapter counts steps itself.
        """
        if self.adapter is None:
            raise RecordingError("mark_step() is called inside the `with dropspy.record(...)` "
                                 "block; this recording has not started.")
        self.adapter.mark_step(step)

    @property
    def stats(self) -> dict[str, Any]:
        """Records written and dropped so far (see :attr:`RunWriter.stats`)."""
        return self.writer.stats if self.writer is not None else {}

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def stop(self) -> None:
        """Stop recording (what ``with`` does on exit): restore the model, close the file.

        Prints the summary line, and warns when the run holds nothing to look at. A second
        call does nothing.

        Raises:
            RecordingError: The recording was never started.
        """
        if not self._used:
            raise RecordingError(
                f"stop() on a recording that was never started (into {self.path}); call "
                f"start() first, or use `with dropspy.record(model, path):`."
            )
        self._finish()

    def _finish(self) -> None:
        # Called straight from stop() and from __exit__, so that stacklevel=4 of the warnings
        # names the user's own line (the stop() call or the `with` statement) either way.
        if self._stopped:
            return
        self._stop(print_summary=True)
        self._warn_if_empty()

    def __del__(self) -> None:
        # A recording made and dropped without `with` or start() records nothing; say so,
        # since the user believes the model is being recorded. getattr: __init__ may have
        # raised before the attribute existed.
        if getattr(self, "_used", True):
            return
        warnings.warn(
            f"dropspy.record(<{type(self.model).__name__}>, {self.path!r}) was never started: "
            f"nothing was recorded. Use it as `with dropspy.record(model, path): ...`, or call "
            f".start() before training and .stop() after.",
            DropspyWarning,
            stacklevel=2,
        )

    def _warn_if_empty(self) -> None:
        """Warn when the run holds nothing: no dropout found, or ``sites=`` matching nothing.

        "No dropout" is not said when ``steps=`` sampled no step: there was nothing to look at.
        """
        session, writer = self.session, self.writer
        if session is None or writer is None:
            return
        model = type(self.model).__name__
        unmatched = [p for p in session.patterns or () if p not in session.matched]
        if unmatched and session.declared:
            warnings.warn(
                f"sites={', '.join(repr(p) for p in unmatched)} matched no site of {model}; "
                f"its sites: {', '.join(session.declared)}. Nothing was recorded from them.",
                DropspyWarning,
                stacklevel=4,
            )
        # With steps= the policy may sample nothing (steps=[], or steps never reached): no step
        # looked at, nothing to say about the model. Without steps=, step 0 is always sampled
        # (an adapter may not ask when a step draws nothing, so `sampled` cannot decide).
        sampled_nothing = session.options.steps is not None and not session.sampled
        if not session.declared and not sampled_nothing:
            framework = self.adapter.framework if self.adapter is not None else ""
            kinds = _LOOKS_FOR.get(framework, "dropout calls")
            warnings.warn(
                f"dropspy found no dropout in {model} while recording into {self.path}: it "
                f"looks for {kinds}. If the model has dropout, train it inside the `with` "
                f"block (torch: in train() mode).",
                DropspyWarning,
                stacklevel=4,
            )

    def _stop(self, *, print_summary: bool) -> None:
        self._stopped = True
        try:
            if self.adapter is not None:
                self.adapter.detach()
        finally:
            try:
                if self.writer is not None:
                    self.writer.close()
            finally:
                with _ACTIVE_LOCK:
                    if _ACTIVE.get(id(self.model)) is self:
                        del _ACTIVE[id(self.model)]
        if print_summary and self.writer is not None:
            print(_summary_line(self.path, self.writer.stats), file=sys.stderr)


# What each adapter looks for, named in the warning for a run that found no dropout.
_LOOKS_FOR = {
    "keras": "Keras Dropout-family layers (Dropout, SpatialDropout1D/2D/3D, ...), recurrent "
             "layers with dropout= or recurrent_dropout= (LSTM, GRU, SimpleRNN, ConvLSTM) and "
             "attention dropout",
    "torch": "dropout calls made in training mode inside the model (nn.Dropout, Dropout1d/2d/3d, "
             "AlphaDropout, F.dropout and friends, nn.LSTM/GRU/RNN(dropout=) between layers)",
}
_LOOKS_FOR["tf_keras"] = _LOOKS_FOR["keras"]


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _size(nbytes: int) -> str:
    """Bytes in the unit a person reads: bytes, KB below 1 MB, MB above."""
    if nbytes < 1000:
        return _count(nbytes, "byte")
    if nbytes < 1_000_000:
        return f"{nbytes / 1e3:.1f} KB"
    return f"{nbytes / 1e6:.2f} MB"


def _summary_line(path: str, stats: dict[str, Any]) -> str:
    counts = {k: v for k, v in stats["records_dropped"].items() if v}
    # What the sampling policy left out on purpose is not a loss: say it apart.
    skipped = {k: counts.pop(k, 0) for k in sorted(POLICY_CAUSES)}
    lost = sum(counts.values())
    why = f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})" if lost else ""
    line = (
        f"dropspy: {path}: {_count(stats['sites'], 'site')}, "
        f"{_count(stats['records_written'], 'record')}, {_size(stats['bytes'])} of masks, "
        f"{_count(lost, 'record')} dropped{why}"
    )
    # Named by the option that left them out, so a sites= typo does not read as sampling.
    by = {"sampling": "every=/steps=", "site_filter": "sites="}
    for cause, n in skipped.items():
        if n:
            line += f", {n} left out by {by.get(cause, cause)}"
    if stats["error"]:
        line += f"; writing stopped: {stats['error']}"
    return line


def record(
    model: Any,
    path: str | os.PathLike[str],
    *,
    every: int = 1,
    steps: Iterable[int] | None = None,
    sites: str | Sequence[str] | None = None,
    max_bytes: int | None = None,
    on_full: str = "block",
) -> Recording:
    """Record every dropout mask ``model`` applies while it trains into ``path``.

    Args:
        model: A Keras 3 model or layer, or a ``torch.nn.Module``; its framework must be
            imported already.
        path: The run file to create (HDF5). An existing dropspy run there is replaced;
            any other file is refused with a RunFileError, never overwritten.
        every: Record every N-th training step.
        steps: Only these steps (a range or iterable of ints); None for all.
        sites: Glob pattern(s) on site names or layer paths; None for every site.
        max_bytes: Budget of packed mask bytes; records past it are counted as dropped.
        on_full: When the writer falls behind: ``"block"`` training, or ``"drop"`` and count.

    Returns:
        A :class:`Recording`, to use as a context manager.

    Raises:
        OptionError: An option has the wrong type or range (checked before anything is built;
            no file is created).
        UnsupportedModelError: No adapter claims the model.
        RecordingError: The model is already being recorded.

    Example:
        >>> with dropspy.record(model, "run.h5"):   # doctest: +SKIP
        ...     model.fit(x, y, epochs=1)
    """
    options = RecordOptions.of(every=every, steps=steps, sites=sites, max_bytes=max_bytes,
                               on_full=on_full)
    return Recording(model, path, options)
