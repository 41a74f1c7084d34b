"""dropspy: record the exact dropout masks a model applies while it trains.

``import dropspy`` imports neither torch nor tensorflow: framework adapters load only for a
model whose framework the user has already imported.
"""

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
from dropspy.store import Run, Site, load

__all__ = [
    "__version__",
    "record",
    "Recording",
    "load",
    "Run",
    "Site",
    "SiteInfo",
    "Record",
    "DropspyError",
    "DropspyWarning",
    "RunFileError",
    "UnsupportedModelError",
    "RecordingError",
    "ExpectationError",
]
