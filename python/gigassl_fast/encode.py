"""The encode stage: tile features, plain and under Giga-SSL augmentations (spec §3), per slide.

File ``features/<slide_id>.h5`` (CLAM/TRIDENT names for the first two):
    coords        int64 (N, 2)         level-0 top-left (x, y) of every tissue tile
    features      float16 (N, D)       every tile, no augmentation (what ``embed`` reads)
    aug/indices   int32 (Naug, Nt)     tiles drawn with replacement for augmented version a
    aug/features  float16 (Naug, Nt, D) batch a encoded under augmentation a
    aug/params    float32 (Naug, 13)   the augmentation parameters (columns: augment.PARAM_COLUMNS)
    corrupt_coords int64 (K, 2)        tiles left out for corrupt image data (--on-corrupt-tile skip)
    attrs         the tile file's attributes plus encoder, weights checksum, Naug, Nt, seed, compute precision,
                  device, version.

Each distinct tile is decoded once per slide; the augmented batches are built from that pool.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .augment import PARAM_COLUMNS, augment, draw_params
from .cohort import SlideEntry
from .encoders import get_config
from .encoders.inference import TileEncoder
from .errors import GigasslError
from .h5files import atomic_h5, is_complete, read_attrs, write_attrs
from .locks import lock_holder, slide_lock
from .prefetch import Prefetch
from .runlog import Progress, RunSummary, SlideRecord
from .slides import CorruptTilesError, Slide
from .slides.decoding import Batch, TileDecoder
from .tiling import TileParams, read_tile_file, tile_one, tile_path

FORMAT = "gigassl-fast/features/1"


#: Encoder batch size when --batch-size is not given: GPUs need large batches to be busy; on a CPU larger
#: batches gain nothing and hold more memory.
BATCH_SIZE = {"cuda": 256, "cpu": 64}


@dataclass(frozen=True)
class EncodeParams:
    encoder: str = "efficientnet-lite0"
    weights: str | None = None
    naug: int = 50
    nt: int = 256
    batch_size: int | None = None  # None: BATCH_SIZE of the device
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    decode: str = "auto"
    on_corrupt_tile: str = "fail"
    seed: int = 0
    pca: str | None = None
    prefetch_mb: int = 1024
    tiles: TileParams = field(default_factory=TileParams)

    def validate(self) -> EncodeParams:
        get_config(self.encoder)
        if self.naug < 0:
            raise GigasslError(f"--naug must be >= 0 (got {self.naug})")
        if self.nt < 1:
            raise GigasslError(f"--nt must be >= 1 (got {self.nt})")
        if self.batch_size is not None and self.batch_size < 1:
            raise GigasslError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.prefetch_mb < 0:
            raise GigasslError(f"--prefetch-mb must be >= 0 (got {self.prefetch_mb})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise GigasslError(f"--device must be auto, cpu or cuda[:N] (got {self.device!r})")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GigasslError(f"--device {self.device}: no CUDA device is available here; use --device cpu")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise GigasslError(f"--precision must be auto, bf16 or fp32 (got {self.precision!r})")
        if self.decode not in ("auto", "gpu", "cpu"):
            raise GigasslError(f"--decode must be auto, gpu or cpu (got {self.decode!r})")
        if self.on_corrupt_tile not in ("fail", "skip"):
            raise GigasslError(f"--on-corrupt-tile must be fail or skip (got {self.on_corrupt_tile!r})")
        TileDecoder.check(self.decode, self.resolved_device())
        self.tiles.validate()
        return self

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_batch_size(self) -> int:
        return self.batch_size or BATCH_SIZE.get(self.resolved_device().type, 64)

    def tile_encoder(self) -> TileEncoder:
        return TileEncoder(self.encoder, self.weights, self.resolved_device(), self.precision, self.pca)


def features_path(out_dir: str, slide_id: str) -> str:
    return os.path.join(out_dir, "features", f"{slide_id}.h5")


def slide_seed(seed: int, slide_id: str) -> int:
    """Per-slide seed: the same for a slide whatever the shard or cohort order."""
    return (seed * 1_000_003 + zlib.crc32(slide_id.encode())) % (2**63)


def reuse_key(entry: SlideEntry, params: EncodeParams, checksum: str, compute_precision: str) -> dict:
    """What a feature file must have been made with to be reused. The precision compared is the one the
    encoder ran in (`auto` means bf16 on one machine and float32 on another)."""
    from .tiling import reuse_key as tile_key

    return {**tile_key(entry, params.tiles), "format": FORMAT, "encoder": params.encoder,
            "weights_checksum": checksum, "naug": params.naug, "nt": params.nt, "seed": params.seed,
            "compute_precision": compute_precision}


def _to(device: torch.device, a: np.ndarray) -> torch.Tensor:
    """A host index array on `device`; to a GPU through pinned memory, so that the host does not wait."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def _to_float(tiles_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, s, s, 3) -> float (B, 3, size, size) in [0, 1], on the tensor's device."""
    x = tiles_u8.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def encode_slide(grid_attrs: dict, coords: np.ndarray, params: EncodeParams, enc: TileEncoder, slide_id: str,
                 batches: Iterator[Batch], timings: dict) -> dict:
    """Features of one slide (see the module docstring); returns the arrays to write.

    `batches`: the slide's tiles at `coords`, decoded in batches of the run's batch size (see
    ``TileDecoder.batches``). Tiles with corrupt image data raise one CorruptTilesError naming every such
    tile of the slide: once the first is found, the rest of the slide is only decoded, to find the others.
    On a GPU nothing waits for the device until the slide's features are copied back at the end."""
    n = len(coords)
    tile = int(grid_attrs["tile_size"])
    size = enc.config.input_size
    bs = params.resolved_batch_size()
    dev = enc.device
    gen = torch.Generator().manual_seed(slide_seed(params.seed, slide_id))
    indices = torch.randint(0, max(n, 1), (params.naug, params.nt), generator=gen, dtype=torch.int64)
    needed = np.unique(indices.numpy()) if n else np.zeros(0, np.int64)
    # Tiles the augmented batches draw from, kept where the encoder runs: on a GPU, decoded tiles never
    # travel back to the host. The last slot takes the tiles no batch draws, so that every decoded batch
    # is copied in whole, without a mask (a mask's nonzero() waits for the device).
    pool = torch.empty((len(needed) + 1, tile, tile, 3), dtype=torch.uint8, device=dev)
    slot = np.full(max(n, 1), len(needed), np.int64)
    slot[needed] = np.arange(len(needed))
    slot_dev = _to(dev, slot)
    features = torch.empty((n, enc.out_dim), dtype=torch.float16, device=dev)
    corrupt: list[CorruptTilesError] = []
    start = 0
    t_read = time.perf_counter()
    for raw, err in batches:
        stop = min(n, start + bs)
        if err is not None:
            corrupt.append(err)
        if not corrupt:
            timings["read"] += time.perf_counter() - t_read
            x = _to_float(raw, tile)
            pool.index_copy_(0, slot_dev[start:stop], raw if raw.shape[1] == tile else
                             (x * 255).round().byte().permute(0, 2, 3, 1))
            t = time.perf_counter()
            features[start:stop] = enc(x if tile == size else F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)).half()
            timings["encode"] += time.perf_counter() - t
        start = stop
        t_read = time.perf_counter()
    if corrupt:
        raise CorruptTilesError(corrupt[0].path, [p for e in corrupt for p in e.positions], corrupt[0].level,
                                corrupt[0].detail)
    if start != n:
        raise GigasslError(f"{slide_id}: {start} of {n} tiles were decoded (please report this)")
    aug_features = torch.empty((params.naug if n else 0, params.nt, enc.out_dim), dtype=torch.float16, device=dev)
    aug_params = np.empty((params.naug if n else 0, len(PARAM_COLUMNS)), np.float32)
    for a in range(aug_features.shape[0]):
        p = draw_params(gen, tile)
        aug_params[a] = p.as_row()
        # A tile drawn twice into one batch gets the same augmentation, hence the same features: encode
        # each distinct tile of the batch once (saves much on slides with fewer tiles than Nt).
        unique, inverse = np.unique(slot[indices[a].numpy()], return_inverse=True)
        unique_dev = _to(dev, unique)
        feats = torch.empty((len(unique), enc.out_dim), dtype=torch.float32, device=dev)
        for b in range(0, len(unique), bs):
            t = time.perf_counter()
            batch = _to_float(pool[unique_dev[b:b + bs]], tile)
            batch = augment(batch, p, size)
            timings["augment"] += time.perf_counter() - t
            t = time.perf_counter()
            feats[b:b + bs] = enc(batch)
            timings["encode"] += time.perf_counter() - t
        aug_features[a] = feats[_to(dev, inverse)].half()
    return {"coords": coords.astype(np.int64), "features": features.cpu().numpy(),
            "indices": indices.numpy().astype(np.int32) if n else np.zeros((0, params.nt), np.int32),
            "aug_features": aug_features.cpu().numpy(), "aug_params": aug_params}


