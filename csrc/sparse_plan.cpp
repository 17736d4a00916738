// One training step's sparse plan for the sparse ResNet18-layer4, on the host, in one call: the output
// sites of the stride-2 3x3 convolution, its tile-level (tile, output, tap, count) pairs and the
// submanifold 3x3 (src, dst, tap) pairs among the output sites, each laid out by tap group with a CSR
// by output, optionally padded to static "bucket" shapes (CUDA graphs). Same semantics as
// aggregators/rulebook.py (the definition; tests/test_sparse_plan.py compares the two).
//
// No searches in the inner loops: for a fixed tap every list is already sorted by key, so output sites
// come from a 9-way merge of the per-tap lists and submanifold neighbours from one walk per row shift.
// All sizes are known before the numpy outputs exist, so those are allocated once (with the GIL) and
// filled in place (without it); the scratch is kept small (the host pays per page touched).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "array_checks.hpp"

namespace gigassl {

namespace {

using i64 = std::int64_t;
using Vec = std::vector<i64>;
constexpr int kTaps = 9;

std::size_t z(i64 i) { return static_cast<std::size_t>(i); }

// SparseConvNet's size rule on max cell + 1: at least 5, odd, with an odd half.
i64 scn_size(i64 s) {
  s = std::max<i64>(s, 5);
  if (s % 2 == 0) s += 1;
  if ((s / 2) % 2 == 0) s += 2;
  return s;
}

// Output extent of a 3x3 stride-2 convolution without padding: floor((s - 3) / 2) + 1, never negative.
i64 strided_extent(i64 s) { return s >= 3 ? (s - 3) / 2 + 1 : 0; }

// Smallest m * 2^e >= n with m in {4, 5, 6, 7}, e >= 0, then rounded up to a multiple of granule (>= granule).
i64 bucket(i64 n, i64 granule) {
  i64 q = 4;
  if (n > 4) {
    int e = 0;
    while ((i64{8} << e) < n) ++e;  // 4 * 2^e < n <= 8 * 2^e
    q = ((n + (i64{1} << e) - 1) >> e) << e;
  }
  q = (q + granule - 1) / granule * granule;
  return std::max(q, granule);
}

i64 pow2_ceil(i64 n) {
  i64 p = 1;
  while (p < n) p <<= 1;
  return p;
}

// One layer's layout, known before its entries are written: real entries of tap t are
// [bounds[t], bounds[t] + len[t]), padding fills the rest of the group and [bounds[9], total).
// ptr[o + 1] first collects the number of pairs of output o, plan() turns it into the CSR offsets.
struct Layout {
  std::array<i64, kTaps> len{};
  Vec bounds, ptr;
  i64 total = 0, n_real = 0, max = 1, n_out = 0;

  void start(i64 n_out_, i64 n_out_pad) {
    n_out = n_out_;
    ptr.assign(z(n_out_pad + 1), 0);
  }

  void plan(bool pad, i64 granule) {
    bounds.assign(kTaps + 1, 0);
    for (int t = 0; t < kTaps; ++t) {
      const i64 l = pad ? (len[z(t)] + granule - 1) / granule * granule : len[z(t)];
      bounds[z(t + 1)] = bounds[z(t)] + l;
      n_real += len[z(t)];
    }
    total = pad ? bucket(bounds[kTaps], granule) : bounds[kTaps];
    i64 mx = 1;
    for (i64 o = 0; o < n_out; ++o) {
      mx = std::max(mx, ptr[z(o + 1)]);
      ptr[z(o + 1)] += ptr[z(o)];
    }
    std::fill(ptr.begin() + n_out + 1, ptr.end(), n_real);
    max = pad ? pow2_ceil(mx) : mx;
  }

  // Zeros in the padding entries of a column.
  void zero_padding(i64* col) const {
    for (int t = 0; t < kTaps; ++t) std::fill(col + bounds[z(t)] + len[z(t)], col + bounds[z(t + 1)], i64{0});
    std::fill(col + bounds[kTaps], col + total, i64{0});
  }

