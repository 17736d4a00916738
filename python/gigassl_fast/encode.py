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

import os
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import click
import h5py
import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .augment import PARAM_COLUMNS, augment, draw_params
from .cohort import SlideEntry
from .encoders import create_encoder, get_config
from .errors import GigasslError
from .h5files import atomic_h5, is_complete, read_attrs, write_attrs
from .locks import lock_holder, slide_lock
from .runlog import Progress, RunSummary, SlideRecord
from .slides import CorruptTilesError, Slide
from .tiling import TileParams, read_tile_file, tile_one, tile_path

FORMAT = "gigassl-fast/features/1"


@dataclass(frozen=True)
class EncodeParams:
    encoder: str = "efficientnet-lite0"
    weights: str | None = None
    naug: int = 50
    nt: int = 256
    batch_size: int = 64
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    decode: str = "auto"
    on_corrupt_tile: str = "fail"
    seed: int = 0
    pca: str | None = None
    tiles: TileParams = field(default_factory=TileParams)

    def validate(self) -> EncodeParams:
        get_config(self.encoder)
        if self.naug < 0:
            raise GigasslError(f"--naug must be >= 0 (got {self.naug})")
        if self.nt < 1:
            raise GigasslError(f"--nt must be >= 1 (got {self.nt})")
        if self.batch_size < 1:
            raise GigasslError(f"--batch-size must be >= 1 (got {self.batch_size})")
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
        if self.decode == "gpu":
            from .compute import cucim_gpu_decode

            ok, why = cucim_gpu_decode()
            if ok and self.resolved_device().type != "cuda":
                ok, why = False, "the encoder runs on the CPU"
            if not ok:
                raise GigasslError(f"--decode gpu: cuCIM cannot decode on a GPU here ({why}); use --decode auto or cpu")
        self.tiles.validate()
        return self

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class TileEncoder:
    """The encoder on its device with its normalisation, applied in batches."""

    def __init__(self, params: EncodeParams) -> None:
        self.config = get_config(params.encoder)
        self.device = params.resolved_device()
        self.model = create_encoder(params.encoder, params.weights).to(self.device)
        from .compute import resolve_precision

        self.precision = resolve_precision(params.precision, self.device.type)
        self.bf16 = self.precision == "bf16"
        self.checksum = getattr(self.model, "weights_checksum", "unknown")
        self.model = _fold_batch_norms(self.model).to(memory_format=torch.channels_last)
        self.mean = torch.tensor(self.config.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.config.std, device=self.device).view(1, 3, 1, 1)
        self.pca = None
        self.out_dim = self.config.out_dim
        if params.pca:
            from .encoders.weights import file_checksum
            from .pca import load_pca

            self.pca = load_pca(params.pca, self.config.out_dim)
            self.out_dim = int(self.pca["components"].shape[0])
            self.checksum += "+pca" + file_checksum(params.pca)
        # Tiles are decoded where the encoder runs when cuCIM can decode on that GPU. With --decode auto
        # the first slide read that way is first tried in a child process (see slides/gpu_probe.py): a
        # fault in cuCIM's GPU decoder aborts its process, and must not take the run with it.
        from .compute import cucim_gpu_decode

        gpu_ok, why = cucim_gpu_decode()
        self.decode_mode = params.decode
        self.decode_on_device = self.device.type == "cuda" and gpu_ok and params.decode != "cpu"
        self.decode_checked = False
        if params.decode == "cpu":
            why = "--decode cpu"
        self.decode_note = f"GPU (cuCIM): {why}" if self.decode_on_device else f"CPU: {why}"

    def decode(self, slide: Slide, xy: np.ndarray, level: int, size: int, workers: int,
               trial: np.ndarray | None = None) -> torch.Tensor:
        """uint8 (N, size, size, 3) tiles on the encoder's device. `trial`: the coordinates the GPU
        decoding trial reads (default `xy`)."""
        backend = slide.backend
        if not (self.decode_on_device and backend.name == "cucim"):
            return backend.read_regions_torch(xy, level, size, size, self.device, workers)
        if not self.decode_checked:
            self.decode_checked = True
            ok, faster, why = self._check_gpu_decode(slide, xy if trial is None else trial, level, size, workers)
            if not (ok and faster):
                self.decode_on_device = False
                self.decode_note = f"CPU: {why} ({slide.path})"
                if not ok:
                    click.echo(f"warning: decoding on the CPU: {why} on {slide.path}", err=True)
                return backend.read_regions_torch(xy, level, size, size, self.device, workers)
            self.decode_note = f"GPU (cuCIM): {why}"
        return backend.read_regions_torch(xy, level, size, size, self.device, workers)

    def _check_gpu_decode(self, slide: Slide, xy: np.ndarray, level: int, size: int,
                          workers: int) -> tuple[bool, bool, str]:
        """(GPU decoding is right, it is the faster, why). --decode auto: a trial in a child process;
        --decode gpu: the same comparison in this process, and GPU decoding whatever the speed."""
        from .slides import gpu_probe

        if self.decode_mode == "auto":
            res = gpu_probe.probe(slide.path, xy, level, size, workers, str(self.device))
        else:
            try:
                res = gpu_probe.trial(slide.backend, xy, level, size, self.device, workers)
            except GigasslError as err:
                res = {"ok": False, "why": str(err)}
        if not res["ok"]:
            return False, False, res.get("why") or (f"GPU and CPU decoding differ by {res['mean_abs_diff']:.2f} grey "
                                                    "levels on average")
        gpu, cpu = res["gpu_tiles_per_s"], res["cpu_tiles_per_s"]
        rates = f"{gpu:,.0f} tiles/s on the GPU, {cpu:,.0f} on {workers} CPU threads in a trial"
        if self.decode_mode == "gpu":
            return True, True, f"--decode gpu; matched CPU decoding (mean |diff| {res['mean_abs_diff']:.2f}; {rates})"
        if gpu <= cpu:
            return True, False, f"faster than cuCIM GPU decoding ({rates})"
        return True, True, f"matched CPU decoding (mean |diff| {res['mean_abs_diff']:.2f}) and faster ({rates})"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, S, S) in [0, 1] on the device -> float32 (B, D) on the CPU."""
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feats = self.model(x).float().cpu()
        if self.pca is not None:
            from .pca import project

            feats = torch.from_numpy(project(feats.numpy(), self.pca))
        return feats


def _fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """The encoder with each batch norm folded into the convolution before it (inference only): one
    pass over the activations fewer per layer, 10-20% faster for resnet18-l3 on a 2-core CPU, same
    outputs to about 1e-7. An encoder that knows its own layout folds itself (``fold_batch_norms``);
    others go through torch.fx, and those it cannot trace are returned unchanged."""
    if hasattr(model, "fold_batch_norms"):
        return model.eval().fold_batch_norms()
    import warnings

    with warnings.catch_warnings():  # the module imports torch.jit.script_method, deprecated in torch 2.13
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse
    try:
        return fuse(model.eval())
    except Exception:  # not traceable: keep the model as it is
        return model


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


def _to_float(tiles_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, s, s, 3) -> float (B, 3, size, size) in [0, 1], on the tensor's device."""
    x = tiles_u8.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def encode_slide(slide: Slide, grid_attrs: dict, coords: np.ndarray, params: EncodeParams, enc: TileEncoder,
                 slide_id: str, timings: dict) -> dict:
    """Features of one slide (see the module docstring); returns the arrays to write.

    Tiles with corrupt image data raise one CorruptTilesError naming every such tile of the slide: once
    the first is found, the rest of the slide is only decoded, to find the others."""
    n = len(coords)
    tile = int(grid_attrs["tile_size"])
    size = enc.config.input_size
    gen = torch.Generator().manual_seed(slide_seed(params.seed, slide_id))
    indices = torch.randint(0, max(n, 1), (params.naug, params.nt), generator=gen, dtype=torch.int64)
    needed = np.unique(indices.numpy()) if n else np.zeros(0, np.int64)
    # Tiles the augmented batches draw from, kept where the encoder runs: on a GPU, decoded tiles never
    # travel back to the host.
    pool = torch.empty((len(needed), tile, tile, 3), dtype=torch.uint8, device=enc.device)
    slot = np.full(max(n, 1), -1, np.int64)
    slot[needed] = np.arange(len(needed))
    features = np.empty((n, enc.out_dim), np.float16)
    level, read = int(grid_attrs["read_level"]), int(grid_attrs["read_tile_size"])
    chunks = [(start, min(n, start + params.batch_size)) for start in range(0, n, params.batch_size)]

    def decode(chunk: tuple[int, int]) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        # a GPU decoding trial reads the first few chunks (several cuCIM batches, as the run will)
        tiles = enc.decode(slide, coords[chunk[0]:chunk[1]], level, read, params.workers,
                           trial=coords[:4 * params.batch_size])
        return tiles, time.perf_counter() - t

    # The next chunk is decoded while this one is encoded.
    corrupt: list[CorruptTilesError] = []
    with ThreadPoolExecutor(max_workers=1) as pool_exec:
        pending = pool_exec.submit(decode, chunks[0]) if chunks else None
        for i, (start, stop) in enumerate(chunks):
            try:
                raw, seconds = pending.result()
            except CorruptTilesError as err:
                corrupt.append(err)
            if i + 1 < len(chunks):
                pending = pool_exec.submit(decode, chunks[i + 1])
            if corrupt:
                continue
            timings["read"] += seconds
            x = _to_float(raw, tile)
            keep = slot[start:stop] >= 0
            if keep.any():
                sel = torch.from_numpy(np.flatnonzero(keep)).to(x.device)
                into = torch.from_numpy(slot[start:stop][keep]).to(x.device)
                pool[into] = raw.index_select(0, sel) if raw.shape[1] == tile else \
                    (x.index_select(0, sel) * 255).round().byte().permute(0, 2, 3, 1)
            t = time.perf_counter()
            features[start:stop] = enc(x if tile == size else F.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)).numpy()
            timings["encode"] += time.perf_counter() - t
    if corrupt:
        raise CorruptTilesError(slide.path, [p for e in corrupt for p in e.positions], corrupt[0].level,
                                corrupt[0].detail)
    aug_features = np.empty((params.naug if n else 0, params.nt, enc.out_dim), np.float16)
    aug_params = np.empty((params.naug if n else 0, len(PARAM_COLUMNS)), np.float32)
    for a in range(aug_features.shape[0]):
        p = draw_params(gen, tile)
        aug_params[a] = p.as_row()
        # A tile drawn twice into one batch gets the same augmentation, hence the same features: encode
        # each distinct tile of the batch once (saves much on slides with fewer tiles than Nt).
        unique, inverse = np.unique(slot[indices[a].numpy()], return_inverse=True)
        feats = np.empty((len(unique), enc.out_dim), np.float32)
        for start in range(0, len(unique), params.batch_size):
            t = time.perf_counter()
            batch = _to_float(pool[torch.from_numpy(unique[start:start + params.batch_size]).to(enc.device)], tile)
            batch = augment(batch, p, size)
            timings["augment"] += time.perf_counter() - t
            t = time.perf_counter()
            feats[start:start + params.batch_size] = enc(batch).numpy()
            timings["encode"] += time.perf_counter() - t
        aug_features[a] = feats[inverse]
    return {"coords": coords.astype(np.int64), "features": features,
            "indices": indices.numpy().astype(np.int32) if n else np.zeros((0, params.nt), np.int32),
            "aug_features": aug_features, "aug_params": aug_params}


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


