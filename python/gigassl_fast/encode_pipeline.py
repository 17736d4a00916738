"""The encode stage over a cohort, as a pipeline: a thread prepares the next slides (reuse check, lock,
tiling when needed, opening) and decodes their tiles, up to ``--prefetch-mb`` of decoded tiles and
`JOBS_AHEAD` slides ahead, while this thread encodes (``encode.encode_slide``); a writer thread writes each
feature file (atomically) while the next slide is encoded. Records come out in cohort order; one bad slide
is recorded and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import __version__
from .augment import PARAM_COLUMNS
from .cohort import SlideEntry
from .encode import EncodeParams, encode_slide, reuse_key
from .encoders.inference import TileEncoder
from .errors import GigasslError
from .features import FORMAT, FeatureFile, features_path, write_features
from .h5files import is_complete
from .locks import lock_holder, slide_lock
from .prefetch import Prefetch
from .runlog import Progress, RunSummary, ShowProgress, SlideRecord
from .runtime import launch
from .slides import CorruptTilesError, Slide
from .slides.backends import NATIVE_OUTPUT
from .slides.decoding import Batch, TileDecoder
from .tiling import TileGrid, read_tile_file, tile_one, tile_path


@dataclass
class _Job:
    """One slide of the cohort pipeline, from its preparation (decode thread) to its written file."""

    entry: SlideEntry
    path: str
    start: float = field(default_factory=time.time)  # reset when the encoder takes the slide
    prep_s: float = 0.0  # its preparation (tiling, opening) in the decoding thread
    record: SlideRecord | None = None  # settled without encoding: reused, locked, or failed before decoding
    hold: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the slide's lock and handle
    slide: Slide | None = None
    grid: TileGrid | None = None
    attrs: dict = field(default_factory=dict)  # of its feature file
    decode: str = ""

    def settle(self, status: str, n: int = 0, message: str = "", corrupt: list | None = None,
               end: float | None = None) -> SlideRecord:
        """The slide's record; its seconds: preparation, then encoding until `end` (default: now), not
        the time it waited in the pipeline."""
        seconds = self.prep_s + (end or time.time()) - self.start
        return SlideRecord(self.entry.slide_id, self.entry.path, status, n, seconds, message,
                           corrupt_tiles=corrupt or [], decode=self.decode)

    def release(self) -> None:
        self.hold.close()


_END = object()  # the last item of a slide's batches in the pipeline


@dataclass
class _Failed:
    """A slide whose decoding stopped with an error other than corrupt tiles."""

    error: BaseException


def _prepare(entry: SlideEntry, params: EncodeParams, out_dir: str, enc: TileEncoder, decoder: TileDecoder,
             reader: str, overwrite: bool) -> _Job:
    """The slide's lock, tile grid and open handle, or a record settling it without encoding."""
    job = _Job(entry, features_path(out_dir, entry.slide_id))
    key = reuse_key(entry, params, enc.checksum, enc.precision)
    if os.path.exists(job.path) and not overwrite and is_complete(job.path, key):
        with FeatureFile(job.path) as done:
            n, dropped = done.n_tiles, done.corrupt_coords().tolist()
        # a file that left out corrupt tiles serves --on-corrupt-tile skip only; fail redoes (and fails) it
        if not dropped or params.on_corrupt_tile == "skip":
            note = f"up to date; {len(dropped)} tiles with corrupt image data left out" if dropped else "up to date"
            job.record = job.settle("skipped", n, note, dropped)
            return job
    if os.path.exists(job.path) and not overwrite and not is_complete(job.path, key) and is_complete(job.path, {}):
        job.record = job.settle("failed", message=f"{job.path} exists with other parameters; pass --overwrite to replace it")
        return job
    try:
        if not job.hold.enter_context(slide_lock(job.path + ".lock")):
            job.record = job.settle("locked", message=f"being encoded by {lock_holder(job.path + '.lock')}")
            job.release()
            return job
        tile_rec = tile_one(entry, params.tiles, out_dir, reader, overwrite=False, qc=True)
        if tile_rec.status in ("failed", "locked"):
            job.record = job.settle(tile_rec.status, message=tile_rec.message)
            job.release()
            return job
        grid = read_tile_file(tile_path(out_dir, entry.slide_id))
        job.grid, job.attrs = grid, {**grid.attrs, **key}
        job.slide = job.hold.enter_context(Slide(entry.path, reader=reader, mpp=entry.mpp))
    except Exception as err:  # one slide must never stop the cohort
        job.record = job.settle("failed", message=_failure(entry, err))
        job.release()
    job.prep_s, job.start = time.time() - job.start, time.time()
    return job


