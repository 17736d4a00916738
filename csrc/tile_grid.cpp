// Tile grid over a tissue mask: level-0 top-left corners of the tiles whose tissue fraction, read
// from an integral image of the mask, exceeds a threshold (O(1) per tile).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
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
    // Integral image with a zero first row and column: sum over [r0, r1) x [c0, c1) in four reads.
    std::vector<std::int64_t> sat(static_cast<std::size_t>((h + 1) * (w + 1)), 0);
    for (std::ptrdiff_t r = 0; r < h; ++r) {
      std::int64_t row = 0;
      for (std::ptrdiff_t c = 0; c < w; ++c) {
        row += m[r * w + c] != 0;
        sat[(r + 1) * (w + 1) + c + 1] = sat[r * (w + 1) + c + 1] + row;
      }
    }
    const double sx = static_cast<double>(w) / static_cast<double>(width0);
    const double sy = static_cast<double>(h) / static_cast<double>(height0);
    const std::int64_t nx = width0 >= tile0 ? (width0 - tile0) / step0 + 1 : 0;
    const std::int64_t ny = height0 >= tile0 ? (height0 - tile0) / step0 + 1 : 0;
    // The mask footprint of a tile: every mask pixel the tile touches, at least one.
    const auto span = [](std::int64_t a0, std::int64_t len, double s, std::ptrdiff_t n, std::ptrdiff_t& lo,
                         std::ptrdiff_t& hi) {
      lo = static_cast<std::ptrdiff_t>(std::floor(static_cast<double>(a0) * s));
      hi = static_cast<std::ptrdiff_t>(std::ceil(static_cast<double>(a0 + len) * s));
      lo = std::min<std::ptrdiff_t>(std::max<std::ptrdiff_t>(lo, 0), n - 1);
      hi = std::min<std::ptrdiff_t>(std::max<std::ptrdiff_t>(hi, lo + 1), n);
    };
    std::vector<std::vector<Kept>> rows(static_cast<std::size_t>(ny));
#pragma omp parallel for schedule(static)
    for (std::int64_t j = 0; j < ny; ++j) {
      const std::int64_t y = j * step0;
      std::ptrdiff_t r0, r1;
      span(y, tile0, sy, h, r0, r1);
      for (std::int64_t i = 0; i < nx; ++i) {
        const std::int64_t x = i * step0;
        std::ptrdiff_t c0, c1;
        span(x, tile0, sx, w, c0, c1);
        const std::int64_t s = sat[r1 * (w + 1) + c1] - sat[r0 * (w + 1) + c1] - sat[r1 * (w + 1) + c0] +
                               sat[r0 * (w + 1) + c0];
        const double f = static_cast<double>(s) / static_cast<double>((r1 - r0) * (c1 - c0));
        if (f > min_tissue) rows[static_cast<std::size_t>(j)].push_back({x, y, static_cast<float>(f)});
      }
    }
    for (auto& r : rows) kept.insert(kept.end(), r.begin(), r.end());
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
