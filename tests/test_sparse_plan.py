"""_core.sparse_plan against the torch definition in aggregators/rulebook.py: output sites, the tile-level
stride-2 pairs, the submanifold pairs, and the layout (tap groups, CSR by output, padding to buckets)."""

from collections import Counter

import numpy as np
import pytest
import torch

from gigassl_fast import _core
from gigassl_fast.aggregators import rulebook as rb


def random_cells(seed: int, b: int, k: int, hi: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, (b, k, 2), generator=g, dtype=torch.int64).numpy()


def reference(cells: np.ndarray, per_view: bool, size: np.ndarray | None):
    """Output sites, tile-level (tile, dst, tap, count) and submanifold (src, dst, tap) from rulebook.py."""
    c = torch.from_numpy(cells)
    if per_view and size is not None:  # build_rules(per_view=True) ignores `spatial`: compose the parts
        inp, tile_site = rb.input_sites(c, torch.from_numpy(size))
        out, src, dst, tap = rb.strided_rules(inp, rb.view_spatial_size(c))
        sub = rb.submanifold_rules(out)
    else:
        r = rb.build_rules(c, spatial=None if size is None else torch.from_numpy(size), per_view=per_view)
        tile_site, out, (src, dst, tap), sub = r.tile_site, r.out, r.strided, r.submanifold
    count = torch.bincount(tile_site)
    tiles_of = {}
    for t, s in enumerate(tile_site.tolist()):
        tiles_of.setdefault(s, []).append(t)
    first = Counter()
    for s, o, tp in zip(src.tolist(), dst.tolist(), tap.tolist(), strict=True):
        for t in tiles_of[s]:
            first[(t, o, tp, int(count[s]))] += 1
    subm = Counter(zip(*(a.tolist() for a in sub), strict=True))
    return out.sites.numpy(), first, subm