def _failure(entry: SlideEntry, err: BaseException) -> str:
    if isinstance(err, GigasslError):
        return str(err)
    return f"{entry.path}: unexpected {type(err).__name__}: {err} (please report this)"


#: Slides in hand at once: the one being encoded and the next, prepared and decoded meanwhile (each holds
#: its lock and an open file).
JOBS_AHEAD = 2


def _decode_cohort(entries: Sequence[SlideEntry], params: EncodeParams, out_dir: str, enc: TileEncoder,
                   decoder: TileDecoder, reader: str, overwrite: bool, timings: dict,
                   slots: threading.Semaphore, stopping: threading.Event) -> Iterator:
    """The producer of the cohort pipeline: per slide a _Job, then (unless settled) its decoded batches,
    then _END. A slide is prepared only when one of `slots` is free (the consumer frees one per slide it
    finishes), and none once `stopping` is set. `timings["read"]`: this thread's decoding seconds."""
    bs = params.resolved_batch_size()
    for entry in entries:
        slots.acquire()
        if stopping.is_set():
            return
        job = _prepare(entry, params, out_dir, enc, decoder, reader, overwrite)
        yield job
        if job.record is not None:
            continue
        level, read = job.grid.read_level, job.grid.read_tile_size
        try:
            t = time.perf_counter()
            for item in decoder.batches(job.slide, job.grid.coords, level, read, bs, params.workers):
                timings["read"] += time.perf_counter() - t
                yield item
                t = time.perf_counter()
        except Exception as err:
            yield _Failed(err)
        job.decode = decoder.path(job.slide, level)  # after the batches: what any decoding trial decided
        yield _END


def _job_batches(items: Iterator) -> Iterator[Batch]:
    """The current slide's batches from the pipeline, up to its _END (consumed even when not used)."""
    for item in items:
        if item is _END:
            return
        if isinstance(item, _Failed):
            for rest in items:  # keep the pipeline aligned on the next slide
                if rest is _END:
                    break
            raise item.error
        yield item


def _item_bytes(item: object) -> int:
    tiles = item[0] if isinstance(item, tuple) else None
    return tiles.numel() * tiles.element_size() if isinstance(tiles, torch.Tensor) else 0


def _encode_job(job: _Job, items: Iterator, params: EncodeParams, enc: TileEncoder, decoder: TileDecoder,
                timings: dict) -> tuple[dict, np.ndarray]:
    """The arrays of one slide and the level-0 positions of the tiles left out for corrupt data."""
    batches = _job_batches(items)
    dropped = np.zeros((0, 2), np.int64)
    try:
        arrays = encode_slide(job.grid.tile_size, job.grid.coords, params, enc, job.entry.slide_id, batches, timings)
    except CorruptTilesError as err:
        if params.on_corrupt_tile != "skip":
            raise GigasslError(f"{err}; pass --on-corrupt-tile skip to drop such tiles") from None
        # every corrupt tile of the slide is named at once, so one more pass without them
        dropped = np.array(sorted(set(err.positions)), np.int64).reshape(-1, 2)
        coords = job.grid.coords
        keep = ~(coords[:, None, :] == dropped[None]).all(-1).any(1)
        if not keep.any():
            raise GigasslError(f"{err}; every tile of the slide is corrupt") from None
        again = decoder.batches(job.slide, coords[keep], job.grid.read_level, job.grid.read_tile_size,
                                params.resolved_batch_size(), params.workers)
        arrays = encode_slide(job.grid.tile_size, coords[keep], params, enc, job.entry.slide_id, again, timings)
    except Exception:
        for _ in batches:  # an error mid-slide: skip the rest of its batches (not on an interrupt)
            pass
        raise
    arrays["corrupt_coords"] = dropped
    return arrays, dropped


def _write(job: _Job, arrays: dict, attrs: dict, dropped: np.ndarray) -> SlideRecord:
    """Writes the slide's feature file (in the writer thread), releases its lock and returns its record."""
    try:
        write_features(job.path, arrays, attrs)
        end = time.time()
    except Exception as err:
        return job.settle("failed", message=_failure(job.entry, err))
    finally:
        job.release()
    n = len(arrays["coords"])
    if n == 0:
        return job.settle("empty", 0, "no tissue tiles: feature file written with 0 tiles", end=end)
    if len(dropped):
        x, y = dropped[0]
        return job.settle("done", n, f"{len(dropped)} tiles with corrupt image data left out, e.g. at level-0 "
                                     f"({x}, {y})", dropped.tolist(), end=end)
    return job.settle("done", n, end=end)


