"""Slide backends: the few primitives each decoding library provides.

A backend opens one file and offers level geometry, metadata resolution and region reads as uint8 RGB
numpy arrays. Everything else (resolution by mpp, thumbnails, tile reads) lives in ``Slide`` and works
the same over every backend.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SlideError

if TYPE_CHECKING:
    import torch

# tifffile logs damaged-file details to stderr; the backends turn them into one SlideError line.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)

#: Microns per pixel outside this range are treated as missing (for example the 72 dpi default that
#: many TIFF writers put in the resolution tags).
PLAUSIBLE_MPP = (0.01, 100.0)


class CorruptTilesError(SlideError):
    """Regions whose compressed image data is damaged. `positions`: their level-0 (x, y), in request order."""

    def __init__(self, path: object, positions: list[tuple[int, int]], level: int, detail: str) -> None:
        self.positions = [(int(x), int(y)) for x, y in positions]
        self.level, self.detail = level, detail
        x, y = self.positions[0]
        more = f" and {len(self.positions) - 1} more" if len(self.positions) > 1 else ""
        super().__init__(path, f"corrupt tile data at level-0 ({x}, {y}){more}, level {level} ({detail})")

    @classmethod
    def in_batch(cls, path: object, xy: np.ndarray, bad: dict[int, str], level: int) -> CorruptTilesError:
        """The error of a batch of regions at `xy` (level-0), `bad` mapping the index of each damaged one to
        what is wrong with it (``RegionPass.read``'s second result)."""
        return cls(path, [tuple(xy[i]) for i in bad], level, next(iter(bad.values())))

    @classmethod
    def merged(cls, errors: list[CorruptTilesError]) -> CorruptTilesError:
        """One error naming every region of `errors` (a slide's batches), with the first one's detail."""
        return cls(errors[0].path, [p for e in errors for p in e.positions], errors[0].level, errors[0].detail)


def plausible_mpp(value: float | None) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return float(value) if PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1] else None


def mpp_from_aperio_description(description: str) -> float | None:
    """The ``MPP = 0.499`` field of an Aperio ImageDescription, if any."""
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description or "")
    if not match:
        return None
    try:
        return plausible_mpp(float(match.group(1)))
    except ValueError:
        return None


def mpp_from_tiff_tags(path: str) -> float | None:
    """Resolution from the first page's tags: Aperio description, then X/YResolution in cm or inch."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            mpp = mpp_from_aperio_description(page.description)
            if mpp is not None:
                return mpp
            tags = page.tags
            if "XResolution" not in tags or "ResolutionUnit" not in tags:
                return None
            unit = int(tags["ResolutionUnit"].value)
            num, den = tags["XResolution"].value
            if not num or not den:
                return None
            per_unit = num / den  # pixels per unit
            um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
            return plausible_mpp(um_per_unit / per_unit) if um_per_unit else None
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError):
        return None


class SlideBackend(ABC):
    """One open slide file in one decoding library."""

    name: str = ""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    @abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of every pyramid level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> list[float]:
        """Level-0 pixels per level pixel, per level."""

    @property
    @abstractmethod
    def mpp(self) -> float | None:
        """Level-0 microns per pixel from the file's metadata, or None."""

    @abstractmethod
    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """uint8 (height, width, 3) RGB at `level`, top-left at level-0 pixel (x, y)."""

    def read_regions(
        self, xy: np.ndarray, level: int, width: int, height: int, num_workers: int = 1
    ) -> np.ndarray:
        """uint8 (N, height, width, 3): one region per level-0 top-left in `xy` (N, 2). Regions with corrupt
        image data raise one CorruptTilesError naming all of them, after the others were read."""
        out = np.empty((len(xy), height, width, 3), np.uint8)
        corrupt: list[CorruptTilesError] = []
        for i, (x, y) in enumerate(np.asarray(xy, np.int64)):
            try:
                out[i] = self.read_region(int(x), int(y), level, width, height)
            except CorruptTilesError as err:
                corrupt.append(err)
        if corrupt:
            raise CorruptTilesError(self.path, [p for e in corrupt for p in e.positions], level, corrupt[0].detail)
        return out

    def read_regions_torch(self, xy: np.ndarray, level: int, width: int, height: int, device: torch.device,
                           num_workers: int = 1) -> torch.Tensor:
        """uint8 (N, height, width, 3) tensor on `device`. Decoded on the CPU and copied, unless a
        backend decodes on the device itself."""
        from ..runtime import to_device

        return to_device(self.read_regions(xy, level, width, height, num_workers), device)

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        pass


