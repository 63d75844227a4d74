"""WriterLock: the exclusive lock a process holds on a tile store while it writes to it.

The lock is an ``flock`` on ``STORE/.writer.lock``, a file that exists only while a writer holds
it (plus after a writer was killed, until the next writer takes it over). The kernel drops the
lock when its holder exits, however it exits, so a lock left by a killed writer never blocks
anyone; whoever holds the lock may therefore treat every ``_partial`` leftover as a dead
writer's. The file records the holder (PID, host, start time, command line) so that a refused
writer can name it. On Linux, ``flock`` on NFS is carried out as a POSIX lock by the server, so
writers on different hosts exclude each other too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lrss_ds.errors import StoreError

LOCK_NAME = ".writer.lock"
_HOLDER_READ_TRIES = 20  # a holder writes its record right after locking; wait up to ~0.2 s for it


def describe_holder(record: dict[str, Any] | None) -> str:
    """Return ``pid N on HOST since T (COMMAND)`` for a holder record, or a placeholder."""
    if not record:
        return "another process (it has not recorded itself yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("since", 0))))
    command = record.get("command", "")
    return f"pid {record.get('pid')} on {record.get('host')} since {since} ({command})"


def read_holder(path: Path) -> dict[str, Any] | None:
    """Return the holder record in the lock file at ``path`` (None if absent, empty or unreadable)."""
    for _ in range(_HOLDER_READ_TRIES):
        try:
            text = path.read_text()
        except OSError:
            return None
        if text.strip():
            try:
                record = json.loads(text)
            except ValueError:
                return None
            return record if isinstance(record, dict) else None
        time.sleep(0.01)
    return None


def live_holder(store: Path) -> dict[str, Any] | None:
    """Return the record of the writer holding ``store`` now, or None.

    Judged without touching the lock (taking it, even shared and briefly, could refuse a writer
    starting at that moment): the record's process must be alive, when it is on this host; a
    record from another host counts as live.
    """
    record = read_holder(Path(store) / LOCK_NAME)
    if record is None:
        return None
    if record.get("host") != socket.gethostname():
        return record
    try:
        pid = int(record.get("pid", 0))
        if pid <= 0:
            return None
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, TypeError):
        return None
    except PermissionError:
        return record  # alive, another user's
    return record


class WriterLock:
    """Exclusive writer lock of the store directory ``store`` (see the module docstring).

    Use as a context manager or call ``release()``; the lock also goes when the object is
    garbage-collected or the process exits.

    Args:
        store: the store directory (must exist).
        wait: block until the holder releases the lock instead of refusing at once.
        log: where the one "waiting for ..." line goes when ``wait`` is set.

    Raises:
        StoreError: another process holds the lock (and ``wait`` is False), naming it; or the
            lock file cannot be created (read-only or full disk).
    """

    def __init__(self, store: Path, wait: bool = False, log: Callable[[str], None] = print) -> None:
        self.path = Path(store) / LOCK_NAME
        self._fd: int | None = None
        self._pid = os.getpid()
        said_waiting = False
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    raise StoreError(
                        store,
                        f"another ingest is writing to this store: {describe_holder(read_holder(self.path))}; "
                        "wait for it to finish or rerun with --wait",
                    ) from None
                if not said_waiting:
                    log(f"ingest: waiting for the writer lock of {store}, held by "
                        f"{describe_holder(read_holder(self.path))}")
                    said_waiting = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The previous holder unlinks the file as it releases: a lock taken on that unlinked
            # file excludes nobody, so take it again on the file now at the path.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            self._fd = fd
            break
        self._record()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise StoreError(self.path, f"cannot create the writer lock file: {error.strerror}") from None

    def _record(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]}
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(record).encode(), 0)
        except OSError as error:
            self.release()
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StoreError(self.path, "disk full: cannot record the writer lock" if full
                             else f"cannot write the writer lock file: {error.strerror}") from None

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent; a no-op in a forked child,
        whose copy of the descriptor shares the parent's lock and must not unlink its file)."""
        if self._fd is None or self._pid != os.getpid():
            return
        try:
            os.unlink(self.path)  # while still locked, so no one else can hold this file
        except OSError:
            pass
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # at interpreter exit the kernel drops the lock anyway
            pass
