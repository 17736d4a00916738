"""Which slides a run covers: files, folders, globs or a CSV manifest, and a shard of them."""

from __future__ import annotations

import csv
import glob
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import GigasslError
from .slides import SLIDE_EXTENSIONS


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort: its id (output file stem), its path and an optional level-0 mpp."""

    slide_id: str
    path: str
    mpp: float | None = None


def _slide_id(path: str) -> str:
    name = os.path.basename(path.rstrip("/" + os.sep))
    stem, ext = os.path.splitext(name)
    return stem if ext else name


#: Longest slide id: outputs add up to ~15 characters (".h5.lock.tmp") to a 255-byte file-name limit.
MAX_ID_BYTES = 200


def check_slide_id(slide_id: str, where: str) -> str:
    """`slide_id` if it can name output files (``features/<slide_id>.h5``): a plain file name, no folder
    part, so that no output lands outside --out and every stage finds every slide."""
    bad = ("/" in slide_id or "\\" in slide_id or slide_id.startswith(".") or any(ord(c) < 32 for c in slide_id)
           or len(slide_id.encode()) > MAX_ID_BYTES)
    if bad:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in slide_id).strip(".")[:MAX_ID_BYTES] or "slide"
        raise GigasslError(f"{where}: slide_id {slide_id!r} is not a plain file name (no '/' or '\\', not starting "
                           f"with '.', at most {MAX_ID_BYTES} bytes): outputs are named after it; use e.g. {safe!r}")
    return slide_id


def _from_manifest(path: str) -> list[SlideEntry]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            raise GigasslError(f"{path}: a manifest needs a header with at least 'path' "
                               f"(and optionally slide_id, mpp); got columns {fields}")
        entries = []
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row.get("path"):
                raise GigasslError(f"{path}:{line}: empty path")
            slide_path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
            mpp = None
            if row.get("mpp"):
                try:
                    mpp = float(row["mpp"])
                except ValueError:
                    raise GigasslError(f"{path}:{line}: mpp must be a number (got {row['mpp']!r})") from None
                if not (mpp > 0 and math.isfinite(mpp)):
                    raise GigasslError(f"{path}:{line}: mpp must be > 0 (got {row['mpp']})")
            slide_id = check_slide_id(row.get("slide_id") or _slide_id(slide_path), f"{path}:{line}")
            entries.append(SlideEntry(slide_id, slide_path, mpp))
    if not entries:
        raise GigasslError(f"{path}: the manifest has no slides (a header only); add one row per slide")
    return entries


def _from_folder(path: str) -> list[SlideEntry]:
    found = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            # hidden files are not slides (e.g. macOS '._x.svs' resource forks)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in SLIDE_EXTENSIONS:
                found.append(os.path.join(root, name))
    return [SlideEntry(_slide_id(p), p) for p in sorted(found)]


def collect_slides(inputs: Sequence[str], default_mpp: float | None = None) -> list[SlideEntry]:
    """Slides named by `inputs`, sorted by id; duplicate ids are an error before any work starts.

    Each input is a slide file, a folder (searched recursively for slide extensions), a glob, or a
    CSV manifest (``.csv``: slide_id,path[,mpp]). A file with an unknown extension, a path that does
    not exist and a folder named like a slide file (``x.svs/`` without slides inside) are kept, so that
    the run reports each as one failed slide, as it does a bad manifest row, rather than stopping the
    cohort. `default_mpp` (``--slide-mpp``) applies to slides whose manifest row gives none.
    """
    if not inputs:
        raise GigasslError("no slides given; pass slide files, folders, globs or a CSV manifest")
    entries: list[SlideEntry] = []
    for item in inputs:
        if item.lower().endswith(".csv") and os.path.isfile(item):
            entries.extend(_from_manifest(item))
        elif os.path.isdir(item):
            found = _from_folder(item)
            if found:
                entries.extend(found)
            elif _has_slide_extension(item):
                entries.append(SlideEntry(_slide_id(item), item))
            else:
                raise GigasslError(f"{item}: no slide files found (looked for {', '.join(sorted(SLIDE_EXTENSIONS))})")
        elif glob.has_magic(item) and not os.path.exists(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise GigasslError(f"{item}: the pattern matches no file")
            entries.extend(SlideEntry(_slide_id(p), p) for p in matches)
        else:
            entries.append(SlideEntry(_slide_id(item), item))
    for e in entries:
        check_slide_id(e.slide_id, e.path)
    if default_mpp is not None:
        entries = [e if e.mpp is not None else SlideEntry(e.slide_id, e.path, default_mpp) for e in entries]
    return sorted(_unique(entries).values(), key=lambda e: e.slide_id)


def _has_slide_extension(path: str) -> bool:
    return os.path.splitext(path.rstrip("/" + os.sep))[1].lower() in SLIDE_EXTENSIONS


def _unique(entries: Iterable[SlideEntry]) -> dict[str, SlideEntry]:
    """Entries by id; the same file named twice counts once, two files with one id are an error."""
    seen: dict[str, SlideEntry] = {}
    for e in entries:
        first = seen.setdefault(e.slide_id, e)
        if os.path.abspath(first.path) != os.path.abspath(e.path):
            raise GigasslError(f"duplicate slide id {e.slide_id!r}: {first.path} and {e.path}; "
                               "give unique slide_id values in a CSV manifest")
    return seen


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` (0-based, 0 <= i < n) to (i, n); None means the whole cohort."""
    if spec is None:
        return 0, 1
    try:
        i_str, n_str = spec.split("/")
        i, n = int(i_str), int(n_str)
    except ValueError:
        raise GigasslError(f"--shard must look like i/n, e.g. 0/4 (got {spec!r})") from None
    if n < 1 or not 0 <= i < n:
        raise GigasslError(f"--shard i/n needs 0 <= i < n (got {spec!r}); shards are numbered from 0")
    return i, n


def take_shard(entries: Sequence[SlideEntry], shard: tuple[int, int]) -> list[SlideEntry]:
    """Every n-th slide of the id-sorted cohort starting at i: each slide in exactly one shard."""
    i, n = shard
    ordered = sorted(entries, key=lambda e: e.slide_id)
    return ordered[i::n]
