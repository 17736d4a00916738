"""Per-slide lock files, so several processes (SLURM array jobs, torchrun ranks) can share one output
folder: a slide is worked on by one process at a time; a stale lock is taken over.

A lock is stale when, on this host, its process is dead or is this very process (a lock left by an
earlier process that had our id, e.g. in a restarted container); a lock of another host, whose owner
cannot be checked, when it is older than ``STALE_AFTER_S`` (6 hours: no slide takes that long); an empty
lock that stays empty for ``EMPTY_GRACE_S`` (its writer was killed between creating and filling it). A
process removes a lock only while it still holds it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from .outputs import write_error

#: A lock of another host older than this is stale.
STALE_AFTER_S = 6 * 3600
#: A lock still empty this long after we first saw it was left by a writer killed while creating it.
EMPTY_GRACE_S = 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def is_stale(path: str) -> bool:
    """Whether the lock at `path` may be taken over (see the module docstring)."""
    info = _read(path)
    deadline = time.time() + EMPTY_GRACE_S
    while info is None and time.time() < deadline and os.path.exists(path):
        # Its writer fills it right after creating it: wait a moment, in case that is happening now.
        time.sleep(0.05)
        info = _read(path)
    if info is None:  # gone, or its writer died between creating and filling it (kill -9 at that instant)
        return True
    try:
        pid, age = int(info.get("pid", -1)), time.time() - float(info.get("time", 0))
    except (TypeError, ValueError):
        return True
    if info.get("host") == socket.gethostname():
        return pid == os.getpid() or not _alive(pid)
    return age > STALE_AFTER_S


def lock_holder(path: str) -> str:
    """Who holds the lock at `path`, for messages: 'process 123 on host-a since 14:02:11'."""
    info = _read(path)
    if info is None:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("time", 0))))
    return f"process {info.get('pid')} on {info.get('host')} since {since}"


@contextlib.contextmanager
def slide_lock(path: str):
    """Yields True if this process holds the lock at ``path`` (then removed on exit), False if another
    live process holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if not is_stale(path):
                yield False
                return
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    else:
        yield False
        return
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(mine, fh)
    except OSError as err:  # e.g. a full disk: no half-written lock may stay behind
        with contextlib.suppress(OSError):
            os.remove(path)
        raise write_error(path, err) or err from None
    try:
        yield True
    finally:
        if _read(path) == mine:  # taken over meanwhile (we looked dead): the lock is no longer ours
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