def _rgb(arr: np.ndarray, path: str) -> np.ndarray:
    """Drops alpha (RGBA readers) and checks the layout a region read must have."""
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise SlideError(path, f"reader returned an unexpected array {arr.shape} {arr.dtype}; "
                               "only 8-bit RGB slides are supported")
    return np.ascontiguousarray(arr[:, :, :3])


#: File descriptors 1 and 2 belong to the whole process: one capture at a time. Another thread that prints
#: holds it too (``NATIVE_OUTPUT``), so that its lines are not swallowed by a capture in progress.
_CAPTURE = threading.RLock()
NATIVE_OUTPUT = _CAPTURE


@contextlib.contextmanager
def _native_output():
    """cuCIM and libtiff (inside OpenSlide) print from C straight to file descriptors 1 and 2; this keeps
    that out of our output and yields a list that receives the text on exit. cuCIM reports a corrupt
    JPEG tile only there (and returns garbage pixels), so the text is how damage is detected."""
    with _CAPTURE:
        yield from _capture()


def _capture():
    said: list[str] = []
    saved = []
    try:
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
    except OSError:  # no real descriptors (embedded interpreters)
        for _, copy in saved:
            os.close(copy)
        yield said
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with tempfile.TemporaryFile() as sink:
        try:
            for fd, _ in saved:
                os.dup2(sink.fileno(), fd)
            yield said
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            said.append(sink.read().decode("utf-8", "replace"))


_DECODE_PROBLEM = re.compile(r"(Corrupt JPEG data[^\n]*|Premature end of JPEG file|Not a JPEG file[^\n]*|"
                             r"Bogus [^\n]*|Invalid JPEG[^\n]*|Unsupported JPEG[^\n]*|ERROR in line [^\n]*)")


def _decode_problem(said: list[str]) -> str | None:
    """The decoder's complaint in captured native output, preferring libjpeg's own words."""
    found = _DECODE_PROBLEM.findall("".join(said))
    if not found:
        return None
    specific = [f for f in found if not f.startswith("ERROR in line")]
    return (specific or found)[0].strip()