def write_features(path: str, arrays: dict, attrs: dict) -> None:
    nbytes = sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))
    with atomic_h5(path, nbytes) as fh:
        fh.create_dataset("coords", data=arrays["coords"])
        fh.create_dataset("corrupt_coords", data=arrays.get("corrupt_coords", np.zeros((0, 2), np.int64)))
        fh.create_dataset("features", data=arrays["features"])
        g = fh.create_group("aug")
        g.create_dataset("indices", data=arrays["indices"])
        g.create_dataset("features", data=arrays["aug_features"])
        g.create_dataset("params", data=arrays["aug_params"])
        g.attrs["param_columns"] = ",".join(PARAM_COLUMNS)
        write_attrs(fh, attrs)


def read_features(path: str) -> dict:
    """Arrays and attributes of a feature file."""
    try:
        with h5py.File(path, "r") as fh:
            return {"coords": fh["coords"][:], "features": fh["features"][:], "aug_indices": fh["aug/indices"][:],
                    "aug_features": fh["aug/features"][:], "aug_params": fh["aug/params"][:],
                    "corrupt_coords": fh["corrupt_coords"][:] if "corrupt_coords" in fh else np.zeros((0, 2), np.int64),
                    "attrs": read_attrs(fh)}
    except (OSError, KeyError) as err:
        raise GigasslError(f"{path}: not a readable feature file ({err}); rerun `gigassl-fast encode`") from None


