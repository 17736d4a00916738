// Sparse rulebooks of the sparse ResNet18-layer4 on the CPU (SparseConvNet semantics; the torch version
// in aggregators/rulebook.py is the GPU path and the definition): active sites, the stride-2 3x3
// convolution's (input, output, tap) pairs, and the submanifold 3x3 pairs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "array_checks.hpp"

namespace gigassl {

namespace {

using i64 = std::int64_t;

struct Sites {
  std::vector<i64> keys;  // sorted, unique: (view * s0 + a0) * s1 + a1
  i64 s0, s1;
  i64 key(i64 v, i64 a0, i64 a1) const { return (v * s0 + a0) * s1 + a1; }
  i64 find(i64 k) const {
    auto it = std::lower_bound(keys.begin(), keys.end(), k);
    return (it != keys.end() && *it == k) ? static_cast<i64>(it - keys.begin()) : -1;
  }
};

py::array_t<i64> sites_array(const Sites& s) {
  const auto n = static_cast<std::ptrdiff_t>(s.keys.size());
  py::array_t<i64> out({n, static_cast<std::ptrdiff_t>(3)});
  i64* p = out.mutable_data();
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    const i64 k = s.keys[i];
    p[3 * i + 2] = k % s.s1;
    p[3 * i + 1] = (k / s.s1) % s.s0;
    p[3 * i] = (k / s.s1) / s.s0;
  }
  return out;
}

py::array_t<i64> to_array(const std::vector<i64>& v) {
  py::array_t<i64> out(static_cast<std::ptrdiff_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

void unique_sorted(std::vector<i64>& v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
}

py::dict sparse_rules(const CArray<i64>& cells) {
  if (cells.ndim() != 3 || cells.shape(2) != 2) throw py::value_error("cells must be an int64 (B, k, 2) array");
  const i64 b = cells.shape(0), k = cells.shape(1);
  const i64* c = cells.data();
  std::array<i64, 2> size{5, 5};
  Sites in, out;
  std::vector<i64> tile_site(static_cast<std::size_t>(b * k));
  std::vector<i64> s_src, s_dst, s_tap, m_src, m_dst, m_tap;
  {
    py::gil_scoped_release release;
    std::array<i64, 2> mx{0, 0};
    for (i64 i = 0; i < b * k; ++i) {
      mx[0] = std::max(mx[0], c[2 * i]);
      mx[1] = std::max(mx[1], c[2 * i + 1]);
    }
    for (int a = 0; a < 2; ++a) {  // SparseConvNet's size rule: >= 5, odd, with an odd half
      i64 s = std::max<i64>(mx[a] + 1, 5);
      if (s % 2 == 0) s += 1;
      if ((s / 2) % 2 == 0) s += 2;
      size[a] = s;
    }
    in.s0 = size[0];
    in.s1 = size[1];
    for (i64 i = 0; i < b * k; ++i) in.keys.push_back(in.key(i / k, c[2 * i], c[2 * i + 1]));
    std::vector<i64> tile_keys = in.keys;
    unique_sorted(in.keys);
    for (i64 i = 0; i < b * k; ++i) tile_site[static_cast<std::size_t>(i)] = in.find(tile_keys[static_cast<std::size_t>(i)]);

    out.s0 = (size[0] - 3) / 2 + 1;
    out.s1 = (size[1] - 3) / 2 + 1;
    std::vector<i64> out_key_of_pair;
    for (i64 i = 0; i < static_cast<i64>(in.keys.size()); ++i) {
      const i64 key = in.keys[static_cast<std::size_t>(i)];
      const i64 g1 = key % in.s1, g0 = (key / in.s1) % in.s0, v = (key / in.s1) / in.s0;
      for (int d0 = 0; d0 < 3; ++d0) {
        for (int d1 = 0; d1 < 3; ++d1) {
          if ((g0 - d0) % 2 != 0 || (g1 - d1) % 2 != 0) continue;
          const i64 u0 = (g0 - d0) / 2, u1 = (g1 - d1) / 2;
          if (g0 - d0 < 0 || g1 - d1 < 0 || u0 >= out.s0 || u1 >= out.s1) continue;
          out_key_of_pair.push_back(out.key(v, u0, u1));
          s_src.push_back(i);
          s_tap.push_back(3 * d0 + d1);
        }
      }
    }
    out.keys = out_key_of_pair;
    unique_sorted(out.keys);
    for (i64 key : out_key_of_pair) s_dst.push_back(out.find(key));

    for (i64 o = 0; o < static_cast<i64>(out.keys.size()); ++o) {
      const i64 key = out.keys[static_cast<std::size_t>(o)];
      const i64 u1 = key % out.s1, u0 = (key / out.s1) % out.s0, v = (key / out.s1) / out.s0;
      for (int d0 = -1; d0 <= 1; ++d0) {
        for (int d1 = -1; d1 <= 1; ++d1) {
          const i64 n0 = u0 + d0, n1 = u1 + d1;
          if (n0 < 0 || n1 < 0 || n0 >= out.s0 || n1 >= out.s1) continue;
          const i64 nb = out.find(out.key(v, n0, n1));
          if (nb < 0) continue;
          m_src.push_back(nb);
          m_dst.push_back(o);
          m_tap.push_back(3 * (d0 + 1) + (d1 + 1));
        }
      }
    }
  }
  py::dict d;
  py::array_t<i64> sz(2);
  sz.mutable_data()[0] = size[0];
  sz.mutable_data()[1] = size[1];
  d["size"] = sz;
  d["in_sites"] = sites_array(in);
  d["in_keys"] = to_array(in.keys);
  d["tile_site"] = to_array(tile_site);
  d["out_sites"] = sites_array(out);
  d["out_keys"] = to_array(out.keys);
  d["strided"] = py::make_tuple(to_array(s_src), to_array(s_dst), to_array(s_tap));
  d["submanifold"] = py::make_tuple(to_array(m_src), to_array(m_dst), to_array(m_tap));
  return d;
}

}  // namespace

void init_sparse_rules(py::module_& m) {
  m.def("sparse_rules", &sparse_rules, py::arg("cells"),
        "Rulebooks of the sparse ResNet18-layer4 for grid cells int64 (B, k, 2): a dict with size (2,),\n"
        "in_sites (N0, 3), in_keys, tile_site (B*k,), out_sites (N1, 3), out_keys, and the (src, dst, tap)\n"
        "int64 pairs of the stride-2 ('strided') and submanifold ('submanifold') 3x3 convolutions.");
}

}  // namespace gigassl
