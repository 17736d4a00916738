"""Per-slide lock files, so several processes (SLURM array jobs, torchrun ranks) can share one output
folder: a slide is worked on by one process at a time; a lock left by a dead process is taken over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

#: A lock older than this is stale even if its owner cannot be checked (another host).
STALE_AFTER_S = 6 * 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        # Unreadable: a lock being written right now, or garbage; judge by age.
        try:
            return time.time() - os.path.getmtime(path) > 60
        except OSError:
            return True
    if info.get("host") == socket.gethostname():
        return not _alive(int(info.get("pid", -1)))
    return time.time() - float(info.get("time", 0)) > STALE_AFTER_S


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
            if not _is_stale(path):
                yield False
                return
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    else:
        yield False
        return
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, fh)
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
