"""Writing outputs without losing or half-writing any: output locations are checked before any work
starts, every file is written under ``<name>.tmp`` and renamed only when complete, and a write that fails
(a full disk, a read-only mount, a permission) removes the temporary and becomes one line naming the
file and the cause."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator

from .errors import GigasslError

#: Below this many free bytes a failed torch.save is taken to be a full disk (torch reports one as
#: "unexpected pos 64 vs 0").
_NEARLY_FULL = 1 << 20

_CAUSES = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
           errno.EROFS: "Read-only file system", errno.EACCES: "Permission denied", errno.EPERM: "Permission denied"}


def _free_bytes(path: str) -> int | None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_cause(path: str, err: BaseException) -> str | None:
    """Why writing `path` failed, in a few words, when it is a storage problem (a full disk, a read-only
    file system, a permission); None otherwise, so that other errors keep their own report."""
    text = str(err)
    code = getattr(err, "errno", None)
    if code in _CAUSES:
        return _CAUSES[code]
    for code, cause in _CAUSES.items():
        if os.strerror(code) in text or f"errno = {code}," in text:
            return cause
    return None


def nearly_full(path: str) -> bool:
    """Whether the disk of `path` has (almost) no room left: for writers whose errors do not say so."""
    free = _free_bytes(path)
    return free is not None and free < _NEARLY_FULL


def write_error(path: str, err: BaseException) -> GigasslError | None:
    cause = write_cause(path, err)
    if cause is None:
        return None
    return GigasslError(f"{path}: could not write it ({cause}); free some space, check permissions, "
                        "or choose another output location")


def ensure_space(path: str, nbytes: int) -> None:
    """Refuses to start a write of about `nbytes` that cannot fit: HDF5 can crash the process when the
    disk fills mid-write, so this is checked before, not only caught after."""
    free = _free_bytes(path)
    if nbytes > 0 and free is not None and free < nbytes * 1.05 + (64 << 10):
        raise GigasslError(f"{path}: No space left on device (needs about {_mb(nbytes)}, {_mb(free)} free); "
                           "free some space or choose another output location")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, nbytes: int = 0) -> Iterator[str]:
    """Yields ``<path>.tmp`` to write; renames it to `path` when the block succeeds. Any failure leaves
    no temporary and `path` as it was; storage failures become one GigasslError line."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    ensure_space(path, nbytes)
    try:
        yield tmp
        os.replace(tmp, path)
    except GigasslError:
        _remove(tmp)
        raise
    except Exception as err:
        _remove(tmp)
        mapped = write_error(path, err)
        if mapped is None:
            raise
        raise mapped from None
    except BaseException:
        _remove(tmp)
        raise


def _file_in_the_way(path: str) -> str | None:
    """The first existing non-folder on the way to folder `path`, if any."""
    probe = os.path.abspath(path)
    while True:
        if os.path.exists(probe):
            return None if os.path.isdir(probe) else probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


def writable_dir(path: str | os.PathLike, option: str = "--out") -> str:
    """Creates folder `path` if needed and checks that a file can be written in it, before any work."""
    path = os.fspath(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise GigasslError(f"{option} {path}: {blocker} is a file, not a folder; choose another {option}")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".gigassl-write-test.{os.getpid()}")
        try:
            with open(probe, "wb") as fh:
                fh.write(b"x")
        finally:
            _remove(probe)
    except OSError as err:
        raise GigasslError(f"{option} {path}: cannot write there ({err.strerror or err}); "
                           f"choose another {option}") from None
    return path


def writable_file(path: str | os.PathLike, option: str = "--out") -> str:
    """Checks, before any work, that file `path` can be written (its folder is created if needed)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise GigasslError(f"{option} {path}: is a folder; give a file name")
    writable_dir(os.path.dirname(os.path.abspath(path)), option)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise GigasslError(f"{option} {path}: cannot write there (Permission denied); choose another {option}")
    return path
