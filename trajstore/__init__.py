"""trajstore: record a network's training trajectory into compressed, crash-safe Zarr stores."""
__version__ = "0.1.0"

from .codecs import PRESET_NAMES, CodecPreset, get_preset  # noqa: E402
from .errors import (  # noqa: E402
    CorruptSnapshotError,
    FormatVersionError,
    InvalidArgumentError,
    InexactValuesError,
    LayoutMismatchError,
    NonFiniteError,
    NotAStoreError,
    SnapshotIndexError,
    StoreChangedError,
    StaleLockError,
    StoreLockedError,
    StoreExistsError,
    StoreWriteError,
    TrajstoreError,
)
from .layout import ParamLayout  # noqa: E402
from .parallel import set_threads  # noqa: E402
from .store import TrajectoryStore  # noqa: E402

__all__ = [
    "TrajectoryStore", "ParamLayout", "CodecPreset", "get_preset", "PRESET_NAMES",
    "TrajstoreError", "NotAStoreError", "FormatVersionError", "StoreLockedError", "StaleLockError",
    "LayoutMismatchError", "InexactValuesError", "NonFiniteError", "CorruptSnapshotError", "StoreWriteError", "StoreExistsError", "InvalidArgumentError",
    "SnapshotIndexError", "StoreChangedError",
    "Recorder", "import_checkpoints", "set_threads",
]


def __getattr__(name: str):  # keep `import trajstore` light
    if name == "Recorder":
        from .recorder import Recorder
        return Recorder
    if name == "import_checkpoints":
        from .importers import import_checkpoints
        return import_checkpoints
    raise AttributeError(name)