@dataclass
class _Job:
    """One slide of the cohort pipeline, from its preparation (decode thread) to its written file."""

    entry: SlideEntry
    path: str
    start: float = field(default_factory=time.time)
    record: SlideRecord | None = None  # settled without encoding: reused, locked, or failed before decoding
    hold: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the slide's lock and handle
    slide: Slide | None = None
    coords: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)
    decode: str = ""

    def settle(self, status: str, n: int = 0, message: str = "", corrupt: list | None = None) -> SlideRecord:
        return SlideRecord(self.entry.slide_id, self.entry.path, status, n, time.time() - self.start, message,
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
        with h5py.File(job.path, "r") as fh:
            n = int(fh["coords"].shape[0])
            dropped = fh["corrupt_coords"][:].tolist() if "corrupt_coords" in fh else []
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
        job.coords, job.attrs = grid.coords, {**grid.attrs, **key}
        job.slide = job.hold.enter_context(Slide(entry.path, reader=reader, mpp=entry.mpp))
        job.decode = decoder.path(job.slide, int(grid.attrs["read_level"]))
    except Exception as err:  # one slide must never stop the cohort
        job.record = job.settle("failed", message=_failure(entry, err))
        job.release()
    return job


def _failure(entry: SlideEntry, err: BaseException) -> str:
    if isinstance(err, GigasslError):
        return str(err)
    return f"{entry.path}: unexpected {type(err).__name__}: {err} (please report this)"


def _decode_cohort(entries: Sequence[SlideEntry], params: EncodeParams, out_dir: str, enc: TileEncoder,
                   decoder: TileDecoder, reader: str, overwrite: bool, timings: dict) -> Iterator:
    """The producer of the cohort pipeline: per slide a _Job, then (unless settled) its decoded batches,
    then _END."""
    bs = params.resolved_batch_size()
    for entry in entries:
        job = _prepare(entry, params, out_dir, enc, decoder, reader, overwrite)
        yield job
        if job.record is not None:
            continue
        level, read = int(job.attrs["read_level"]), int(job.attrs["read_tile_size"])
        try:
            t = time.perf_counter()
            for item in decoder.batches(job.slide, job.coords, level, read, bs, params.workers):
                timings["read"] += time.perf_counter() - t
                yield item
                t = time.perf_counter()
        except Exception as err:
            yield _Failed(err)
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
        arrays = encode_slide(job.attrs, job.coords, params, enc, job.entry.slide_id, batches, timings)
    except CorruptTilesError as err:
        if params.on_corrupt_tile != "skip":
            raise GigasslError(f"{err}; pass --on-corrupt-tile skip to drop such tiles") from None
        # every corrupt tile of the slide is named at once, so one more pass without them
        dropped = np.array(sorted(set(err.positions)), np.int64).reshape(-1, 2)
        keep = ~(job.coords[:, None, :] == dropped[None]).all(-1).any(1)
        if not keep.any():
            raise GigasslError(f"{err}; every tile of the slide is corrupt") from None
        level, read = int(job.attrs["read_level"]), int(job.attrs["read_tile_size"])
        again = decoder.batches(job.slide, job.coords[keep], level, read, params.resolved_batch_size(),
                                params.workers)
        arrays = encode_slide(job.attrs, job.coords[keep], params, enc, job.entry.slide_id, again, timings)
    finally:
        for _ in batches:  # an error mid-slide: skip the rest of its batches
            pass
    arrays["corrupt_coords"] = dropped
    return arrays, dropped


def _written(job: _Job, future, arrays: dict, dropped: np.ndarray) -> SlideRecord:
    """The slide's record once its feature file is written (or failed to be)."""
    try:
        future.result()
    except Exception as err:
        return job.settle("failed", message=_failure(job.entry, err))
    finally:
        job.release()
    n = len(arrays["coords"])
    if n == 0:
        return job.settle("empty", 0, "no tissue tiles: feature file written with 0 tiles")
    if len(dropped):
        x, y = dropped[0]
        return job.settle("done", n, f"{len(dropped)} tiles with corrupt image data left out, e.g. at level-0 "
                                     f"({x}, {y})", dropped.tolist())
    return job.settle("done", n)


def distributed_share(entries: Sequence[SlideEntry]) -> tuple[list[SlideEntry], str | None]:
    """Under torchrun, each rank takes every WORLD_SIZE-th slide and its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return list(entries), None
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return list(entries)[rank::world], (f"cuda:{local}" if torch.cuda.is_available() else None)


def run_encode(entries: Sequence[SlideEntry], params: EncodeParams, out_dir: str, reader: str = "auto",
               overwrite: bool = False, summary_name: str = "encode_summary.json") -> RunSummary:
    """Encodes a cohort; one bad slide is recorded and the run goes on.

    A pipeline: a thread prepares the next slides (tiling when needed) and decodes their tiles, up to
    ``prefetch_mb`` of decoded tiles ahead, while this thread encodes; a writer thread writes each feature
    file (atomically) while the next slide is encoded."""
    entries, rank_device = distributed_share(entries)
    if rank_device and params.device == "auto":
        params = EncodeParams(**{**asdict(params), "tiles": params.tiles, "device": rank_device})
    params.validate()
    enc = params.tile_encoder()
    decoder = TileDecoder(enc.device, params.decode)
    config = {"out": os.path.abspath(out_dir), "reader": reader, **asdict(params), "device": str(enc.device),
              "batch_size": params.resolved_batch_size(), "weights_checksum": enc.checksum}
    summary = RunSummary("encode", config)
    timings = {"read": 0.0, "augment": 0.0, "encode": 0.0, "wait": 0.0}
    progress = Progress(len(entries), "encode")

    def add(record: SlideRecord) -> None:
        summary.add(record)
        progress.update(record)

    source = _decode_cohort(entries, params, out_dir, enc, decoder, reader, overwrite, timings)
    pending = None  # the slide being written: (job, future, arrays, dropped)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigassl-writer") as writer, \
            Prefetch(source, params.prefetch_mb << 20, _item_bytes,
                     on_drop=lambda item: item.release() if isinstance(item, _Job) else None) as items:
        while True:
            t = time.perf_counter()
            job = next(items, None)
            timings["wait"] += time.perf_counter() - t
            if job is None:
                break
            if job.record is not None:
                if pending:
                    add(_written(*pending))
                    pending = None
                add(job.record)
                continue
            try:
                arrays, dropped = _encode_job(job, items, params, enc, decoder, timings)
            except Exception as err:
                job.release()
                if pending:
                    add(_written(*pending))
                    pending = None
                add(job.settle("failed", message=_failure(job.entry, err)))
                continue
            job.slide.close()
            attrs = {**job.attrs, "format": FORMAT, "version": __version__, "out_dim": enc.out_dim,
                     "pca": params.pca, "input_size": enc.config.input_size, "device": str(enc.device),
                     "compute_precision": enc.precision, "aug_param_columns": list(PARAM_COLUMNS),
                     "n_corrupt_tiles": len(dropped)}
            if pending:
                add(_written(*pending))
            pending = (job, writer.submit(write_features, job.path, arrays, attrs), arrays, dropped)
        if pending:
            add(_written(*pending))
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
