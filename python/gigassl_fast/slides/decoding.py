"""Where a run decodes its tiles, decided once and said why: the one owner of the decode decision.

JPEG-tiled TIFF levels go through the JPEG tile engine (each compressed tile decoded once per pass, on
the CPU's threads); everything else through the slide's reader (cuCIM, OpenSlide, tiffslide). On a GPU,
cuCIM's own GPU decoding of the other formats is used only after a trial in a child process found it right
and faster (see gpu_probe.py), or with ``--decode gpu``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..errors import GigasslError
from .backends import CorruptTilesError
from .slide import ENGINE, Slide

#: One decoded batch: the tiles on the device, or the error naming its corrupt tiles.
Batch = tuple[torch.Tensor | None, CorruptTilesError | None]


class TileDecoder:
    """Decodes a slide's tiles, in batches, onto `device`.

    Args:
        device: where the tiles go (the encoder's device).
        mode: ``auto`` (the engine or the reader on the CPU; cuCIM on the GPU where a trial says it is
            right and faster), ``cpu``, or ``gpu`` (cuCIM on the GPU for the formats the engine does not
            read, whatever the speed).
    """

    def __init__(self, device: torch.device, mode: str = "auto") -> None:
        from ..compute import cucim_gpu_decode

        self.device, self.mode = device, mode
        gpu_ok, why = cucim_gpu_decode()
        self.cucim_on_device = device.type == "cuda" and gpu_ok and mode != "cpu"
        self._checked = False
        if mode == "cpu":
            why = "--decode cpu"
        self.note = (f"JPEG-tiled TIFF: {ENGINE} on the CPU; other formats: "
                     + (f"GPU (cuCIM): {why}" if self.cucim_on_device else f"CPU: {why}"))

    @classmethod
    def check(cls, mode: str, device: torch.device) -> None:
        """Refuses ``--decode gpu`` where cuCIM cannot decode on the encoder's device, with the reason."""
        if mode != "gpu":
            return
        from ..compute import cucim_gpu_decode

        ok, why = cucim_gpu_decode()
        if ok and device.type != "cuda":
            ok, why = False, "the encoder runs on the CPU"
        if not ok:
            raise GigasslError(f"--decode gpu: cuCIM cannot decode on a GPU here ({why}); use --decode auto or cpu")

    def path(self, slide: Slide, level: int) -> str:
        """Who decodes `slide` at `level`, and why, in one line (the run summary's per-slide note)."""
        name, why = slide.decode_path(level)
        where = "GPU" if name == "cucim" and self.cucim_on_device else "CPU"
        return f"{name} on the {where} ({why})" if why else f"{name} on the {where}"

    def batches(self, slide: Slide, xy: np.ndarray, level: int, size: int, batch_size: int,
                workers: int) -> Iterator[Batch]:
        """uint8 (B, size, size, 3) tiles on the device per batch of `xy`, in order, or the error naming a
        batch's corrupt tiles (the other batches are still decoded, so that all are found)."""
        name, _ = slide.decode_path(level)
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
        t = torch.from_numpy(tiles)
        return t if self.device.type == "cpu" else t.pin_memory().to(self.device, non_blocking=True)

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
            import click

            click.echo(f"warning: decoding on the CPU: {why} on {slide.path}", err=True)
            self._cpu_from_now(f"{why} ({slide.path})")
            return
        gpu, cpu = res["gpu_tiles_per_s"], res["cpu_tiles_per_s"]
        rates = f"{gpu:,.0f} tiles/s on the GPU, {cpu:,.0f} on {workers} CPU threads in a trial"
        if self.mode == "gpu":
            self._note_other(f"GPU (cuCIM): --decode gpu; matched CPU decoding (mean |diff| "
                             f"{res['mean_abs_diff']:.2f}; {rates})")
        elif gpu <= cpu:
            self._cpu_from_now(f"faster than cuCIM GPU decoding ({rates})")
        else:
            self._note_other(f"GPU (cuCIM): matched CPU decoding (mean |diff| {res['mean_abs_diff']:.2f}) "
                             f"and faster ({rates})")

    def _cpu_from_now(self, why: str) -> None:
        self.cucim_on_device = False
        self._note_other(f"CPU: {why}")

    def _note_other(self, text: str) -> None:
        self.note = f"JPEG-tiled TIFF: {ENGINE} on the CPU; other formats: {text}"