class CucimBackend(SlideBackend):
    """cuCIM: SVS and tiled TIFF, decoded on the CPU with worker threads for batched reads."""

    name = "cucim"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        from cucim import CuImage

        try:
            with _native_output():
                self._img = CuImage(path)
        except (RuntimeError, ValueError) as err:
            raise SlideError(path, f"cuCIM cannot open it ({_first_line(err)})") from None
        res = self._img.resolutions
        self._dims = [(int(w), int(h)) for w, h in res["level_dimensions"]]
        self._ds = [float(d) for d in res["level_downsamples"]]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self._dims

    @property
    def level_downsamples(self) -> list[float]:
        return self._ds

    @property
    def mpp(self) -> float | None:
        meta = self._img.metadata
        aperio = meta.get("aperio", {}) if isinstance(meta, dict) else {}
        if "MPP" in aperio:
            try:
                return plausible_mpp(float(aperio["MPP"]))
            except ValueError:
                pass
        return mpp_from_tiff_tags(self.path)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            with _native_output() as said:
                region = self._img.read_region((int(x), int(y)), (int(width), int(height)), int(level))
                region = _rgb(np.asarray(region), self.path)
        except (RuntimeError, ValueError) as err:
            raise SlideError(self.path, f"cuCIM failed to read a region at ({x}, {y}) level {level} "
                                        f"({_first_line(err)}); the file may be truncated") from None
        problem = _decode_problem(said)
        if problem:
            raise CorruptTilesError(self.path, [(x, y)], level, f"cuCIM: {problem}")
        return region

    def read_regions(
        self, xy: np.ndarray, level: int, width: int, height: int, num_workers: int = 1
    ) -> np.ndarray:
        xy = np.asarray(xy, np.int64)
        out = np.empty((len(xy), height, width, 3), np.uint8)
        if len(xy) == 0:
            return out
        try:
            with _native_output() as said:
                batches = self._img.read_region(
                    [tuple(map(int, p)) for p in xy], (int(width), int(height)), int(level),
                    num_workers=max(1, int(num_workers)), batch_size=min(len(xy), 64))
                i = 0
                for batch in batches:
                    arr = np.asarray(batch)
                    if arr.ndim == 3:
                        arr = arr[None]
                    out[i:i + len(arr)] = arr[..., :3]
                    i += len(arr)
        except (RuntimeError, ValueError) as err:
            raise SlideError(self.path, f"cuCIM failed in a batched read at level {level} "
                                        f"({_first_line(err)}); the file may be truncated") from None
        if i != len(xy):
            raise SlideError(self.path, f"cuCIM returned {i} of {len(xy)} regions")
        if _decode_problem(said):
            self._raise_corrupt(xy, level, width, height)
        return out

    def _raise_corrupt(self, xy: np.ndarray, level: int, width: int, height: int) -> None:
        """A batched read reported damage without saying where (its workers share one output): read the
        regions one by one to name those that are damaged."""
        bad, detail = [], None
        for x, y in xy:
            try:
                self.read_region(int(x), int(y), level, width, height)
            except CorruptTilesError as err:
                bad.extend(err.positions)
                detail = detail or err.detail
        if bad:
            raise CorruptTilesError(self.path, bad, level, detail)

    def read_regions_torch(self, xy: np.ndarray, level: int, width: int, height: int, device: torch.device,
                           num_workers: int = 1) -> torch.Tensor:
        """On a CUDA device, cuCIM decodes on the GPU (nvJPEG) and the tiles never leave it: each batch
        cuCIM yields is viewed through __cuda_array_interface__ and copied device-to-device into the
        output at once, because cuCIM's batch loader frees or reuses a batch's buffer when it moves on
        (holding views across batches reads freed memory)."""
        if device.type != "cuda":
            return super().read_regions_torch(xy, level, width, height, device, num_workers)
        import cupy
        import torch

        xy = np.asarray(xy, np.int64)
        out = torch.empty((len(xy), int(height), int(width), 3), dtype=torch.uint8, device=device)
        done = 0
        try:
            with cupy.cuda.Device(device.index or 0), _native_output() as said:
                batches = self._img.read_region(
                    [tuple(map(int, p)) for p in xy], (int(width), int(height)), int(level),
                    num_workers=max(1, int(num_workers)), batch_size=min(len(xy), 64), device="cuda")
                for batch in batches:
                    arr = cupy.asarray(batch)
                    if arr.ndim == 3:
                        arr = arr[None]
                    n = arr.shape[0]
                    out[done:done + n].copy_(torch.as_tensor(arr[..., :3], device=device))
                    torch.cuda.current_stream(device).synchronize()  # the copy is done before cuCIM moves on
                    done += n
        except (RuntimeError, ValueError) as err:
            raise SlideError(self.path, f"cuCIM failed to decode on {device} ({_first_line(err)})") from None
        if done != len(xy):
            raise SlideError(self.path, f"cuCIM returned {done} of {len(xy)} regions on {device}")
        if _decode_problem(said):
            self._raise_corrupt(xy, level, width, height)
        return out

    def close(self) -> None:
        self._img = None


