"""Exception types that carry the offending input and reach the user as one line."""

from __future__ import annotations

from pathlib import Path


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


class TrainingError(LrssError):
    """Training cannot go on (for example, too many non-finite losses in a row)."""
