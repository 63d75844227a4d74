"""Exception types that carry the offending input and reach the user as one line."""

from __future__ import annotations

import errno
from pathlib import Path


SEE_PREVIOUS = "See previous exception"
"""How rasterio words a failed GDAL read or write whose real cause is the chained exception."""


def underlying_cause(error: BaseException) -> str:
    """The first line of the first message in ``error``'s chain that states a cause.

    Why: rasterio reports a failed block read or write as ``"Read failed. See previous exception
    for details."`` and chains GDAL's own message (a ``CPLE_*`` exception) as its cause; only that
    one says what is wrong, and the user cannot see the "previous exception".

    Args:
        error: the exception raised, with its ``__cause__``/``__context__`` chain.
    """
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        lines = str(link).strip().splitlines()
        if lines and SEE_PREVIOUS.lower() not in lines[0].lower():
            return lines[0]
        link = link.__cause__ or link.__context__
    return f"{type(error).__name__} without a message from GDAL"


class LrssError(Exception):
    """Base class: a problem with the user's input, reported as ``"<where>: <problem>"``.

    Args:
        where: the file, directory, config key or scene the problem is in.
        problem: what is wrong and, where it helps, what to do about it.
    """

    def __init__(self, where: str | Path, problem: str) -> None:
        self.where = str(where)
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause said
        super().__init__(f"{self.where}: {self.problem}")


class InputFileError(LrssError):
    """A raster, label, checkpoint or weights file is missing, unreadable or inconsistent."""


class StoreError(LrssError):
    """A tile store is missing, incomplete, or does not fit what is asked of it."""


class ConfigError(LrssError):
    """A YAML or JSON configuration has an unknown key, a wrong type or a bad value."""


class OutputExistsError(LrssError):
    """An output already exists and ``--overwrite`` was not given."""


class OutputError(LrssError):
    """An output cannot be written: it is one of the inputs, or the disk or directory refuses it."""

    @classmethod
    def from_os_error(cls, where: str | Path, error: OSError) -> "OutputError":
        """Name the cause of a failed write (full disk, read-only directory, ...) in words.

        Args:
            where: the output (or its directory) being written.
            error: the ``OSError`` the write raised.
        """
        causes = {
            errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exhausted",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied (the directory is not writable)",
            errno.EPERM: "permission denied (the directory is not writable)",
        }
        cause = causes.get(error.errno or 0) or (error.strerror or str(error))
        return cls(where, f"cannot write: {cause}; an earlier file at this name, if any, is unchanged")


class TrainingError(LrssError):
    """Training cannot go on (for example, too many non-finite losses in a row)."""
