"""The adapter contract: what the recorder asks of an adapter, and what an adapter may ask back.

Framework-free (no framework import, no writer import): adapters and the recorder both import it,
and the type checker holds every adapter to it.

The lifecycle, driven by :class:`dropspy.recorder.Recording`:

1. ``cls.claims(model)``: the registry asks each adapter class in turn (cheap, no side effects).
2. ``adapter = cls(model)``: the adapter checks the model and refuses what it cannot record
   (``UnsupportedModelError``), before any file exists.
3. ``adapter.meta()``: framework facts; the recorder opens the run file with them (root
   attributes are written before SWMR writing starts and never rewritten).
4. ``adapter.attach(session)``: find and declare the sites, install hooks/patches. From here on
   nothing the adapter does may raise into the user's training code.
5. ``adapter.mark_step(step)`` (optional, user-driven) and, on exit,
   ``adapter.detach()``: undo every hook and patch, hand over what is left. Idempotent, and safe
   when ``attach`` never ran or failed half-way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dropspy.records import Record, SiteInfo

__all__ = ["Adapter", "Session"]


class Session(Protocol):
    """What an adapter sees of the recorder: declare sites, ask for steps, submit records.

    ``record_eval``: whether evaluation batches (Keras test/predict steps, torch forwards of
    the model in eval mode) are recorded; True for :func:`dropspy.record`, the integrations'
    ``evaluate=`` otherwise.

    ``step_clock``: what the steps are when an integration marks them through ``mark_step()``
    (said once in the run's notes); None when the user calls ``mark_step()`` themselves.
    """

    record_eval: bool
    step_clock: str | None

    def declare_site(self, info: SiteInfo) -> bool:
        """Declare a site; returns whether the ``sites=`` patterns select it."""
        ...

    def want_step(self, step: int) -> bool:
        """Whether the sampling policy wants the records of ``step``."""
        ...

    def submit(self, step: int, records: list[Record]) -> None:
        """Hand over the records of one step (once per recorded step)."""
        ...

    def count_dropped(self, cause: str, n: int = 1) -> None:
        """Count records drawn but not written (``cause`` from ``records.DROP_CAUSES``)."""
        ...

    def note(self, message: str) -> None:
        """Tell the user something about this recording (also stored in the file)."""
        ...

    def warn_perturbation(self, message: str) -> None:
        """Say, before recording, that this path cannot keep training bit-identical."""
        ...


class Adapter(Protocol):
    """One framework's recorder: finds the sites of a model and captures their exact masks.

    Attributes:
        framework: The registry name written to the run file (``"torch"``, ``"keras"``...).
    """

    framework: str

    @classmethod
    def claims(cls, model: Any) -> bool:
        """Whether this adapter records ``model`` (or refuses it by name in ``__init__``)."""
        ...

    def __init__(self, model: Any) -> None:
        """Check ``model``; raise ``UnsupportedModelError`` for what cannot be recorded."""
        ...

    def meta(self) -> dict[str, Any]:
        """Framework facts for the run file's root attributes (``framework`` included)."""
        ...

    def attach(self, session: Session) -> None:
        """Find and declare the sites, then install the capture. Undone by :meth:`detach`."""
        ...

    def mark_step(self, step: int | None = None) -> None:
        """Start a new step explicitly; adapters that count steps themselves raise
        ``RecordingError`` saying so."""
        ...

    def detach(self) -> None:
        """Undo every hook and patch and hand over what is left (idempotent)."""
        ...