def bucket(n: int, granule: int) -> int:
    best = min(m << e for m in (4, 5, 6, 7) for e in range(40) if (m << e) >= n)
    return max(granule, -(-best // granule) * granule)


def check_layout(r, prefix: str, cols: list[str], n_real_expected: int, pad: bool, granule: int) -> None:
    n1, n1p = r["n_sites"], r["n_sites_pad"]
    dst = r[f"{prefix}_dst"]
    p = len(dst)
    for c in cols:
        assert r[c].dtype == np.int64 and r[c].shape == (p,)
    b = r[f"{prefix}_tap_bounds"]
    assert b.shape == (10,) and b[0] == 0 and np.all(np.diff(b) >= 0) and b[9] <= p
    real = np.zeros(p, dtype=bool)
    tap_of = np.full(p, -1)
    for t in range(9):
        tap_of[b[t]:b[t + 1]] = t
    key_col = cols[0]
    if pad:
        assert np.all(b % granule == 0)
    ptr = r[f"{prefix}_ptr"]
    perm = r[f"{prefix}_perm"]
    seg = r[f"{prefix}_seg"]
    assert ptr.shape == (n1p + 1,) and ptr[0] == 0 and np.all(np.diff(ptr) >= 0)
    n_real = int(ptr[n1])
    assert n_real == n_real_expected
    assert np.all(ptr[n1:] == n_real)  # padding outputs own nothing
    assert sorted(perm.tolist()) == list(range(p))
    real[perm[:n_real]] = True
    for o in range(n1):
        ent = perm[ptr[o]:ptr[o + 1]]
        assert np.all(dst[ent] == o)
        assert np.all(np.diff(ent) > 0)  # (dst, index) order
    assert np.array_equal(seg[:n_real], dst[perm[:n_real]])
    assert np.all(seg[n_real:] == 0)
    assert np.all(np.diff(perm[n_real:]) > 0)  # padding in increasing order
    counts = np.diff(ptr[: n1 + 1])
    mx = max(1, int(counts.max()) if n1 else 1)
    if pad:
        mx = 1 << (mx - 1).bit_length()
    assert r[f"{prefix}_max"] == mx
    # Real entries sit in their tap's group as a prefix, sorted by (key column, dst); padding is zeros.
    assert np.all(tap_of[real] >= 0)
    for t in range(9):
        in_grp = real[b[t]:b[t + 1]]
        nr = int(in_grp.sum())
        assert np.all(in_grp[:nr]) and not np.any(in_grp[nr:])
        kc, dc = r[key_col][b[t]:b[t] + nr], dst[b[t]:b[t] + nr]
        order = np.lexsort((dc, kc)) if prefix == "first" else np.lexsort((kc, dc))
        assert np.array_equal(order, np.arange(nr))
    for c in cols:
        assert np.all(r[c][~real] == 0)
    bt = r[f"{prefix}_block_tap"]
    if pad:
        assert p == bucket(int(b[9]), granule) and p % granule == 0
        assert bt.shape == (p // granule,)
        blocks = np.repeat(bt, granule)
        assert np.array_equal(blocks[real], tap_of[real])
        assert np.array_equal(blocks[: b[9]], tap_of[: b[9]])
        assert np.all(bt[b[9] // granule:] == 0)
    else:
        assert p == n_real == b[9] and bt.shape == (0,)


CASES = [
    (0, 7, 5, 6),
    (1, 7, 5, 6),
    (2, 1, 1, 6),
    (3, 3, 50, 40),
    (4, 12, 8, 3),
]


@pytest.mark.parametrize("seed,b,k,hi", CASES)
@pytest.mark.parametrize("per_view", [False, True])
@pytest.mark.parametrize("given_size", [False, True])
@pytest.mark.parametrize("pad,granule", [(False, 64), (True, 64), (True, 4)])
def test_sparse_plan_matches_rulebook(seed, b, k, hi, per_view, given_size, pad, granule):
    cells = random_cells(seed, b, k, hi)
    if seed == 1:  # per-view sizes differ a lot: one view far wider than the rest
        cells[0] *= 3
    size = None
    if given_size:
        size = (rb.spatial_size(torch.from_numpy(cells)) + torch.tensor([2, 5])).numpy()
    r = _core.sparse_plan(cells, per_view=per_view, size=size, pad=pad, granule=granule)
    sites, first, subm = reference(cells, per_view, size)

    expect_size = rb.spatial_size(torch.from_numpy(cells)).numpy() if size is None else size
    assert np.array_equal(r["size"], expect_size)
    assert r["n_tiles"] == b * k
    assert r["n_in_sites"] == len(np.unique(cells.reshape(-1, 2) + np.repeat(np.arange(b), k)[:, None] * 10**6, axis=0))
    assert r["out_sites"].shape == (r["n_sites"], 3)
    assert np.array_equal(r["out_sites"], sites)
    n1 = r["n_sites"]
    assert r["n_sites_pad"] == (bucket(n1 + 1, granule) if pad else n1)
    if pad:
        assert r["n_sites_pad"] > n1

    real = r["first_perm"][: r["first_ptr"][n1]]
    tb = r["first_tap_bounds"]
    tap = np.searchsorted(tb, real, side="right") - 1
    got_first = Counter(zip(r["first_tile"][real].tolist(), r["first_dst"][real].tolist(), tap.tolist(),
                            r["first_count"][real].tolist(), strict=True))
    assert got_first == first
    assert np.all(r["first_count"][real] >= 1)

    real = r["sub_perm"][: r["sub_ptr"][n1]]
    sb = r["sub_tap_bounds"]
    tap = np.searchsorted(sb, real, side="right") - 1
    got_sub = Counter(zip(r["sub_src"][real].tolist(), r["sub_dst"][real].tolist(), tap.tolist(), strict=True))
    assert got_sub == subm

    check_layout(r, "first", ["first_tile", "first_dst", "first_count"], sum(first.values()), pad, granule)
    check_layout(r, "sub", ["sub_src", "sub_dst"], sum(subm.values()), pad, granule)

    vp = r["view_ptr"]
    assert vp.shape == (b + 1,) and vp[0] == 0 and vp[-1] == n1
    assert np.array_equal(np.repeat(np.arange(b), np.diff(vp)), r["out_sites"][:, 0])


def test_per_view_clips_outputs():
    # View 1 alone has spatial size 7, an output grid 3x3: per_view drops its outputs at u = 3.
    cells = np.array([[[0, 0], [12, 12]], [[0, 0], [6, 6]]], dtype=np.int64)
    full = _core.sparse_plan(cells)
    clipped = _core.sparse_plan(cells, per_view=True)
    v1 = full["out_sites"][full["out_sites"][:, 0] == 1]
    assert v1[:, 1:].max() == 3
    c1 = clipped["out_sites"][clipped["out_sites"][:, 0] == 1]
    assert c1[:, 1:].max() == 2
    assert clipped["n_sites"] < full["n_sites"]


def test_bucket_sizes():
    cells = np.zeros((1, 1, 2), dtype=np.int64)
    r = _core.sparse_plan(cells, pad=True, granule=1)
    assert r["n_sites"] == 1 and r["n_sites_pad"] == 4  # bucket(2) = 4
    assert len(r["first_tile"]) == 4 and len(r["sub_src"]) == 4
    assert r["first_tap_bounds"].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert r["first_max"] == 1 and r["sub_max"] == 1
    # 9 sites in one row of a view -> more outputs; granule 8: groups are multiples of 8
    r = _core.sparse_plan(np.stack([np.arange(30), np.zeros(30, dtype=np.int64)], 1)[None], pad=True, granule=8)
    assert r["n_sites_pad"] == bucket(r["n_sites"] + 1, 8)
    assert [bucket(n, 1) for n in (1, 4, 5, 8, 9, 11, 17, 100)] == [4, 4, 5, 8, 10, 12, 20, 112]


def test_errors():
    with pytest.raises(ValueError, match="int64 \\(B, k, 2\\)"):
        _core.sparse_plan(np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="int64 \\(B, k, 2\\)"):
        _core.sparse_plan(np.zeros((2, 3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="non-negative"):
        _core.sparse_plan(np.array([[[0, 1], [-1, 2]]], dtype=np.int64))
    with pytest.raises(ValueError, match="smaller than max cell"):
        _core.sparse_plan(np.array([[[0, 1], [7, 2]]], dtype=np.int64), size=np.array([7, 9], dtype=np.int64))
    with pytest.raises(ValueError, match="size must be"):
        _core.sparse_plan(np.zeros((1, 2, 2), dtype=np.int64), size=np.array([7, 9, 3], dtype=np.int64))
    with pytest.raises(ValueError, match="power of two"):
        _core.sparse_plan(np.zeros((1, 2, 2), dtype=np.int64), pad=True, granule=48)
    with pytest.raises(ValueError, match="power of two"):
        _core.sparse_plan(np.zeros((1, 2, 2), dtype=np.int64), granule=0)
