"""dropspy: record the exact dropout masks a model applies while it trains.

``import dropspy`` imports neither torch nor tensorflow: framework adapters load only for a
model whose framework the user has already imported.
"""

from typing import TYPE_CHECKING, Any

from dropspy._version import __version__
from dropspy.errors import (
    DropspyError,
    DropspyWarning,
    ExpectationError,
    RecordingError,
    RunFileError,
    UnsupportedModelError,
)
from dropspy.recorder import Recording, record
from dropspy.records import Record, SiteInfo
from dropspy.runset import RunSet, load
from dropspy.store import Run, Site

if TYPE_CHECKING:
    from dropspy import testing

__all__ = [
    "__version__",
    "record",
    "Recording",
    "load",
    "Run",
    "RunSet",
    "Site",
    "SiteInfo",
    "Record",
    "DropspyError",
    "DropspyWarning",
    "RunFileError",
    "UnsupportedModelError",
    "RecordingError",
    "ExpectationError",
    "testing",
]


def __getattr__(name: str) -> Any:
    # ``dropspy.testing`` without an explicit import (as the README's Quickstart uses it),
    # loaded on first use so that ``import dropspy`` stays light.
    if name == "testing":
        import importlib

        return importlib.import_module("dropspy.testing")
    raise AttributeError(f"module 'dropspy' has no attribute {name!r}")