def encode_one(entry: SlideEntry, params: EncodeParams, out_dir: str, enc: TileEncoder, reader: str,
               overwrite: bool, timings: dict) -> SlideRecord:
    start = time.time()
    path = features_path(out_dir, entry.slide_id)
    key = reuse_key(entry, params, enc.checksum, enc.precision)
    if os.path.exists(path) and not overwrite and is_complete(path, key):
        with h5py.File(path, "r") as fh:
            n = int(fh["coords"].shape[0])
            dropped = fh["corrupt_coords"][:].tolist() if "corrupt_coords" in fh else []
        # a file that left out corrupt tiles serves --on-corrupt-tile skip only; fail redoes (and fails) it
        if not dropped or params.on_corrupt_tile == "skip":
            note = f"up to date; {len(dropped)} tiles with corrupt image data left out" if dropped else "up to date"
            return SlideRecord(entry.slide_id, entry.path, "skipped", n, time.time() - start, note,
                               corrupt_tiles=dropped)
    if os.path.exists(path) and not overwrite and not is_complete(path, key) and is_complete(path, {}):
        return SlideRecord(entry.slide_id, entry.path, "failed", 0, time.time() - start,
                           f"{path} exists with other parameters; pass --overwrite to replace it")
    with slide_lock(path + ".lock") as mine:
        if not mine:
            return SlideRecord(entry.slide_id, entry.path, "locked", 0, time.time() - start,
                               f"being encoded by {lock_holder(path + '.lock')}")
        try:
            tile_rec = tile_one(entry, params.tiles, out_dir, reader, overwrite=False, qc=True)
            if tile_rec.status in ("failed", "locked"):
                return SlideRecord(entry.slide_id, entry.path, tile_rec.status, 0, time.time() - start, tile_rec.message)
            grid = read_tile_file(tile_path(out_dir, entry.slide_id))
            coords, dropped = grid.coords, np.zeros((0, 2), np.int64)
            with Slide(entry.path, reader=reader, mpp=entry.mpp) as slide:
                try:
                    arrays = encode_slide(slide, grid.attrs, coords, params, enc, entry.slide_id, timings)
                except CorruptTilesError as err:
                    if params.on_corrupt_tile != "skip":
                        raise GigasslError(f"{err}; pass --on-corrupt-tile skip to drop such tiles") from None
                    # every corrupt tile of the slide is named at once, so one more pass without them
                    dropped = np.array(sorted(set(err.positions)), np.int64).reshape(-1, 2)
                    keep = ~(coords[:, None, :] == dropped[None]).all(-1).any(1)
                    if not keep.any():
                        raise GigasslError(f"{err}; every tile of the slide is corrupt") from None
                    coords = coords[keep]
                    arrays = encode_slide(slide, grid.attrs, coords, params, enc, entry.slide_id, timings)
            arrays["corrupt_coords"] = dropped
            attrs = {**grid.attrs, **key, "format": FORMAT, "version": __version__, "out_dim": enc.out_dim, "pca": params.pca,
                     "input_size": enc.config.input_size, "device": str(enc.device), "compute_precision": enc.precision,
                     "aug_param_columns": list(PARAM_COLUMNS), "n_corrupt_tiles": len(dropped)}
            write_features(path, arrays, attrs)
        except GigasslError as err:
            return SlideRecord(entry.slide_id, entry.path, "failed", 0, time.time() - start, str(err))
        except Exception as err:  # one slide must never stop the cohort; the message keeps the cause
            return SlideRecord(entry.slide_id, entry.path, "failed", 0, time.time() - start,
                               f"{entry.path}: unexpected {type(err).__name__}: {err} (please report this)")
    n = len(arrays["coords"])
    if n == 0:
        return SlideRecord(entry.slide_id, entry.path, "empty", 0, time.time() - start,
                           "no tissue tiles: feature file written with 0 tiles")
    if len(dropped):
        x, y = dropped[0]
        return SlideRecord(entry.slide_id, entry.path, "done", n, time.time() - start,
                           f"{len(dropped)} tiles with corrupt image data left out, e.g. at level-0 ({x}, {y})",
                           corrupt_tiles=dropped.tolist())
    return SlideRecord(entry.slide_id, entry.path, "done", n, time.time() - start)


