"""The JPEG tile engine on a GPU: the same bitstreams, batch-decoded by nvImageCodec (nvJPEG) into device
memory, and the regions gathered there; nothing returns to the host.

Opt-in (``encode --decode gpu``) until tools/gpu_check.py has run it on a GPU machine: it has not yet.
Before the first slide it decodes a trial batch on both sides and falls back to the CPU engine, saying
why, when the pixels differ by more than the IDCT's rounding.

What it does not do like the CPU engine: libjpeg-turbo's strictness. Each stream is checked on the CPU
for what breaks its structure (no SOI or EOI, a truncated stream, a header that does not parse or does
not fit the tile), and nvImageCodec reports the streams it cannot decode; damage inside the entropy-coded
data that nvJPEG decodes through is not found here (the CPU engine finds it).

`gather_regions` is written in torch ops only, so that its CPU twin test (tests/test_jpeg_engine.py)
runs the code the GPU runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..runtime import to_device
from .jpeg_engine import RegionPass

#: (streams) -> (uint8 (N, tile_height, tile_width, 3) on the device, {stream index: problem})
BatchDecode = Callable[[list[bytes]], tuple[torch.Tensor, dict[int, str]]]


def stream_problem(data: bytes, tile_width: int, tile_height: int) -> str | None:
    """What breaks a JPEG stream's structure, found without decoding it; None when it looks whole. Bytes
    after the end-of-image marker (padded tiles) are allowed, as libjpeg allows them."""
    import simplejpeg

    if data[:2] != b"\xff\xd8":
        return "not a JPEG stream (no start-of-image marker)"
    if data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return "the stream is cut short (no end-of-image marker at its end)"
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as err:
        return f"its header does not parse ({str(err).strip()})"
    if w > tile_width or h > tile_height:
        return f"{w} x {h} pixels in a {tile_width} x {tile_height} tile"
    return None


def gather_regions(pool: torch.Tensor, slots: torch.Tensor, origins: torch.Tensor, first_tiles: torch.Tensor,
                   level_size: tuple[int, int], width: int, height: int, white: int) -> torch.Tensor:
    """uint8 (B, height, width, 3): regions gathered from decoded tiles, on the pool's device.

    Args:
        pool: uint8 (S, tile_height, tile_width, 3), the decoded tiles; slot `white` is all 255.
        slots: int64 (B, R, C): slot of the tile at row r0 + j, column c0 + k of region b (`white` for
            none), R x C being enough rows and columns for every region.
        origins: int64 (B, 2): level (x, y) of each region's top-left.
        first_tiles: int64 (B, 2): (c0, r0), each region's first tile column and row.
        level_size: the level's (width, height); pixels outside it are white.
    """
    th, tw = pool.shape[1], pool.shape[2]
    dev = pool.device
    b, rows, cols = slots.shape
    ys = origins[:, 1:2] + torch.arange(height, device=dev)  # (B, h) level rows
    xs = origins[:, 0:1] + torch.arange(width, device=dev)  # (B, w) level columns
    ty = (torch.div(ys, th, rounding_mode="floor") - first_tiles[:, 1:2]).clamp(0, rows - 1)
    tx = (torch.div(xs, tw, rounding_mode="floor") - first_tiles[:, 0:1]).clamp(0, cols - 1)
    # int32 index arithmetic where the pool allows: the (B, h, w) index is the largest temporary here
    index = torch.int32 if pool.shape[0] * th * tw < 2**31 else torch.int64
    cell = (ty[:, :, None] * cols + tx[:, None, :]).reshape(b, -1)
    slot = slots.reshape(b, rows * cols).gather(1, cell).reshape(b, height, width).to(index)
    inside = ((ys >= 0) & (ys < level_size[1]))[:, :, None] & ((xs >= 0) & (xs < level_size[0]))[:, None, :]
    slot = torch.where(inside, slot, torch.full_like(slot, white))
    offset = (ys.remainder(th)[:, :, None] * tw + xs.remainder(tw)[:, None, :]).to(index)
    return pool.reshape(-1, 3)[slot * (th * tw) + offset]


class DeviceRegionPass:
    """A `RegionPass` whose tiles are decoded by `decode` into a pool of device slots (sized for the
    pass's peak) and whose regions are gathered there. Batches are read in order."""

    def __init__(self, plan: RegionPass, decode: BatchDecode, device: torch.device, batch_size: int) -> None:
        self.plan, self.decode, self.device = plan, decode, device
        lv = plan.level
        peak = plan.peak_tiles(batch_size)
        self.white = peak
        self.pool = torch.empty((peak + 1, lv.tile_height, lv.tile_width, 3), dtype=torch.uint8, device=device)
        self.pool[self.white] = 255
        self._slot: dict[int, int] = {}
        self._free = list(range(peak))
        self._failed: dict[int, str] = {}
        self.tiles_decoded = 0

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, dict[int, str]]:
        """uint8 (stop - start, height, width, 3) on the device, and the problem of each region (by its
        index in the pass) that touches a damaged tile; such regions' pixels are undefined."""
        plan, lv = self.plan, self.plan.level
        wanted = sorted(plan.batch_tiles(start, stop) - self._slot.keys() - self._failed.keys())
        streams, where = [], []
        for t in wanted:
            if lv.counts[t] == 0:
                self._slot[t] = self.white  # a tile never written: white, as on the CPU
                continue
            try:
                data = plan.engine.tile_stream(lv, t)
            except Exception as err:  # a tile past the end of the file
                self._failed[t] = str(err)
                continue
            problem = stream_problem(data, lv.tile_width, lv.tile_height)
            if problem:
                self._failed[t] = problem
                continue
            streams.append(data)
            where.append(t)
        if streams:
            tiles, problems = self.decode(streams)
            slots = [self._free.pop() for _ in where]
            self.pool.index_copy_(0, _on(self.device, np.array(slots, np.int64)), tiles)
            for k, (t, s) in enumerate(zip(where, slots, strict=True)):
                if k in problems:
                    self._failed[t] = problems[k]
                    self._free.append(s)
                else:
                    self._slot[t] = s
        self.tiles_decoded += len(wanted)
        bad = plan.damage(start, stop, self._failed)
        idx = np.arange(start, stop)
        rows = int((plan.r1[idx] - plan.r0[idx]).max(initial=1)) or 1
        cols = int((plan.c1[idx] - plan.c0[idx]).max(initial=1)) or 1
        table = np.full((stop - start, rows, cols), self.white, np.int64)
        for i in range(start, stop):
            if i in bad:
                continue
            for t in plan.tiles_of(i):
                r, c = divmod(t, lv.cols)
                table[i - start, r - plan.r0[i], c - plan.c0[i]] = self._slot[t]
        first = np.stack([plan.c0[idx], plan.r0[idx]], 1)
        out = gather_regions(self.pool, _on(self.device, table), _on(self.device, plan.positions[idx]),
                             _on(self.device, first), (lv.width, lv.height), plan.width, plan.height, self.white)
        for t in plan.retiring(start, stop):
            s = self._slot.pop(t, None)
            if s is not None and s != self.white:
                self._free.append(s)
        return out, bad


