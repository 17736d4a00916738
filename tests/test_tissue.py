import numpy as np
import pytest
from gigassl_fast.benchmarks.reference.tiling import reference_otsu_gray_mask

from conftest import NDPI, STRIP_TIFF, SVS, random_thumbnail
from gigassl_fast import _core
from gigassl_fast.slides import Slide
from gigassl_fast.tissue import MaskParams, tissue_mask


def _same_threshold(a, b):
    return (np.isnan(a) and np.isnan(b)) or a == b


@pytest.mark.parametrize("seed", range(40))
def test_otsu_gray_identical_to_reference_on_random_thumbnails(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(2, 260, size=2)
    img = random_thumbnail(rng, h, w, tissue=seed % 2 == 1)
    mask, t = _core.otsu_gray_mask(img)
    ref, rt = reference_otsu_gray_mask(img)
    assert mask.dtype == np.uint8 and mask.shape == (h, w)
    assert _same_threshold(t, rt)
    np.testing.assert_array_equal(mask, ref)


@pytest.mark.parametrize("path,mpp", [(SVS, None), (STRIP_TIFF, 0.5), (NDPI, None)])
@pytest.mark.parametrize("thumb_mpp", [2.0, 8.0])
def test_otsu_gray_identical_to_reference_on_real_thumbnails(sample_dir, path, mpp, thumb_mpp):
    with Slide(path, mpp=mpp) as slide:
        thumb = slide.thumbnail(thumb_mpp)
    mask, t = _core.otsu_gray_mask(thumb)
    ref, rt = reference_otsu_gray_mask(thumb)
    assert _same_threshold(t, rt)
    np.testing.assert_array_equal(mask, ref)


def test_otsu_gray_finds_planted_tissue(synthetic_slide):
    from gigassl_fast.synthetic import BACKGROUND

    with Slide(synthetic_slide) as slide:
        thumb = slide.thumbnail(4.0)
    mask, _ = tissue_mask(thumb, MaskParams())
    truth = np.abs(thumb.astype(int) - BACKGROUND).sum(-1) > 40
    inter = (mask.astype(bool) & truth).sum()
    union = (mask.astype(bool) | truth).sum()
    assert 0.05 < truth.mean() < 0.9
    assert inter / union > 0.9


def test_blank_thumbnail_gives_empty_mask_and_nan_threshold():
    white = np.full((64, 64, 3), 255, np.uint8)
    mask, t = _core.otsu_gray_mask(white)
    assert np.isnan(t) and mask.sum() == 0
    mask, _ = tissue_mask(white, MaskParams(method="otsu-saturation"))
    assert mask.sum() == 0


def _reference_saturation_mask(rgb, ksize, close, min_obj, max_hole):
    """The otsu-saturation steps written with numpy / scipy / scikit-image."""
    from scipy import ndimage as ndi
    from skimage.morphology import remove_small_objects

    rgb = rgb.astype(np.int64)
    v, m = rgb.max(-1), rgb.min(-1)
    sat = np.where(v == 0, 0, (255 * (v - m) + v // 2) // np.maximum(v, 1)).astype(np.uint8)
    blur = ndi.median_filter(sat, size=ksize, mode="nearest")
    hist = np.bincount(blur.ravel(), minlength=256).astype(float)
    i = np.arange(256)
    q1, s1 = np.cumsum(hist), np.cumsum(i * hist)
    q2 = q1[-1] - q1
    with np.errstate(divide="ignore", invalid="ignore"):
        var = q1 * q2 * (s1 / q1 - (s1[-1] - s1) / q2) ** 2
    var = np.where((q1 > 0) & (q2 > 0), var, -1)[:255]
    t = int(np.argmax(var)) if var.max() >= 0 else 0
    mask = blur > t
    lo = -(close // 2)
    pad = np.pad(mask, close, mode="edge")
    h, w = mask.shape

    def window(a, off_lo, fn):
        out = None
        for dy in range(off_lo, off_lo + close):
            for dx in range(off_lo, off_lo + close):
                s = a[close + dy:close + dy + h, close + dx:close + dx + w]
                out = s if out is None else fn(out, s)
        return out

    dil = window(pad, lo, np.logical_or)
    closed = window(np.pad(dil, close, mode="edge"), -(close - 1 + lo), np.logical_and)
    closed = remove_small_objects(closed, max_size=min_obj - 1, connectivity=2) if min_obj > 1 else closed
    labels, n = ndi.label(~closed)
    for lab in range(1, n + 1):
        comp = labels == lab
        touches = comp[0].any() or comp[-1].any() or comp[:, 0].any() or comp[:, -1].any()
        if not touches and comp.sum() < max_hole:
            closed[comp] = True
    return closed.astype(np.uint8), t


@pytest.mark.parametrize("seed", range(8))
def test_otsu_saturation_matches_straightforward_implementation(seed):
    rng = np.random.default_rng(100 + seed)
    img = random_thumbnail(rng, int(rng.integers(20, 120)), int(rng.integers(20, 120)), tissue=True)
    min_obj, max_hole = int(rng.integers(0, 40)), int(rng.integers(0, 40))
    mask, t = _core.otsu_saturation_mask(img, 7, 4, min_obj, max_hole)
    ref, rt = _reference_saturation_mask(img, 7, 4, min_obj, max_hole)
    assert t == rt
    np.testing.assert_array_equal(mask, ref)


def test_otsu_saturation_area_limits_are_in_square_microns():
    img = np.full((100, 100, 3), 240, np.uint8)
    img[10:50, 10:50] = (200, 90, 160)  # 40x40 px of tissue
    img[70:73, 70:73] = (200, 90, 160)  # 3x3 px speck
    img[25:28, 25:28] = 240  # 3x3 hole inside the tissue
    params = MaskParams(method="otsu-saturation", median_ksize=1, close_size=1, min_object_um2=50 * 4.0,
                        max_hole_um2=50 * 4.0)
    coarse, _ = tissue_mask(img, params, thumb_mpp=2.0)  # 4 µm² per px: limits are 50 px
    assert coarse[71, 71] == 0 and coarse[26, 26] == 1 and coarse[30, 30] == 1
    fine, _ = tissue_mask(img, params, thumb_mpp=0.5)  # 0.25 µm² per px: limits are 800 px
    assert fine[71, 71] == 0 and fine[26, 26] == 1
    tiny, _ = tissue_mask(img, params, thumb_mpp=0.1)  # limits are 20,000 px: the big piece goes too
    assert tiny.sum() == 0


def test_core_rejects_bad_arrays():
    with pytest.raises(ValueError, match="RGB"):
        _core.otsu_gray_mask(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="odd"):
        _core.otsu_saturation_mask(np.zeros((4, 4, 3), np.uint8), 4, 2, 0, 0)