def distributed_share(entries: Sequence[SlideEntry]) -> tuple[list[SlideEntry], str | None]:
    """Under torchrun, each rank takes every WORLD_SIZE-th slide and its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return list(entries), None
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return list(entries)[rank::world], (f"cuda:{local}" if torch.cuda.is_available() else None)


def run_encode(entries: Sequence[SlideEntry], params: EncodeParams, out_dir: str, reader: str = "auto",
               overwrite: bool = False, summary_name: str = "encode_summary.json") -> RunSummary:
    """Encodes a cohort; one bad slide is recorded and the run goes on."""
    entries, rank_device = distributed_share(entries)
    if rank_device and params.device == "auto":
        params = EncodeParams(**{**asdict(params), "tiles": params.tiles, "device": rank_device})
    params.validate()
    enc = TileEncoder(params)
    config = {"out": os.path.abspath(out_dir), "reader": reader, **asdict(params), "device": str(enc.device),
              "weights_checksum": enc.checksum}
    summary = RunSummary("encode", config)
    timings = {"read": 0.0, "augment": 0.0, "encode": 0.0}
    progress = Progress(len(entries), "encode")
    for entry in entries:
        record = encode_one(entry, params, out_dir, enc, reader, overwrite, timings)
        summary.add(record)
        progress.update(record)
    done_tiles = sum(r.n_tiles for r in summary.records if r.status == "done")
    aug_tiles = params.naug * params.nt * sum(1 for r in summary.records if r.status == "done")
    summary.config["decode"] = enc.decode_note
    summary.config["throughput"] = {
        "read_tiles_per_s": done_tiles / timings["read"] if timings["read"] else None,
        "augment_tiles_per_s": aug_tiles / timings["augment"] if timings["augment"] else None,
        "encode_tiles_per_s": (done_tiles + aug_tiles) / timings["encode"] if timings["encode"] else None,
        "seconds": timings,
    }
    summary.write_json(os.path.join(out_dir, summary_name))
    return summary
