import os
import shutil

import numpy as np
import pytest

from conftest import NDPI, STRIP_TIFF, SVS
from gigassl_fast.errors import SlideError
from gigassl_fast.slides import Slide, backend_order


def test_svs_opens_with_cucim_and_reads_aperio_mpp(sample_dir):
    with Slide(SVS) as s:
        assert s.backend_name == "cucim"
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.mpp == pytest.approx(0.499)
        region = s.read_region(100, 200, 0, 64, 48)
    assert region.shape == (48, 64, 3) and region.dtype == np.uint8


def test_readers_agree_on_pixels(sample_dir):
    regions = {}
    for reader in ("cucim", "openslide", "tiffslide"):
        with Slide(SVS, reader=reader) as s:
            assert s.metadata_mpp == pytest.approx(0.499)
            regions[reader] = s.read_region(500, 700, 0, 256, 256).astype(int)
    for reader in ("openslide", "tiffslide"):
        assert np.abs(regions[reader] - regions["cucim"]).mean() < 2.0


def test_ndpi_goes_to_openslide(sample_dir):
    assert backend_order(NDPI)[0] == "openslide"
    with Slide(NDPI) as s:
        assert s.backend_name == "openslide"
        assert s.dimensions == (3968, 4864)
        assert s.level_count >= 4
        assert s.mpp == pytest.approx(0.22817, rel=1e-3)
        assert s.best_level_for_mpp(1.0) == 2  # 0.91 µm/px: the closest level finer than 1.0


def test_strip_tiff_without_mpp_names_slide_mpp(sample_dir):
    with Slide(STRIP_TIFF) as s:
        assert s.backend_name == "tiffslide"
        assert s.dimensions == (1493, 901)
        assert s.metadata_mpp is None
        with pytest.raises(SlideError, match="--slide-mpp"):
            _ = s.mpp
    with Slide(STRIP_TIFF, mpp=0.5) as s:
        assert s.mpp == 0.5
        assert s.thumbnail(1.0).shape == (450, 746, 3) or s.thumbnail(1.0).shape == (451, 747, 3)


def test_synthetic_pyramid_levels_and_resolution(synthetic_slide):
    for reader in ("cucim", "openslide"):
        with Slide(synthetic_slide, reader=reader) as s:
            assert s.level_dimensions == [(4096, 3072), (1024, 768)]
            assert s.level_downsamples == [1.0, 4.0]
            assert s.mpp == 0.5
            assert s.best_level_for_mpp(0.5) == 0
            assert s.best_level_for_mpp(1.0) == 0
            assert s.best_level_for_mpp(2.0) == 1
            assert s.best_level_for_mpp(1.99) == 1  # within the 2% slack
            assert s.best_level_for_mpp(100) == 1


def test_thumbnail_size_and_content(synthetic_slide):
    with Slide(synthetic_slide) as s:
        t8 = s.thumbnail(8.0)
        t3 = s.thumbnail(3.0)
        full = s.read_region(0, 0, 1, 1024, 768).astype(float)
    assert t8.shape == (192, 256, 3)
    assert t3.shape == (512, 683, 3)
    # area averaging keeps the mean colour of the slide
    assert np.abs(t8.reshape(-1, 3).mean(0) - full.reshape(-1, 3).mean(0)).max() < 1.5


def test_batched_reads_equal_single_reads(synthetic_slide):
    xy = np.array([[0, 0], [512, 1024], [3000, 2000], [4000, 3000]])
    with Slide(synthetic_slide) as s:
        batch = s.backend.read_regions(xy, 0, 128, 96, num_workers=2)
        singles = np.stack([s.read_region(int(x), int(y), 0, 128, 96) for x, y in xy])
    np.testing.assert_array_equal(batch, singles)


def test_bad_files_give_one_line_errors(tmp_path, synthetic_slide):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    truncated = tmp_path / "cut.tif"
    with open(synthetic_slide, "rb") as src:
        truncated.write_bytes(src.read()[: os.path.getsize(synthetic_slide) // 3])
    png = tmp_path / "photo.png"
    shutil.copy(synthetic_slide, tmp_path / "ok.tif")
    from PIL import Image

    Image.new("RGB", (10, 10)).save(png)
    cases = [(tmp_path / "missing.svs", "no such file"), (text, "not a valid slide"),
             (png, "not a slide this toolkit can read"), (tmp_path, "is a folder")]
    for path, words in cases:
        with pytest.raises(SlideError, match=words) as err:
            Slide(path).dimensions  # noqa: B018 - opening is lazy
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(SlideError, match="truncated|damaged") as err, Slide(truncated) as s:
        s.thumbnail(1.0)
    assert "\n" not in str(err.value)
    with pytest.raises(SlideError, match="unknown reader"):
        Slide(tmp_path / "ok.tif", reader="bioformats").dimensions  # noqa: B018


def test_torch_reads_equal_numpy_reads(synthetic_slide):
    import torch

    xy = np.array([[0, 0], [1000, 500]])
    with Slide(synthetic_slide) as s:
        t = s.backend.read_regions_torch(xy, 1, 64, 64, torch.device("cpu"))
        a = s.backend.read_regions(xy, 1, 64, 64)
    assert t.dtype == torch.uint8 and t.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(t.numpy(), a)


def test_gpu_decoding_trial_runs_in_a_child_and_reports_one_line(synthetic_slide, monkeypatch):
    """The trial `encode --decode auto` runs before trusting GPU decoding: a child process that decodes
    on the device and the CPU and times both (here the "device" is the CPU, so they agree exactly);
    where the device cannot decode or the child dies, one line says why."""
    import subprocess

    from gigassl_fast.slides import gpu_probe

    xy = np.array([[0, 0], [448, 224], [896, 896]])
    res = gpu_probe.probe(str(synthetic_slide), xy, 0, 224, 2, "cpu")
    assert res["ok"] and res["mean_abs_diff"] == 0 and res["tiles"] == 3 and res["gpu_tiles_per_s"] > 0
    if not torch_cuda():
        res = gpu_probe.probe(str(synthetic_slide), xy, 0, 224, 2, "cuda")
        assert not res["ok"] and res["why"].startswith("GPU decoding failed in a trial")
    aborted = subprocess.CompletedProcess([], -6, "", "terminate called after throwing ... illegal memory access\n")
    monkeypatch.setattr(gpu_probe.subprocess, "run", lambda *a, **k: aborted)
    res = gpu_probe.probe(str(synthetic_slide), xy, 0, 224, 2, "cuda")
    assert res == {"ok": False, "why": "GPU decoding crashed in a trial (signal 6: terminate called after throwing "
                                       "... illegal memory access)"}


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
