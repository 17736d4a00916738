"""Where a run decodes its tiles, decided once and said why: the one owner of the decode decision.

JPEG-tiled TIFF levels go through the JPEG tile engine (each compressed tile decoded once per pass, on
the CPU's threads); everything else through the slide's reader (cuCIM, OpenSlide, tiffslide). On a GPU,
cuCIM's own GPU decoding of the other formats is used only after a trial in a child process found it right
and faster (see gpu_probe.py), or with ``--decode gpu`` after the same comparison in this process.
``--decode gpu`` also batch-decodes the engine's JPEG streams on the GPU with nvImageCodec (gpu_jpeg.py),
after an in-process trial against the CPU engine for each kind of JPEG tile (RGB or YCbCr, chroma
subsampling, tile size); that path has not run on a GPU yet, so no automatic choice takes it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..errors import GigasslError
from ..runtime import to_device
from .backends import CorruptTilesError, _first_line
from .jpeg_engine import JpegLevel
from .slide import ENGINE, Slide

#: One decoded batch: the tiles on the device, or the error naming its corrupt tiles.
Batch = tuple[torch.Tensor | None, CorruptTilesError | None]

#: Mean and largest absolute difference (grey levels) allowed between the GPU and CPU decoding of the
#: same JPEG streams in the trial: two IDCT implementations round differently.
GPU_JPEG_MEAN_DIFF, GPU_JPEG_MAX_DIFF = 0.5, 8


class TileDecoder:
    """Decodes a slide's tiles, in batches, onto `device`.

    Args:
        device: where the tiles go (the encoder's device).
        mode: ``auto`` (the engine or the reader on the CPU; cuCIM on the GPU where a trial says it is
            right and faster), ``cpu``, or ``gpu`` (cuCIM on the GPU for the formats the engine does not
            read when it matches CPU decoding, whatever the speed; the engine's streams by nvImageCodec on
            the GPU for each kind of JPEG tile where it matches the CPU engine).
    """

    def __init__(self, device: torch.device, mode: str = "auto", warn: Callable[[str], None] | None = None) -> None:
        """`warn` receives the one-line warnings of decoding trials that fall back to the CPU (default:
        stderr)."""
        from ..compute import cucim_gpu_decode
        from .gpu_jpeg import nvimgcodec_status

        self.device, self.mode = device, mode
        self.warn = warn or (lambda line: print(line, file=sys.stderr))
        gpu_ok, why = cucim_gpu_decode()
        self.cucim_on_device = device.type == "cuda" and gpu_ok and mode != "cpu"
        self._checked = False
        self.other_note = "--decode cpu" if mode == "cpu" else why
        self.other_note = f"GPU (cuCIM): {why}" if self.cucim_on_device else f"CPU: {self.other_note}"
        self.nv_available, self.nv_why = False, "--decode gpu not given"
        if mode == "gpu" and device.type == "cuda":
            self.nv_available, self.nv_why = nvimgcodec_status()
        # per kind of JPEG tile (JpegLevel.variant): None when nvImageCodec matched the CPU engine, else why not
        self._nv_trials: dict[tuple, str | None] = {}
        self._nv_notes: list[str] = []
        self._nv_decoders: dict[tuple[int, int], object] = {}

    @property
    def note(self) -> str:
        """The run's decoding, in one line (the run summary's `config.decode`)."""
        engine = f"{ENGINE} on the CPU"
        if self.nv_available:
            engine += ("; nvImageCodec on the GPU (--decode gpu) for " + "; ".join(self._nv_notes)
                       if self._nv_notes else "; nvImageCodec on the GPU (--decode gpu) not tried")
        elif self.mode == "gpu" and self.device.type == "cuda":
            engine += f" (nvImageCodec: {self.nv_why})"
        return f"JPEG-tiled TIFF: {engine}; other formats: {self.other_note}"

    @classmethod
    def check(cls, mode: str, device: torch.device) -> None:
        """Refuses ``--decode gpu`` where nothing can decode on the encoder's device, with the reasons."""
        if mode != "gpu":
            return
        from ..compute import cucim_gpu_decode
        from .gpu_jpeg import nvimgcodec_status

        if device.type != "cuda":
            raise GigasslError("--decode gpu: the encoder runs on the CPU; use --decode auto or cpu")
        (cu_ok, cu_why), (nv_ok, nv_why) = cucim_gpu_decode(), nvimgcodec_status()
        if not (cu_ok or nv_ok):
            raise GigasslError(f"--decode gpu: neither nvImageCodec ({nv_why}) nor cuCIM ({cu_why}) can decode on "
                               "a GPU here; use --decode auto or cpu")

    def path(self, slide: Slide, level: int) -> str:
        """Who decoded `slide` at `level`, and why, in one line (the run summary's per-slide note); asked
        after its batches, so that it tells what the trials decided."""
        name, why = slide.decode_path(level)
        where = "CPU"
        if name == "cucim" and self.cucim_on_device:
            where = "GPU"
        elif name == ENGINE and self.nv_available:
            verdict = self._nv_trials.get(slide.engine.level(slide.level_dimensions[level]).variant, "not tried")
            if verdict is None:
                name, where = f"{ENGINE} streams by nvImageCodec", "GPU"
            else:
                why = f"{why}; nvImageCodec: {verdict}"
        return f"{name} on the {where} ({why})" if why else f"{name} on the {where}"

    def batches(self, slide: Slide, xy: np.ndarray, level: int, size: int, batch_size: int,
                workers: int) -> Iterator[Batch]:
        """uint8 (B, size, size, 3) tiles on the device per batch of `xy`, in order, or the error naming a
        batch's corrupt tiles (the other batches are still decoded, so that all are found)."""
        if len(xy) == 0:  # nothing to decode, and nothing to try a decoder on
            return
        name, _ = slide.decode_path(level)
        if name == ENGINE and self.nv_available and self._nv_trusted(slide, xy[:batch_size], level, size, workers):
            yield from self._gpu_engine(slide, xy, level, size, batch_size)
            return
        if name == ENGINE or not (self.cucim_on_device and name == "cucim"):
            for tiles, err in slide.region_batches(xy, level, size, size, batch_size, workers):
                yield (None if tiles is None else self._to_device(tiles)), err
            return
        self._trial(slide, xy[:4 * batch_size], level, size, workers)
        for start in range(0, len(xy), batch_size):
            chunk = xy[start:start + batch_size]
            try:
                if self.cucim_on_device:
                    yield slide.backend.read_regions_torch(chunk, level, size, size, self.device, workers), None
                else:
                    yield self._to_device(slide.backend.read_regions(chunk, level, size, size, workers)), None
            except CorruptTilesError as err:
                yield None, err

    def _to_device(self, tiles: np.ndarray) -> torch.Tensor:
        return to_device(tiles, self.device)

    # -- the engine's streams on the GPU (nvImageCodec) -------------------------------------------------------
    def _gpu_engine(self, slide: Slide, xy: np.ndarray, level: int, size: int, batch_size: int) -> Iterator[Batch]:
        from .gpu_jpeg import DeviceRegionPass

        plan = slide.region_pass(xy, level, size, size)
        regions = DeviceRegionPass(plan, self._nv_decoder(plan.level), self.device, batch_size)
        for start in range(0, len(xy), batch_size):
            stop = min(len(xy), start + batch_size)
            tiles, bad = regions.read(start, stop)
            yield tiles, (CorruptTilesError.in_batch(slide.path, xy, bad, level) if bad else None)

    def _nv_decoder(self, lv: JpegLevel):
        from .gpu_jpeg import NvImageCodecDecode

        key = (lv.tile_width, lv.tile_height)
        if key not in self._nv_decoders:
            self._nv_decoders[key] = NvImageCodecDecode(self.device, *key)
        return self._nv_decoders[key]

    def _nv_trusted(self, slide: Slide, xy: np.ndarray, level: int, size: int, workers: int) -> bool:
        """Whether nvImageCodec decodes this kind of JPEG tile as the CPU engine does: tried once per kind,
        on the first batch (`xy`) of the first slide that has it."""
        lv = slide.engine.level(slide.level_dimensions[level])
        if lv.variant not in self._nv_trials:
            why = self._gpu_jpeg_trial(slide, xy, level, size, workers)
            if why == "":  # no sound region to compare in this batch: try again on the next slide
                return False
            self._nv_trials[lv.variant] = why
            if why:
                self.warn(f"warning: JPEG tiles decoded on the CPU: {why} on {slide.path}")
        return self._nv_trials[lv.variant] is None

    def _gpu_jpeg_trial(self, slide: Slide, xy: np.ndarray, level: int, size: int, workers: int) -> str | None:
        """The batch decoded by the CPU engine and by nvImageCodec: None when the pixels agree to the IDCT's
        rounding (the rates go in the run's note), else why not ("" when there was nothing to compare)."""
        import time

        from .gpu_jpeg import DeviceRegionPass

        cpu_pass, gpu_plan = slide.region_pass(xy, level, size, size), slide.region_pass(xy, level, size, size)
        lv, n = cpu_pass.level, len(xy)
        kind = (f"{'RGB' if lv.rgb else 'YCbCr'} {lv.subsampling[0]}x{lv.subsampling[1]} "
                f"{lv.tile_width}x{lv.tile_height} tiles")
        try:
            t = time.perf_counter()
            cpu, bad = cpu_pass.read(0, n, workers)
            t_cpu = time.perf_counter() - t
            gpu_pass = DeviceRegionPass(gpu_plan, self._nv_decoder(lv), self.device, n)
            torch.cuda.synchronize(self.device)
            t = time.perf_counter()
            gpu, _ = gpu_pass.read(0, n)
            torch.cuda.synchronize(self.device)
            t_gpu = time.perf_counter() - t
            good = [i for i in range(n) if i not in bad]
            if not good:
                return ""
            diff = (gpu[good].cpu().int() - torch.from_numpy(cpu[good]).int()).abs()
            mean, peak = float(diff.float().mean()), int(diff.max())
        except Exception as err:  # nvImageCodec failing in any way: the CPU engine, said why
            return f"nvImageCodec failed in a trial on {kind} ({type(err).__name__}: {_first_line(err)})"
        if mean > GPU_JPEG_MEAN_DIFF or peak > GPU_JPEG_MAX_DIFF:
            return f"nvImageCodec and libjpeg-turbo differ by {mean:.2f} grey levels on average, {peak} at most, on {kind}"
        self._nv_notes.append(f"{kind} (mean |diff| {mean:.2f}, max {peak}; {len(good) / max(t_gpu, 1e-9):,.0f} "
                              f"regions/s on the GPU, {len(good) / max(t_cpu, 1e-9):,.0f} on {workers} CPU threads "
                              "in a trial)")
        return None

    # -- cuCIM on the GPU, for the other formats ----------------------------------------------------------------
    def _trial(self, slide: Slide, xy: np.ndarray, level: int, size: int, workers: int) -> None:
        """Before cuCIM decodes on the GPU for the first time: is it right, and faster? --decode auto runs
        the trial in a child process; --decode gpu in this one, and keeps the GPU whatever the speed."""
        if self._checked:
            return
        self._checked = True
        from . import gpu_probe

        if self.mode == "auto":
            res = gpu_probe.probe(slide.path, xy, level, size, workers, str(self.device))
        else:
            try:
                res = gpu_probe.trial(slide.backend, xy, level, size, self.device, workers)
            except GigasslError as err:
                res = {"ok": False, "why": str(err)}
        if not res["ok"]:
            why = res.get("why") or f"GPU and CPU decoding differ by {res['mean_abs_diff']:.2f} grey levels on average"
            self.warn(f"warning: decoding on the CPU: {why} on {slide.path}")
            self._cpu_from_now(f"{why} ({slide.path})")
            return
        gpu, cpu = res["gpu_tiles_per_s"], res["cpu_tiles_per_s"]
        rates = f"{gpu:,.0f} tiles/s on the GPU, {cpu:,.0f} on {workers} CPU threads in a trial"
        if self.mode == "gpu":
            self.other_note = (f"GPU (cuCIM): --decode gpu; matched CPU decoding (mean |diff| "
                               f"{res['mean_abs_diff']:.2f}; {rates})")
        elif gpu <= cpu:
            self._cpu_from_now(f"faster than cuCIM GPU decoding ({rates})")
        else:
            self.other_note = (f"GPU (cuCIM): matched CPU decoding (mean |diff| {res['mean_abs_diff']:.2f}) "
                               f"and faster ({rates})")

    def _cpu_from_now(self, why: str) -> None:
        self.cucim_on_device = False
        self.other_note = f"CPU: {why}"