  // perm/seg (CSR by output: a stable counting sort of the real entries by dst, then the padding entries
  // in increasing order) and block_tap (pad only).
  void finish(const i64* dst, i64* perm, i64* seg, i64* block_tap, i64 granule) const {
    Vec next(ptr.begin(), ptr.begin() + n_out);
    i64 tail = n_real;
    for (int t = 0; t < kTaps; ++t) {
      const i64 b = bounds[z(t)], e = b + len[z(t)];
      for (i64 i = b; i < e; ++i) {
        const i64 d = dst[i];
        const i64 pos = next[z(d)]++;
        perm[pos] = i;
        seg[pos] = d;
      }
      for (i64 i = e; i < bounds[z(t + 1)]; ++i) perm[tail++] = i;
    }
    for (i64 i = bounds[kTaps]; i < total; ++i) perm[tail++] = i;
    std::fill(seg + n_real, seg + total, i64{0});
    if (block_tap != nullptr) {
      std::fill(block_tap, block_tap + total / granule, i64{0});
      for (int t = 0; t < kTaps; ++t) {
        std::fill(block_tap + bounds[z(t)] / granule, block_tap + bounds[z(t + 1)] / granule, i64{t});
      }
    }
  }
};

// Submanifold pairs among the sorted output keys (followed by three sentinels = int64 max): f(tap, dst,
// src, ok) for every output and tap, in order of dst within each tap. For a fixed row shift d0 the key
// of (u0 + d0, u1) grows with the output, so one walk per d0 finds j, the first key >= that key - 1
// (for d0 = 0 it is the output itself or its predecessor); the neighbours at u1 - 1, u1, u1 + 1 of that
// row, if active, are among key[j], key[j + 1], key[j + 2] (sorted, unique). Branch-free but the walk.
template <class F>
void for_each_neighbour(const i64* key, const i64* out_u0, const i64* out_u1, i64 n_out, i64 o0, i64 o1, F&& f) {
  for (i64 d0 = -1; d0 <= 1; ++d0) {
    const int tap = static_cast<int>(3 * (d0 + 1));
    i64 j = 0;
    for (i64 o = 0; o < n_out; ++o) {
      const i64 u0 = out_u0[o] + d0, u1 = out_u1[o];
      const i64 t = key[o] + d0 * o1;
      if (d0 == 0) {
        j = o - (o > 0 && key[o - 1] == t - 1);
      } else {
        while (key[j] < t - 1) ++j;
      }
      const i64 k0 = key[j], k1 = key[j + 1], k2 = key[j + 2];
      const bool row_ok = u0 >= 0 && u0 < o0;
      const bool l = k0 == t - 1;
      const bool m = (k0 == t) | (k1 == t);
      const bool r = (k0 == t + 1) | (k1 == t + 1) | (k2 == t + 1);
      f(tap, o, j, row_ok && l && u1 > 0);
      f(tap + 1, o, j + l, row_ok && m);
      f(tap + 2, o, j + l + m, row_ok && r && u1 + 1 < o1);
    }
  }
}

py::array_t<i64> to_array(const Vec& v) {
  py::array_t<i64> out(static_cast<std::ptrdiff_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

py::array_t<i64> empty(i64 n) { return py::array_t<i64>(static_cast<std::ptrdiff_t>(n)); }

py::dict sparse_plan(const CArray<i64>& cells, bool per_view, const std::optional<CArray<i64>>& size_arg, bool pad,
                     i64 granule) {
  if (cells.ndim() != 3 || cells.shape(2) != 2 || cells.shape(0) < 1 || cells.shape(1) < 1) {
    throw py::value_error("sparse_plan: cells must be a non-empty int64 (B, k, 2) array");
  }
  if (granule < 1 || (granule & (granule - 1)) != 0) {
    throw py::value_error("sparse_plan: granule must be a positive power of two, got " + std::to_string(granule));
  }
  const i64 nb = cells.shape(0), k = cells.shape(1), n_tiles = nb * k;
  if (n_tiles > (i64{1} << 28)) throw py::value_error("sparse_plan: more than 2^28 tiles");
  const i64* c = cells.data();
  std::array<i64, 2> mx{0, 0};
  for (i64 i = 0; i < 2 * n_tiles; ++i) {
    if (c[i] < 0) throw py::value_error("sparse_plan: cells must be non-negative, got " + std::to_string(c[i]));
    mx[z(i % 2)] = std::max(mx[z(i % 2)], c[i]);
  }
  std::array<i64, 2> size{};
  if (size_arg) {
    const CArray<i64>& s = *size_arg;
    if (s.ndim() != 1 || s.shape(0) != 2) throw py::value_error("sparse_plan: size must be an int64 (2,) array");
    for (int a = 0; a < 2; ++a) {
      size[z(a)] = s.data()[a];
      if (size[z(a)] < mx[z(a)] + 1) {
        throw py::value_error("sparse_plan: size[" + std::to_string(a) + "] = " + std::to_string(size[z(a)]) +
                              " is smaller than max cell + 1 = " + std::to_string(mx[z(a)] + 1));
      }
    }
  } else {
    for (int a = 0; a < 2; ++a) size[z(a)] = scn_size(mx[z(a)] + 1);
  }
  constexpr i64 kMax = std::numeric_limits<i64>::max();
  if (size[0] > kMax / 4 / size[1] || nb > kMax / 4 / (size[0] * size[1])) {
    throw py::value_error("sparse_plan: B * size[0] * size[1] overflows int64");
  }

  const i64 s0 = size[0], s1 = size[1];
  const i64 o0 = strided_extent(s0), o1 = strided_extent(s1);
  Vec in_keys, site_count, site_tile, in_vptr(z(nb + 1), 0), tile_site(z(n_tiles));
  Vec out_keys, out_u0, out_u1, view_ptr(z(nb + 1), 0);
  std::vector<std::int32_t> site_dst;  // (input site, tap) -> output site, -1: none
  Layout first, sub;
  i64 n_out = 0, n_out_pad = 0;
  {
    py::gil_scoped_release release;
    // Input sites: sort the tiles of each view by key (views are key-major, so this sorts the batch).
    in_keys.reserve(z(n_tiles));
    site_count.reserve(z(n_tiles));
    site_tile.reserve(z(n_tiles));
    {
      std::vector<std::pair<i64, i64>> kt(z(n_tiles));
      for (i64 v = 0, t = 0; v < nb; ++v) {
        for (i64 j = 0; j < k; ++j, ++t) kt[z(t)] = {(v * s0 + c[2 * t]) * s1 + c[2 * t + 1], t};
        std::sort(kt.begin() + v * k, kt.begin() + (v + 1) * k);
        for (i64 j = v * k; j < (v + 1) * k; ++j) {
          const auto [key, tile] = kt[z(j)];
          if (in_keys.empty() || in_keys.back() != key) {
            in_keys.push_back(key);
            site_count.push_back(0);
            site_tile.push_back(tile);
          }
          ++site_count.back();
          tile_site[z(tile)] = static_cast<i64>(in_keys.size()) - 1;
        }
        in_vptr[z(v + 1)] = static_cast<i64>(in_keys.size());
      }
    }
    const i64 n_in = static_cast<i64>(in_keys.size());

    // Strided pairs: f(input site, tap, output key). Outputs are clipped to the batch's output grid, or
    // with per_view to the view's own (as if it ran alone, never past the batch's grid).
    auto for_each_strided = [&](auto&& f) {
      for (i64 v = 0; v < nb; ++v) {
        i64 l0 = o0, l1 = o1;
        if (per_view) {
          i64 m0 = 0, m1 = 0;
          for (i64 j = v * k; j < (v + 1) * k; ++j) {
            m0 = std::max(m0, c[2 * j]);
            m1 = std::max(m1, c[2 * j + 1]);
          }
          l0 = std::min(o0, strided_extent(scn_size(m0 + 1)));
          l1 = std::min(o1, strided_extent(scn_size(m1 + 1)));
        }
        for (i64 s = in_vptr[z(v)]; s < in_vptr[z(v + 1)]; ++s) {
          const i64 g0 = c[2 * site_tile[z(s)]], g1 = c[2 * site_tile[z(s)] + 1];
          for (i64 d0 = g0 & 1; d0 < 3; d0 += 2) {
            if (g0 < d0 || (g0 - d0) / 2 >= l0) continue;
            for (i64 d1 = g1 & 1; d1 < 3; d1 += 2) {
              if (g1 < d1 || (g1 - d1) / 2 >= l1) continue;
              f(s, static_cast<int>(3 * d0 + d1), (v * o0 + (g0 - d0) / 2) * o1 + (g1 - d1) / 2);
            }
          }
        }
      }
    };
    // Bucketed by tap: for a fixed tap the map input site -> output site is strictly increasing in the
    // key, so each tap's output keys [toff[t], toff[t + 1]) come out sorted.
    std::array<i64, kTaps + 1> toff{};
    for_each_strided([&](i64, int tap, i64) { ++toff[z(tap + 1)]; });
    for (int t = 0; t < kTaps; ++t) toff[z(t + 1)] += toff[z(t)];
    Vec tk(z(toff[kTaps])), ts(z(toff[kTaps]));
    {
      std::array<i64, kTaps> pos{};
      std::copy(toff.begin(), toff.end() - 1, pos.begin());
      for_each_strided([&](i64 s, int tap, i64 key) {
        const i64 q = pos[z(tap)]++;
        tk[z(q)] = key;
        ts[z(q)] = s;
      });
    }
    // Output sites: a 9-way merge of the sorted per-tap lists, which also gives every (site, tap) its dst.
    site_dst.assign(z(n_in * kTaps), -1);
    out_keys.reserve(tk.size() + 3);
    {
      std::array<i64, kTaps> h{};
      std::copy(toff.begin(), toff.end() - 1, h.begin());
      for (;;) {
        i64 m = kMax;
        for (int t = 0; t < kTaps; ++t) {
          if (h[z(t)] < toff[z(t + 1)]) m = std::min(m, tk[z(h[z(t)])]);
        }
        if (m == kMax) break;
        const auto o = static_cast<std::int32_t>(out_keys.size());
        out_keys.push_back(m);
        for (int t = 0; t < kTaps; ++t) {
          if (h[z(t)] < toff[z(t + 1)] && tk[z(h[z(t)])] == m) site_dst[z(ts[z(h[z(t)]++)] * kTaps + t)] = o;
        }
      }
    }
    n_out = static_cast<i64>(out_keys.size());
    n_out_pad = pad ? bucket(n_out + 1, granule) : n_out;

    // Output sites' coordinates and views.
    out_u0.resize(z(n_out));
    out_u1.resize(z(n_out));
    for (i64 o = 0; o < n_out; ++o) {
      const i64 key = out_keys[z(o)], r = key / o1;
      out_u1[z(o)] = key - r * o1;
      out_u0[z(o)] = r % o0;
      ++view_ptr[z(r / o0 + 1)];
    }
    for (i64 v = 0; v < nb; ++v) view_ptr[z(v + 1)] += view_ptr[z(v)];

    // Sizes and per-output counts of both layers.
    first.start(n_out, n_out_pad);
    for (int t = 0; t < kTaps; ++t) {
      for (i64 p = toff[z(t)]; p < toff[z(t + 1)]; ++p) {
        const i64 s = ts[z(p)], n = site_count[z(s)];
        first.len[z(t)] += n;
        first.ptr[z(site_dst[z(s * kTaps + t)] + 1)] += n;
      }
    }
    first.plan(pad, granule);
    out_keys.insert(out_keys.end(), 3, kMax);  // sentinels for the neighbour walks
    sub.start(n_out, n_out_pad);
    for_each_neighbour(out_keys.data(), out_u0.data(), out_u1.data(), n_out, o0, o1, [&](int tap, i64 o, i64, bool ok) {
      sub.len[z(tap)] += ok;
      sub.ptr[z(o + 1)] += ok;
    });
    sub.plan(pad, granule);
  }

  // Outputs, allocated once the sizes are known, filled without the GIL.
  py::array_t<i64> f_tile = empty(first.total), f_dst = empty(first.total), f_cnt = empty(first.total);
  py::array_t<i64> f_perm = empty(first.total), f_seg = empty(first.total);
  py::array_t<i64> f_block = empty(pad ? first.total / granule : 0);
  py::array_t<i64> s_src = empty(sub.total), s_dst = empty(sub.total);
  py::array_t<i64> s_perm = empty(sub.total), s_seg = empty(sub.total);
  py::array_t<i64> s_block = empty(pad ? sub.total / granule : 0);
  py::array_t<i64> sites({static_cast<std::ptrdiff_t>(n_out), static_cast<std::ptrdiff_t>(3)});
  i64 *ft = f_tile.mutable_data(), *fd = f_dst.mutable_data(), *fc = f_cnt.mutable_data();
  i64 *fp = f_perm.mutable_data(), *fs = f_seg.mutable_data(), *fb = pad ? f_block.mutable_data() : nullptr;
  i64 *ss = s_src.mutable_data(), *sd = s_dst.mutable_data(), *sp = s_perm.mutable_data(), *sg = s_seg.mutable_data();
  i64 *sb = pad ? s_block.mutable_data() : nullptr, *st = sites.mutable_data();
  {
    py::gil_scoped_release release;
    for (int t = 0; t < kTaps; ++t) {  // by tap, then tile (one output per site and tap)
      // Branch-free: every tile writes at pos, only real pairs advance it; stop at the group's end.
      i64 pos = first.bounds[z(t)];
      const i64 end = pos + first.len[z(t)];
      for (i64 tile = 0; tile < n_tiles && pos < end; ++tile) {
        const i64 s = tile_site[z(tile)];
        const i64 d = site_dst[z(s * kTaps + t)];
        ft[pos] = tile;
        fd[pos] = d;
        fc[pos] = site_count[z(s)];
        pos += d >= 0;
      }
    }
    for (i64* col : {ft, fd, fc}) first.zero_padding(col);
    first.finish(fd, fp, fs, fb, granule);

    std::array<i64, kTaps> pos{};
    std::copy(sub.bounds.begin(), sub.bounds.end() - 1, pos.begin());
    i64 sink[2];
    for_each_neighbour(out_keys.data(), out_u0.data(), out_u1.data(), n_out, o0, o1, [&](int tap, i64 o, i64 src, bool ok) {
      i64* a = ok ? ss + pos[z(tap)] : sink;  // a real pair lands at its tap's position, the rest in the sink
      i64* b = ok ? sd + pos[z(tap)] : sink + 1;
      *a = src;
      *b = o;
      pos[z(tap)] += ok;
    });
    for (i64* col : {ss, sd}) sub.zero_padding(col);
    sub.finish(sd, sp, sg, sb, granule);

    for (i64 v = 0; v < nb; ++v) {
      for (i64 o = view_ptr[z(v)]; o < view_ptr[z(v + 1)]; ++o) {
        st[3 * o] = v;
        st[3 * o + 1] = out_u0[z(o)];
        st[3 * o + 2] = out_u1[z(o)];
      }
    }
  }

  py::dict d;
  py::array_t<i64> sz(2);
  sz.mutable_data()[0] = s0;
  sz.mutable_data()[1] = s1;
  d["size"] = sz;
  d["n_tiles"] = n_tiles;
  d["n_in_sites"] = static_cast<i64>(in_keys.size());
  d["n_sites"] = n_out;
  d["n_sites_pad"] = n_out_pad;
  d["out_sites"] = sites;
  d["first_tile"] = f_tile;
  d["first_dst"] = f_dst;
  d["first_count"] = f_cnt;
  d["first_tap_bounds"] = to_array(first.bounds);
  d["first_block_tap"] = f_block;
  d["first_perm"] = f_perm;
  d["first_ptr"] = to_array(first.ptr);
  d["first_seg"] = f_seg;
  d["first_max"] = first.max;
  d["sub_src"] = s_src;
  d["sub_dst"] = s_dst;
  d["sub_tap_bounds"] = to_array(sub.bounds);
  d["sub_block_tap"] = s_block;
  d["sub_perm"] = s_perm;
  d["sub_ptr"] = to_array(sub.ptr);
  d["sub_seg"] = s_seg;
  d["sub_max"] = sub.max;
  d["view_ptr"] = to_array(view_ptr);
  return d;
}

}  // namespace

void init_sparse_plan(py::module_& m) {
  m.def("sparse_plan", &sparse_plan, py::arg("cells"), py::arg("per_view") = false, py::arg("size") = py::none(),
        py::arg("pad") = false, py::arg("granule") = 64,
        "One training step's sparse plan of the sparse ResNet18-layer4 for grid cells int64 (B, k, 2).\n"
        "size (2,) overrides the batch's spatial size; per_view clips the stride-2 outputs to each view's own\n"
        "size. Returns a dict: size, n_tiles, n_in_sites, n_sites (N1), n_sites_pad (N1p), out_sites (N1, 3),\n"
        "view_ptr (B+1,); the stride-2 layer at tile level first_tile/first_dst/first_count, and the\n"
        "submanifold layer sub_src/sub_dst, each sorted by tap then tile/dst, with *_tap_bounds (10,),\n"
        "*_block_tap (one tap per granule block; empty unless pad), a CSR by output *_perm/*_ptr (N1p+1,)/*_seg\n"
        "and *_max (largest pairs per output). pad: every tap group rounded up to a multiple of granule and\n"
        "the totals (and N1p = bucket(N1 + 1)) to m * 2^e, m in 4..7, a multiple of granule; padding entries\n"
        "are zeros (count 0) outside every CSR row.");
}

}  // namespace gigassl
