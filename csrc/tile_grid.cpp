// Tile grid over a tissue mask: level-0 top-left corners of the tiles whose tissue fraction, read
// from an integral image of the mask (four reads per tile), exceeds a threshold.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "array_checks.hpp"

namespace gigassl {

namespace {

struct Kept {
  std::int64_t x, y;
  float fraction;
};

py::tuple tile_grid(const CArray<std::uint8_t>& mask, std::int64_t width0, std::int64_t height0, std::int64_t tile0,
                    std::int64_t step0, double min_tissue) {
  require_2d(mask, "mask");
  if (width0 < 1 || height0 < 1) throw py::value_error("level-0 width and height must be >= 1");
  if (tile0 < 1) throw py::value_error("tile size at level 0 must be >= 1");
  if (step0 < 1) throw py::value_error("grid step at level 0 must be >= 1 (overlap smaller than the tile)");
  const std::ptrdiff_t h = mask.shape(0), w = mask.shape(1);
  const std::uint8_t* m = mask.data();
  std::vector<Kept> kept;
  {
    py::gil_scoped_release release;
    const double sx = static_cast<double>(w) / static_cast<double>(width0);
    const double sy = static_cast<double>(h) / static_cast<double>(height0);
    const std::int64_t nx = width0 >= tile0 ? (width0 - tile0) / step0 + 1 : 0;
    const std::int64_t ny = height0 >= tile0 ? (height0 - tile0) / step0 + 1 : 0;
    // The mask footprint of a tile: every mask pixel the tile touches, at least one.
    const auto span = [](std::int64_t a0, std::int64_t len, double s, std::ptrdiff_t n) {
      auto lo = static_cast<std::ptrdiff_t>(std::floor(static_cast<double>(a0) * s));
      auto hi = static_cast<std::ptrdiff_t>(std::ceil(static_cast<double>(a0 + len) * s));
      lo = std::min<std::ptrdiff_t>(std::max<std::ptrdiff_t>(lo, 0), n - 1);
      hi = std::min<std::ptrdiff_t>(std::max<std::ptrdiff_t>(hi, lo + 1), n);
      return std::pair<std::ptrdiff_t, std::ptrdiff_t>(lo, hi);
    };
    std::vector<std::pair<std::ptrdiff_t, std::ptrdiff_t>> row_span(static_cast<std::size_t>(ny)),
        col_span(static_cast<std::size_t>(nx));
    for (std::int64_t j = 0; j < ny; ++j) row_span[j] = span(j * step0, tile0, sy, h);
    for (std::int64_t i = 0; i < nx; ++i) col_span[i] = span(i * step0, tile0, sx, w);

    // The integral image is only ever read at the footprints' first and last rows, so only those rows
    // of it are built: a sweep down the columns snapshots the column sums at each needed row, and a
    // prefix over each snapshot gives sums over [0, row) x [0, c) for every c. Each tile then costs
    // four reads, and memory stays at (needed rows) x (w + 1) instead of the whole (h + 1) x (w + 1).
    std::vector<std::ptrdiff_t> rows;
    for (const auto& rs : row_span) {
      rows.push_back(rs.first);
      rows.push_back(rs.second);
    }
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    std::vector<std::int32_t> slot(static_cast<std::size_t>(h + 1), -1);
    for (std::size_t k = 0; k < rows.size(); ++k) slot[static_cast<std::size_t>(rows[k])] = static_cast<std::int32_t>(k);
    const std::ptrdiff_t stride = w + 1;
    std::vector<std::int64_t> integral(rows.size() * static_cast<std::size_t>(stride), 0);
    constexpr std::ptrdiff_t kStrip = 512;
#pragma omp parallel for schedule(dynamic, 1)
    for (std::ptrdiff_t c0 = 0; c0 < w; c0 += kStrip) {
      const std::ptrdiff_t c1 = std::min(w, c0 + kStrip);
      std::vector<std::int64_t> colsum(static_cast<std::size_t>(c1 - c0), 0);
      std::size_t k = 0;
      for (std::ptrdiff_t r = 0; k < rows.size(); ++r) {
        if (r == rows[k]) {
          std::copy(colsum.begin(), colsum.end(), integral.begin() + static_cast<std::ptrdiff_t>(k) * stride + 1 + c0);
          ++k;
        }
        if (r >= h) break;
        const std::uint8_t* row = m + r * w;
        for (std::ptrdiff_t c = c0; c < c1; ++c) colsum[static_cast<std::size_t>(c - c0)] += row[c] != 0;
      }
    }
#pragma omp parallel for schedule(static)
    for (std::ptrdiff_t k = 0; k < static_cast<std::ptrdiff_t>(rows.size()); ++k) {
      std::int64_t* p = integral.data() + k * stride;
      for (std::ptrdiff_t c = 1; c <= w; ++c) p[c] += p[c - 1];
    }
    std::vector<std::vector<Kept>> found(static_cast<std::size_t>(ny));
#pragma omp parallel for schedule(static)
    for (std::int64_t j = 0; j < ny; ++j) {
      const auto [r0, r1] = row_span[j];
      const std::int64_t* top = integral.data() + static_cast<std::ptrdiff_t>(slot[r0]) * stride;
      const std::int64_t* bottom = integral.data() + static_cast<std::ptrdiff_t>(slot[r1]) * stride;
      for (std::int64_t i = 0; i < nx; ++i) {
        const auto [c0, c1] = col_span[i];
        const std::int64_t sum = bottom[c1] - top[c1] - bottom[c0] + top[c0];
        const double f = static_cast<double>(sum) / static_cast<double>((r1 - r0) * (c1 - c0));
        if (f > min_tissue) found[static_cast<std::size_t>(j)].push_back({i * step0, j * step0, static_cast<float>(f)});
      }
    }
    for (auto& r : found) kept.insert(kept.end(), r.begin(), r.end());
  }
  const auto n = static_cast<std::ptrdiff_t>(kept.size());
  py::array_t<std::int64_t> coords({n, static_cast<std::ptrdiff_t>(2)});
  py::array_t<float> fractions(n);
  auto* cp = coords.mutable_data();
  auto* fp = fractions.mutable_data();
  for (std::ptrdiff_t k = 0; k < n; ++k) {
    cp[2 * k] = kept[k].x;
    cp[2 * k + 1] = kept[k].y;
    fp[k] = kept[k].fraction;
  }
  return py::make_tuple(coords, fractions);
}

}  // namespace

void init_tile_grid(py::module_& m) {
  m.def("tile_grid", &tile_grid, py::arg("mask"), py::arg("width0"), py::arg("height0"), py::arg("tile0"),
        py::arg("step0"), py::arg("min_tissue"),
        "Grid tiles of tile0 level-0 pixels every step0 pixels that lie wholly inside the slide and whose\n"
        "tissue fraction on `mask` (uint8 (h, w) covering the whole slide) is > min_tissue.\n\n"
        "Returns (coords int64 (N, 2) level-0 top-left (x, y) in row-major order, fractions float32 (N,)).");
}

}  // namespace gigassl