def _on(device: torch.device, a: np.ndarray) -> torch.Tensor:
    return to_device(np.asarray(a, dtype=np.int64), device)


def nvimgcodec_status() -> tuple[bool, str]:
    """Whether nvImageCodec can decode JPEG on a GPU here, and why not when it cannot."""
    from ..compute import cuda_device

    if cuda_device() is None:
        return False, "no CUDA device"
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False, "nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu12 or -cu13 with nvJPEG)"
    except Exception as err:  # a broken CUDA install surfaces here
        return False, f"nvImageCodec does not load ({type(err).__name__}: {err})"
    return True, "nvImageCodec"


class NvImageCodecDecode:
    """nvImageCodec's batched JPEG decoder on one CUDA device, as a `BatchDecode`: accurate IDCT and smooth
    chroma upsampling (libjpeg's defaults, which the CPU engine uses), RGB out, no EXIF rotation."""

    def __init__(self, device: torch.device, tile_width: int, tile_height: int) -> None:
        import threading

        from nvidia import nvimgcodec

        self._nv, self.device = nvimgcodec, device
        # one decoder, possibly called from the decoding thread and the encoding thread (a slide redone
        # without its corrupt tiles): one call at a time, on a stream of its own
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(device)
        self.tile_width, self.tile_height = tile_width, tile_height
        self._decoder = nvimgcodec.Decoder(
            device_id=device.index or 0,
            backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY),
                      nvimgcodec.Backend(nvimgcodec.BackendKind.HYBRID_CPU_GPU)],
            options=":fancy_upsampling=1")
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                               allow_any_depth=False)

    def __call__(self, streams: list[bytes]) -> tuple[torch.Tensor, dict[int, str]]:
        """Decodes on the decoder's own stream and waits for it (not for the encoder's work): the tiles are
        ready for any stream when this returns, and nvImageCodec's images are no longer needed."""
        out = torch.full((len(streams), self.tile_height, self.tile_width, 3), 255, dtype=torch.uint8,
                         device=self.device)
        failed = {}
        with self._lock:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # `out` is ready for it
            with torch.cuda.stream(self._stream):
                images = self._decoder.decode([self._nv.CodeStream(s) for s in streams], params=self._params,
                                              cuda_stream=self._stream.cuda_stream)
                for k, img in enumerate(images):
                    if img is None:
                        failed[k] = "nvImageCodec could not decode it"
                        continue
                    t = torch.as_tensor(img, device=self.device)  # (h, w, 3) through __cuda_array_interface__
                    h, w = min(self.tile_height, t.shape[0]), min(self.tile_width, t.shape[1])
                    out[k, :h, :w] = t[:h, :w, :3]
            self._stream.synchronize()
        return out, failed