def run_encode(entries: Sequence[SlideEntry], params: EncodeParams, out_dir: str, reader: str = "auto",
               overwrite: bool = False, summary_name: str = "encode_summary.json",
               progress: ShowProgress | None = None, warn: Callable[[str], None] | None = None) -> RunSummary:
    """Encodes a cohort; one bad slide is recorded and the run goes on. `progress` gets a line per slide,
    from the writer thread once the slide's file is written; `warn`, decoding trials' warnings.

    A pipeline: a thread prepares the next slides (tiling when needed) and decodes their tiles, up to
    ``prefetch_mb`` of decoded tiles ahead, while this thread encodes; a writer thread writes each feature
    file (atomically) while the next slide is encoded."""
    here = launch()
    entries = list(entries)[here.rank::here.world]  # under torchrun, each rank takes every world-th slide
    params.validate()
    enc = params.tile_encoder()
    decoder = TileDecoder(enc.device, params.decode, warn)
    config = {"out": os.path.abspath(out_dir), "reader": reader, **asdict(params), "device": str(enc.device),
              "batch_size": params.resolved_batch_size(), "weights_checksum": enc.checksum}
    summary = RunSummary("encode", config)
    timings = {"read": 0.0, "augment": 0.0, "encode": 0.0, "wait": 0.0}
    shown = Progress(len(entries), "encode", progress)

    def show(record: SlideRecord) -> None:
        # the writer thread reports a slide as soon as its file is written; not while the decoding thread
        # captures a reader's native output (its file descriptors 1 and 2 are the process's)
        with NATIVE_OUTPUT:
            shown.update(record)

    def add(record: SlideRecord, report: bool = True) -> None:
        summary.add(record)  # in cohort order, by this thread
        if report:
            show(record)

    slots, stopping = threading.Semaphore(JOBS_AHEAD), threading.Event()
    source = _decode_cohort(entries, params, out_dir, enc, decoder, reader, overwrite, timings, slots, stopping)
    job = pending = None  # the slide being encoded; the one being written: (job, its record when written)

    def settle_pending() -> None:
        nonlocal pending
        if pending:
            add(pending[1].result(), report=False)
            pending = None

    def write(job: _Job, arrays: dict, attrs: dict, dropped: np.ndarray):
        """The slide's file written in the writer thread, which then shows its line (not when the next
        slide is done); its record joins the summary in cohort order, here."""
        def task() -> SlideRecord:
            record = _write(job, arrays, attrs, dropped)
            show(record)
            return record

        return job, writer.submit(task)

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigassl-writer") as writer, \
                Prefetch(source, params.prefetch_mb << 20, _item_bytes,
                         on_drop=lambda item: item.release() if isinstance(item, _Job) else None) as items:
            try:
                while True:
                    t = time.perf_counter()
                    job = next(items, None)
                    timings["wait"] += time.perf_counter() - t
                    if job is None:
                        break
                    if job.record is not None:
                        settle_pending()
                        add(job.record)
                        slots.release()
                        continue
                    job.start = time.time()
                    try:
                        arrays, dropped = _encode_job(job, items, params, enc, decoder, timings)
                    except Exception as err:
                        job.release()
                        settle_pending()
                        add(job.settle("failed", message=_failure(job.entry, err)))
                        slots.release()
                        continue
                    job.slide.close()
                    attrs = {**job.attrs, "format": FORMAT, "version": __version__, "out_dim": enc.out_dim,
                             "pca": params.pca, "input_size": enc.config.input_size, "device": str(enc.device),
                             "compute_precision": enc.precision, "aug_param_columns": list(PARAM_COLUMNS),
                             "n_corrupt_tiles": len(dropped)}
                    settle_pending()
                    pending = write(job, arrays, attrs, dropped)
                    slots.release()
            except BaseException:  # the decoding thread must not wait for a slot while it is being stopped
                stopping.set()
                slots.release(JOBS_AHEAD + 1)
                raise
            settle_pending()
    finally:
        # an interrupt or a failure of our own: the locks of the slides in hand go (after the writer ended)
        for held in (job, pending[0] if pending else None):
            if held is not None:
                held.release()
    done_tiles = sum(r.n_tiles for r in summary.records if r.status == "done")
    aug_tiles = params.naug * params.nt * sum(1 for r in summary.records if r.status == "done")
    summary.config["decode"] = decoder.note
    summary.config["throughput"] = {
        "read_tiles_per_s": done_tiles / timings["read"] if timings["read"] else None,
        "augment_tiles_per_s": aug_tiles / timings["augment"] if timings["augment"] else None,
        "encode_tiles_per_s": (done_tiles + aug_tiles) / timings["encode"] if timings["encode"] else None,
        "seconds": timings,
    }
    summary.write_json(os.path.join(out_dir, summary_name))
    return summary
