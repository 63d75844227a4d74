"""Temporary output names: write under one and rename, and clear those whose writer has died."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from lrss_ds.errors import OutputError


def temporary_name(final: Path, kind: str = "tmp") -> Path:
    """``.<stem>.<kind>-<pid><suffix>`` beside ``final`` (same file system: the rename is atomic).

    The PID tells a later run whether the writer still lives (:func:`remove_stale_temporaries`).
    """
    return final.with_name(f".{final.stem}.{kind}-{os.getpid()}{final.suffix}")


TEMPORARY_NAME = re.compile(r"^\.(?P<stem>.+)\.(?P<kind>part|tmp)-(?P<pid>\d+)(?P<suffix>\.\w+)?$")
"""What :func:`temporary_name` makes: never an input, and a leftover once its writer is gone."""


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a writer's temporary file (readers of directories skip these)."""
    return TEMPORARY_NAME.match(path.name) is not None


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporaries in ``directory`` whose writer process no longer runs.

    A writer killed with SIGKILL (or by a power cut) cannot clean up; its files carry its PID,
    so a later run removes them once that PID is gone. A temporary of a live process (another
    predict writing into the same directory) is left alone. PIDs are per machine: on a directory
    shared between machines a live writer elsewhere looks dead here.

    Args:
        directory: an output directory (missing: nothing to do).

    Returns:
        the files removed.
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = TEMPORARY_NAME.match(path.name)
        if match and not _pid_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):  # another run removed it first
                path.unlink()
                removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0 checks without sending)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@contextlib.contextmanager
def write_atomically(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``final`` when the block succeeds.

    On any failure the temporary is removed (a failing removal is ignored, so it cannot replace
    the error that matters) and ``final`` is untouched: an earlier file there stays as it was.
    An ``OSError`` of the block, of creating the directory or of the rename (full disk,
    read-only directory) becomes one :class:`OutputError` naming ``final`` and the cause.

    Args:
        final: the file to produce; its directory is created.

    Raises:
        OutputError: the directory, the temporary or the rename failed with an ``OSError``.
    """
    final = Path(final)
    temporary = temporary_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        os.replace(temporary, final)
    except OSError as error:
        raise OutputError.from_os_error(final, error) from error
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``<path>.tmp`` and rename it to ``path``: a reader never sees half a file.

    For files the program itself rereads (run state, configs, reports): an ``OSError`` passes
    through unchanged. User-named outputs use :func:`write_atomically`, which names the cause.

    Args:
        path: the file to produce; its directory must exist.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
