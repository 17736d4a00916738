"""Per-slide progress and the run summary every cohort stage ends with."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from . import __version__
from .errors import GigasslError

#: Statuses a slide can end a stage with. "empty" (no tissue) is a warning, "failed" an error, "locked"
#: (another process was working on it) leaves the cohort incomplete.
STATUSES = ("done", "skipped", "empty", "locked", "failed")

#: Exit codes of cohort stages: a slide failed; or none failed but some were locked by other processes.
EXIT_FAILED, EXIT_INCOMPLETE = 1, 3


@dataclass
class SlideRecord:
    slide_id: str
    path: str
    status: str
    n_tiles: int = 0
    seconds: float = 0.0
    message: str = ""
    #: level-0 (x, y) of tiles dropped for corrupt image data (encode --on-corrupt-tile skip)
    corrupt_tiles: list = field(default_factory=list)
    #: who decoded the slide's tiles and why (encode)
    decode: str = ""


@dataclass
class RunSummary:
    """What a stage did to each slide; written as JSON and printed as a table."""

    stage: str
    config: dict
    records: list[SlideRecord] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, record: SlideRecord) -> None:
        self.records.append(record)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r.status for r in self.records)
        return {s: c.get(s, 0) for s in STATUSES}

    @property
    def failed(self) -> list[SlideRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAILED
        return EXIT_INCOMPLETE if self.counts["locked"] else 0

    def run_info(self) -> dict:
        return {"host": platform.node(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                "seconds": round(time.time() - self.started, 3), "counts": self.counts}

    def to_dict(self) -> dict:
        info = self.run_info()
        return {
            "stage": self.stage,
            "version": __version__,
            **{k: info[k] for k in ("host", "started", "seconds", "counts")},
            "tiles": sum(r.n_tiles for r in self.records),
            "config": self.config,
            "slides": [asdict(r) for r in self.records],
            "runs": [info],
        }

    def write_json(self, path: str) -> None:
        """Writes the summary, merged with the one already at `path`: runs sharing an output folder (at
        the same time or one after another) each add their slides, and a slide's latest outcome wins,
        except that "locked" (another process had it) never hides that process's outcome."""
        from .outputs import atomic_file

        with _exclusive(path):
            merged = self.to_dict()
            previous = _read_summary(path)
            if previous is not None:
                slides = {s["slide_id"]: s for s in previous.get("slides", []) if isinstance(s, dict) and "slide_id" in s}
                for r in self.records:
                    if not (r.status == "locked" and r.slide_id in slides):
                        slides[r.slide_id] = asdict(r)
                merged["slides"] = [slides[k] for k in sorted(slides)]
                counts = Counter(s.get("status") for s in merged["slides"])
                merged["counts"] = {s: counts.get(s, 0) for s in STATUSES}
                merged["tiles"] = sum(int(s.get("n_tiles", 0)) for s in merged["slides"])
                merged["runs"] = [*previous.get("runs", []), *merged["runs"]]
            with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
                json.dump(merged, fh, indent=2)

    def table(self) -> str:
        """One screen: a row per slide (failures and warnings first when there are many), then totals."""
        rows = sorted(self.records, key=lambda r: (STATUSES.index(r.status) * -1, r.slide_id))
        shown = rows if len(rows) <= 30 else [r for r in rows if r.status in ("failed", "empty")][:30]
        width = max([len("slide")] + [len(r.slide_id) for r in shown])
        lines = [f"{'slide':<{width}}  {'status':<7}  {'tiles':>7}  {'s':>6}  note"]
        for r in shown:
            lines.append(f"{r.slide_id:<{width}}  {r.status:<7}  {r.n_tiles:>7}  {r.seconds:>6.1f}  {r.message}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more slides without problems")
        c = self.counts
        lines.append(f"{len(self.records)} slides: {c['done']} done, {c['skipped']} skipped, "
                     f"{c['empty']} without tissue, {c['locked']} locked, {c['failed']} failed; "
                     f"{sum(r.n_tiles for r in self.records)} tiles in {time.time() - self.started:.1f} s")
        if c["locked"]:
            lines.append(f"cohort incomplete: {c['locked']} slides were being processed by another process; "
                         "run again once it has finished (exit code 3)")
        return "\n".join(lines)


def _read_summary(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None  # none yet, or damaged: this run's summary replaces it


@contextlib.contextmanager
def _exclusive(path: str):
    """One writer of the summary at `path` at a time, across processes (flock: released if we die)."""
    folder = os.path.dirname(os.path.abspath(path))
    lock = os.path.join(folder, "." + os.path.basename(path) + ".lock")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
        raise GigasslError(f"{path}: cannot write the run summary ({err.strerror}); check --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


#: Receives each progress line, and whether it is the run's last (the CLI shows it on stderr).
ShowProgress = Callable[[str, bool], None]


class Progress:
    """Slides done, tiles/s and time left, as one line per slide handed to `show` (nothing without one)."""

    def __init__(self, total: int, label: str, show: ShowProgress | None = None) -> None:
        self.total, self.label, self.show = total, label, show
        self.done = 0
        self.tiles = 0
        self.start = time.time()

    def update(self, record: SlideRecord) -> None:
        self.done += 1
        self.tiles += record.n_tiles
        if self.show is None:
            return
        elapsed = time.time() - self.start
        left = elapsed / self.done * (self.total - self.done)
        rate = self.tiles / elapsed if elapsed > 0 else 0.0
        self.show(f"{self.label} [{self.done}/{self.total}] {record.slide_id}: {record.status}"
                  f" ({record.n_tiles} tiles) | {rate:,.0f} tiles/s | {_hms(left)} left", self.done == self.total)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"
