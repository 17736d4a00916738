"""Atomic HDF5 outputs and the attribute checks that decide whether an output can be reused."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping

import h5py
import numpy as np

from .errors import GigasslError
from .outputs import atomic_file

#: Attribute set last, after every dataset was written; a file without it is not complete.
COMPLETE = "complete"


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike, nbytes: int = 0) -> Iterator[h5py.File]:
    """Writes an HDF5 file at ``<path>.tmp`` and renames it to `path` only when the block succeeds.

    A crash or an exception leaves no file at `path` (an existing one stays untouched) and no
    temporary file behind. `nbytes`, the data's size, is checked against the free space first.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path, nbytes) as tmp, h5py.File(tmp, "w") as fh:
        yield fh
        fh.attrs[COMPLETE] = True
        fh.flush()


def open_h5(path: str | os.PathLike, what: str, fix: str) -> h5py.File:
    """`path` opened for reading; a truncated or damaged file is one GigasslError naming it and `fix`."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise GigasslError(f"{path}: not a readable {what}, truncated or damaged ({_cause(err)}); {fix}") from None


def _cause(err: BaseException) -> str:
    """h5py's error in a few words: its message before the parenthesised detail."""
    return str(err).split("(")[0].strip().strip("'\"").rstrip(",") or type(err).__name__


class H5Reader:
    """One of our HDF5 outputs opened lazily: attributes on opening, arrays when asked. A file that is not
    readable, of another format, or with arrays damaged behind a readable header, is one GigasslError
    naming it and `redo`. Subclasses set `what`, `format` and `redo`. A context manager."""

    what = "file"
    format = ""
    redo = ""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._fh = open_h5(self.path, self.what, self.redo)
        try:
            self.attrs = read_attrs(self._fh)
        except (OSError, KeyError) as err:
            self._fh.close()
            raise self._damaged("its attributes", err) from None
        if self.attrs.get("format") != self.format:
            self._fh.close()
            found = f"a {self.attrs['format']} file" if self.attrs.get("format") else "an HDF5 file of another program"
            raise GigasslError(f"{self.path}: not a {self.what} ({found}); {self.redo}, or move this file away")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get(COMPLETE))

    def has(self, name: str) -> bool:
        return name in self._fh

    def dataset(self, name: str) -> h5py.Dataset:
        try:
            return self._fh[name]
        except (OSError, KeyError) as err:
            raise self._damaged(name, err) from None

    def read(self, name: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Dataset `name`, or only its `rows` (a slice or sorted indices)."""
        try:
            return self.dataset(name)[rows]
        except (OSError, KeyError) as err:  # damaged data behind a readable header
            raise self._damaged(name, err) from None

    def _damaged(self, name: str, err: BaseException) -> GigasslError:
        cause = "missing" if isinstance(err, KeyError) else _cause(err)  # KeyError: no such dataset
        return GigasslError(f"{self.path}: cannot read {name} ({cause}); {self.redo}, or move the file away")


def write_attrs(group: h5py.Group | h5py.File, attrs: Mapping[str, object]) -> None:
    """Stores scalars as HDF5 attributes and dicts/lists as JSON strings."""
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, sort_keys=True)
        group.attrs[key] = value


def read_attrs(group: h5py.Group | h5py.File) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in group.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def read_strings(dataset: h5py.Dataset) -> list[str]:
    """A string dataset as Python strings (h5py returns bytes for variable-length strings)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[:]]


def is_complete(path: str | os.PathLike, expected: Mapping[str, object]) -> bool:
    """Whether `path` is a complete output whose attributes match `expected` (a reusable result)."""
    try:
        with h5py.File(path, "r") as fh:
            attrs = read_attrs(fh)
    except (OSError, KeyError):
        return False
    if not attrs.get(COMPLETE):
        return False
    return all(_same(attrs.get(k), v) for k, v in expected.items() if v is not None)


def _same(stored: object, wanted: object) -> bool:
    if isinstance(wanted, (dict, list, tuple)):
        wanted = json.dumps(wanted, sort_keys=True)
    if isinstance(wanted, float) or isinstance(stored, float):
        try:
            return abs(float(stored) - float(wanted)) <= 1e-9 * max(1.0, abs(float(wanted)))
        except (TypeError, ValueError):
            return False
    return stored == wanted
