"""Per-slide progress and the run summary every cohort stage ends with."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import click

from . import __version__

#: Statuses a slide can end a stage with. "empty" (no tissue) is a warning, "failed" an error.
STATUSES = ("done", "skipped", "empty", "failed")


@dataclass
class SlideRecord:
    slide_id: str
    path: str
    status: str
    n_tiles: int = 0
    seconds: float = 0.0
    message: str = ""


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
        return 1 if self.failed else 0

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "version": __version__,
            "host": platform.node(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 3),
            "counts": self.counts,
            "tiles": sum(r.n_tiles for r in self.records),
            "config": self.config,
            "slides": [asdict(r) for r in self.records],
        }

    def write_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(tmp, path)

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
                     f"{c['empty']} without tissue, {c['failed']} failed; "
                     f"{sum(r.n_tiles for r in self.records)} tiles in {time.time() - self.started:.1f} s")
        return "\n".join(lines)


class Progress:
    """Slides done, tiles/s and time left, on stderr: a live line on a terminal, a line per slide in logs."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.done = 0
        self.tiles = 0
        self.start = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, record: SlideRecord) -> None:
        self.done += 1
        self.tiles += record.n_tiles
        elapsed = time.time() - self.start
        left = elapsed / self.done * (self.total - self.done)
        rate = self.tiles / elapsed if elapsed > 0 else 0.0
        msg = (f"{self.label} [{self.done}/{self.total}] {record.slide_id}: {record.status}"
               f" ({record.n_tiles} tiles) | {rate:,.0f} tiles/s | {_hms(left)} left")
        if self.tty:
            click.echo("\r\033[K" + msg, nl=self.done == self.total, err=True)
        else:
            click.echo(msg, err=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"
