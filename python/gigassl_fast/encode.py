"""The encode stage: tile features, plain and under Giga-SSL augmentations (spec §3), per slide; the file
it writes is described in features.py. Each distinct tile is decoded once per slide; the augmented
batches are built from that pool. The cohort around it (locks, reuse, the decode/encode/write
pipeline) is encode_pipeline.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .augment import PARAM_COLUMNS, augment, draw_params
from .cohort import SlideEntry
from .encoders import get_config
from .encoders.inference import TileEncoder
from .errors import GigasslError
from .features import FORMAT
from .runtime import check_device, check_precision, resolve_device, slide_seed, to_device
from .slides import CorruptTilesError
from .slides.decoding import Batch, TileDecoder
from .tiling import TileParams

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
        check_device(self.device)
        check_precision(self.precision)
        if self.decode not in ("auto", "gpu", "cpu"):
            raise GigasslError(f"--decode must be auto, gpu or cpu (got {self.decode!r})")
        if self.on_corrupt_tile not in ("fail", "skip"):
            raise GigasslError(f"--on-corrupt-tile must be fail or skip (got {self.on_corrupt_tile!r})")
        TileDecoder.check(self.decode, self.resolved_device())
        self.tiles.validate()
        return self

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_batch_size(self) -> int:
        return self.batch_size or BATCH_SIZE.get(self.resolved_device().type, 64)

    def tile_encoder(self) -> TileEncoder:
        return TileEncoder(self.encoder, self.weights, self.resolved_device(), self.precision, self.pca)


def reuse_key(entry: SlideEntry, params: EncodeParams, checksum: str, compute_precision: str) -> dict:
    """What a feature file must have been made with to be reused. The precision compared is the one the
    encoder ran in (`auto` means bf16 on one machine and float32 on another)."""
    from .tiling import reuse_key as tile_key

    return {**tile_key(entry, params.tiles), "format": FORMAT, "encoder": params.encoder,
            "weights_checksum": checksum, "naug": params.naug, "nt": params.nt, "seed": params.seed,
            "compute_precision": compute_precision}


def _to_float(tiles_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, s, s, 3) -> float (B, 3, size, size) in [0, 1], on the tensor's device."""
    x = tiles_u8.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def encode_slide(tile: int, coords: np.ndarray, params: EncodeParams, enc: TileEncoder, slide_id: str,
                 batches: Iterator[Batch], timings: dict) -> dict:
    """Features of one slide's tiles of `tile` pixels (the grid's tile size at the target mpp); returns
    the arrays ``write_features`` takes.

    `batches`: the slide's tiles at `coords`, decoded in batches of the run's batch size (see
    ``TileDecoder.batches``). Tiles with corrupt image data raise one CorruptTilesError naming every such
    tile of the slide: once the first is found, the rest of the slide is only decoded, to find the others.
    On a GPU nothing waits for the device until the slide's features are copied back at the end."""
    n = len(coords)
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
    slot_dev = to_device(slot, dev)
    features = torch.empty((n, enc.out_dim), dtype=torch.float16, device=dev)
    clock = _StageClock(dev, timings)
    corrupt: list[CorruptTilesError] = []
    start = 0
    t_wait = time.perf_counter()
    for raw, err in batches:
        timings["wait"] += time.perf_counter() - t_wait
        stop = min(n, start + bs)
        if err is not None:
            corrupt.append(err)
        if not corrupt:
            x = _to_float(raw, tile)
            pool.index_copy_(0, slot_dev[start:stop], raw if raw.shape[1] == tile else
                             (x * 255).round().byte().permute(0, 2, 3, 1))
            with clock("encode"):
                features[start:stop] = enc(x if tile == size else F.interpolate(
                    x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)).half()
        start = stop
        t_wait = time.perf_counter()
    if corrupt:
        raise CorruptTilesError.merged(corrupt)
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
        unique_dev = to_device(unique, dev)
        feats = torch.empty((len(unique), enc.out_dim), dtype=torch.float32, device=dev)
        for b in range(0, len(unique), bs):
            with clock("augment"):
                batch = augment(_to_float(pool[unique_dev[b:b + bs]], tile), p, size)
            with clock("encode"):
                feats[b:b + bs] = enc(batch)
        aug_features[a] = feats[to_device(inverse, dev)].half()
    out = {"coords": coords.astype(np.int64), "features": features.cpu().numpy(),
           "indices": indices.numpy().astype(np.int32) if n else np.zeros((0, params.nt), np.int32),
           "aug_features": aug_features.cpu().numpy(), "aug_params": aug_params}
    clock.settle()
    return out


class _StageClock:
    """Seconds per stage into `timings`: the host's clock on a CPU; on a GPU, CUDA events read once the
    slide's features are back, because the host does not wait for the device batch by batch."""

    def __init__(self, device: torch.device, timings: dict) -> None:
        self.gpu, self.timings = device.type == "cuda", timings
        self._events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if not self.gpu:
            t = time.perf_counter()
            yield
            self.timings[stage] += time.perf_counter() - t
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._events.append((stage, begin, end))

    def settle(self) -> None:
        for stage, begin, end in self._events:
            end.synchronize()
            self.timings[stage] += begin.elapsed_time(end) / 1000
        self._events.clear()
