"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""

from __future__ import annotations

import errno
import os


class EdgeMSDError(Exception):
    """A problem the user can fix: the message names the file/line/field and what was expected."""


class ConfigError(EdgeMSDError):
    """A config file, CLI option or target profile is wrong."""


class DataError(EdgeMSDError):
    """A dataset file, image or caption is missing, corrupt or of the wrong shape."""


class ArtifactError(EdgeMSDError):
    """An artifact (feature cache, checkpoint, export, bundle, report) is missing, foreign or tampered."""


class QuantError(EdgeMSDError):
    """A tower cannot be quantized or converted by the target's toolchain (names the op or layer)."""


class StorageError(EdgeMSDError):
    """A file or folder cannot be written or read: permissions, a read-only or full disk, a file where a
    folder is expected (or the reverse)."""


class BadSampleError(DataError):
    """One image or caption cannot be read; ``--skip-bad`` skips such samples and counts them."""

    def __init__(self, message: str, image_index: int | None = None, caption_index: int | None = None):
        super().__init__(message)
        self.image_index = image_index
        self.caption_index = caption_index


# OSErrors a user fixes on their side: errno -> (what happened, what to do). Others are bugs.
_STORAGE_ERRNOS = {
    errno.EACCES: ("permission denied", "fix its permissions or choose another path"),
    errno.EROFS: ("read-only file system", "choose a path on a writable disk"),
    errno.ENOSPC: ("no space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write to another disk"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "choose another path"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
    errno.EISDIR: ("is a folder, expected a file", "choose a file path"),
}


def storage_message(error: OSError, path: str | os.PathLike | None = None) -> str | None:
    """``PATH: what happened; what to do`` for an OSError the user can fix, None for any other.

    ``path`` names the file the user asked for when ``error.filename`` is a temporary one (or absent).
    """
    if error.errno not in _STORAGE_ERRNOS:
        return None
    what, todo = _STORAGE_ERRNOS[error.errno]
    where = path if path is not None else error.filename
    return f"{where}: {what}; {todo}" if where is not None else f"{what}; {todo}"
