import math

import numpy as np
import pytest
import torch

from gigassl_fast.augment import AugParams, _hsv_to_rgb, _rgb_to_hsv, augment, draw_params


def _params(**kw):
    base = dict(crop_x=0, crop_y=0, crop_w=64, crop_h=64, jitter=False, brightness=1.0, contrast=1.0, saturation=1.0,
                hue=0.0, order=0, grayscale=False, blur=False, sigma=0.5)
    base.update(kw)
    return AugParams(**base)


def test_parameter_statistics_match_the_spec():
    gen = torch.Generator().manual_seed(0)
    draws = [draw_params(gen, 224) for _ in range(3000)]
    area = np.array([p.crop_w * p.crop_h / 224**2 for p in draws])
    ratio = np.array([p.crop_w / p.crop_h for p in draws])
    # U(0.5, 1) areas, less often near 1 where a non-square box does not fit and is drawn again
    assert area.min() > 0.49 and area.max() <= 1.0 and 0.65 < area.mean() < 0.75
    assert (area > 0.9).mean() > 0.03
    assert ratio.min() > 0.74 and ratio.max() < 1.36
    for attr, rate in (("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
        observed = np.mean([getattr(p, attr) for p in draws])
        assert abs(observed - rate) < 4 * math.sqrt(rate * (1 - rate) / len(draws)), attr
    for attr, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.6, 1.4), ("hue", -0.2, 0.2),
                         ("sigma", 0.1, 1.0)):
        v = np.array([getattr(p, attr) for p in draws])
        assert v.min() >= lo and v.max() <= hi and v.max() - v.min() > 0.9 * (hi - lo), attr
    assert all(p.crop_x + p.crop_w <= 224 and p.crop_y + p.crop_h <= 224 for p in draws)


def test_same_seed_same_draws():
    a = [draw_params(torch.Generator().manual_seed(5), 224) for _ in range(2)]
    assert a[0] == a[1]


def test_one_draw_is_shared_by_the_whole_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 96, 96, generator=gen)
    for _ in range(10):
        p = draw_params(gen, 96)
        batch = augment(x, p, 64)
        singles = torch.cat([augment(x[i:i + 1], p, 64) for i in range(len(x))])
        torch.testing.assert_close(batch, singles)
        same = augment(x[:1].expand(4, -1, -1, -1), p, 64)
        assert torch.equal(same[0], same[3])
        assert batch.shape == (6, 3, 64, 64) and batch.min() >= 0 and batch.max() <= 1


def test_individual_operations():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 64, 64, generator=gen) * 0.5
    torch.testing.assert_close(augment(x, _params(), 64), x)  # identity crop, nothing else
    torch.testing.assert_close(augment(x, _params(jitter=True, brightness=1.3, order=0), 64), (x * 1.3).clamp(0, 1))
    g = augment(x, _params(grayscale=True), 64)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    blurred = augment(x, _params(blur=True, sigma=1.0), 64)
    assert blurred.var() < 0.5 * x.var()
    flat = augment(x, _params(jitter=True, contrast=0.6, order=1), 64)
    assert flat.std() < x.std()
    crop = augment(x, _params(crop_x=8, crop_y=16, crop_w=32, crop_h=32), 32)
    torch.testing.assert_close(crop, x[:, :, 16:48, 8:40])


@pytest.mark.parametrize("hue", [0.0, 0.1, -0.2])
def test_hsv_round_trip_and_hue_shift(hue):
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5, rtol=1e-5)
    shifted = augment(x, _params(jitter=True, hue=hue, order=3 * 6 + 0), 16)  # hue first in this order
    hsv_in, hsv_out = _rgb_to_hsv(x), _rgb_to_hsv(shifted)
    sat = hsv_in[:, 1] > 0.2
    dh = ((hsv_out[:, 0] - hsv_in[:, 0] - hue + 0.5) % 1.0) - 0.5
    assert dh[sat].abs().max() < 1e-4


def test_hsv_conversions_match_colorsys():
    """Both directions against Python's colorsys on random pixels (all six hue sectors, grey pixels)."""
    import colorsys

    x = torch.rand(1, 3, 40, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x[0, :, 0, :10] = x[0, 0:1, 0, :10]  # grey: r = g = b
    hsv = _rgb_to_hsv(x)
    pixels = x[0].reshape(3, -1).T.tolist()
    ref_hsv = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels], dtype=torch.float64)
    torch.testing.assert_close(hsv[0].reshape(3, -1).T, ref_hsv, atol=1e-9, rtol=0)
    ref_rgb = torch.tensor([colorsys.hsv_to_rgb(*p) for p in ref_hsv.tolist()], dtype=torch.float64)
    torch.testing.assert_close(_hsv_to_rgb(hsv)[0].reshape(3, -1).T, ref_rgb, atol=1e-9, rtol=0)