class OpenSlideBackend(SlideBackend):
    """OpenSlide: NDPI, MRXS, SCN, VMS, BIF, DICOM, SVS, generic tiled TIFF."""

    name = "openslide"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._slide = self._open()

    def _open(self):
        import openslide

        try:
            with _native_output():
                return openslide.OpenSlide(self.path)
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(self.path, f"OpenSlide cannot open it ({_first_line(err)})") from None

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(map(int, d)) for d in self._slide.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._slide.level_downsamples]

    @property
    def mpp(self) -> float | None:
        value = self._slide.properties.get("openslide.mpp-x")
        try:
            return plausible_mpp(float(value)) if value is not None else None
        except ValueError:
            return None

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        try:
            region = self._slide.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except (openslide.OpenSlideError, OSError) as err:
            # OpenSlide's errors are sticky: the handle fails every later read, so open it afresh.
            with contextlib.suppress(Exception):
                self._slide.close()
            self._slide = self._open()
            raise CorruptTilesError(self.path, [(x, y)], level, f"OpenSlide: {_first_line(err)}") from None
        # Composite transparent (outside-scan) pixels on white, as OpenSlide's own thumbnails do.
        rgba = np.asarray(region)
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        rgb = (rgba[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


class TiffSlideBackend(SlideBackend):
    """tiffslide (pure Python over tifffile): plain strip TIFFs and formats cuCIM lacks."""

    name = "tiffslide"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import warnings

        import tiffslide

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._slide = tiffslide.TiffSlide(path)
                # tiffslide parses lazily; touch the geometry now so a damaged file fails here.
                self._dims = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
                self._ds = [float(d) for d in self._slide.level_downsamples]
                mpp = self._slide.properties.get("tiffslide.mpp-x")
        except Exception as err:  # tiffslide raises many types (tifffile, zarr, IndexError, ValueError)
            raise SlideError(path, f"tiffslide cannot open it ({type(err).__name__}: {_first_line(err)})") from None
        self._mpp = plausible_mpp(float(mpp)) if mpp is not None else mpp_from_tiff_tags(path)
        # imagecodecs decodes damaged JPEG data into garbage without a word: tiles are checked strictly
        from .jpeg_engine import JpegTileEngine

        try:
            self._jpeg = JpegTileEngine(path)
        except Exception:  # not readable by tifffile: nothing to check against
            self._jpeg = None

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return self._dims

    @property
    def level_downsamples(self) -> list[float]:
        return self._ds

    @property
    def mpp(self) -> float | None:
        return self._mpp

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            region = self._slide.read_region((int(x), int(y)), int(level), (int(width), int(height)),
                                             as_array=True)
        except Exception as err:  # decode errors surface as many exception types
            raise CorruptTilesError(self.path, [(x, y)], level, f"tiffslide: {_first_line(err)}") from None
        size = self._dims[level]
        if self._jpeg is not None and self._jpeg.level(size) is not None:
            ds = self._ds[level]
            problem = self._jpeg.first_problem(size, int(x / ds), int(y / ds), int(width), int(height))
            if problem:
                raise CorruptTilesError(self.path, [(x, y)], level, problem)
        return _rgb(region, self.path)

    def close(self) -> None:
        self._slide.close()
        if self._jpeg is not None:
            self._jpeg.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


BACKENDS: dict[str, type[SlideBackend]] = {
    "cucim": CucimBackend,
    "openslide": OpenSlideBackend,
    "tiffslide": TiffSlideBackend,
}

# Formats cuCIM reads (tiled TIFF family); everything else goes to OpenSlide first.
_CUCIM_EXTS = {".svs", ".tif", ".tiff"}
_OPENSLIDE_EXTS = {".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
SLIDE_EXTENSIONS = _CUCIM_EXTS | _OPENSLIDE_EXTS


def backend_available(name: str) -> bool:
    """Whether the library behind a backend imports."""
    module = {"cucim": "cucim", "openslide": "openslide", "tiffslide": "tiffslide"}[name]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            __import__(module)
        return True
    except Exception:  # a broken optional install must not stop the others
        return False


def _is_tiled_tiff(path: str) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.pages[0].is_tiled)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return False


def backend_order(path: str) -> list[str]:
    """Backends to try for `path`, best first, from what the file is."""
    ext = os.path.splitext(path)[1].lower()
    if ext in _CUCIM_EXTS:
        # cuCIM reads strip TIFFs only through a slow whole-image path; tiffslide handles those well.
        order = ["cucim", "tiffslide", "openslide"] if _is_tiled_tiff(path) else ["tiffslide", "cucim",
                                                                                 "openslide"]
    elif ext in _OPENSLIDE_EXTS:
        order = ["openslide", "tiffslide"]
    else:
        order = ["openslide", "tiffslide"]
    return [b for b in order if backend_available(b)]


def open_backend(path: str, reader: str = "auto") -> SlideBackend:
    """Opens `path` with `reader`, or with the first backend in `backend_order` that accepts it."""
    if not os.path.exists(path):
        raise SlideError(path, "no such file; check the path or the manifest")
    if os.path.isdir(path):
        raise SlideError(path, "is a folder, not a slide file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise SlideError(path, "permission denied; make the file readable for this user") from None
    except OSError as err:
        raise SlideError(path, f"cannot read it ({err.strerror or err})") from None
    if reader != "auto":
        if reader not in BACKENDS:
            raise SlideError(path, f"unknown reader {reader!r}; use one of auto, {', '.join(BACKENDS)}")
        if not backend_available(reader):
            raise SlideError(path, f"reader {reader!r} is not installed; install it or use --reader auto")
        return BACKENDS[reader](path)
    order = backend_order(path)
    if not order:
        raise SlideError(path, "no slide reader is installed (cucim, openslide-python or tiffslide)")
    problems = []
    for name in order:
        try:
            return BACKENDS[name](path)
        except SlideError as err:
            problems.append(err.problem)
    ext = os.path.splitext(path)[1].lower() or "(no extension)"
    hint = ("not a slide this toolkit can read" if ext not in SLIDE_EXTENSIONS
            else "the file is damaged or not a valid slide")
    raise SlideError(path, f"{hint}: tried {', '.join(order)}; {problems[0]}")

