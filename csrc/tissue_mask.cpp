// Tissue masks on RGB thumbnails.
//
// otsu-gray reproduces the Giga-SSL reference (useful_wsi make_auto_mask with scikit-image) bit for
// bit: the grey conversion, numpy's histogram binning and scikit-image's float32 Otsu arithmetic are
// replayed in the same order, so the threshold and therefore the mask are identical.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "array_checks.hpp"
#include "morphology.hpp"

namespace gigassl {

namespace {

constexpr int kBins = 256;

// scikit-image rgb2gray: img_as_float (x * (1/255)) then a dot with (0.2125, 0.7154, 0.0721). numpy
// evaluates that dot through OpenBLAS, whose kernel computes fma(b, c2, fma(r, c0, g * c1)); checked
// equal on all 2^24 colours.
inline double reference_gray(std::uint8_t r, std::uint8_t g, std::uint8_t b) {
  constexpr double s = 1.0 / 255.0;
  return std::fma(b * s, 0.0721, std::fma(r * s, 0.2125, (g * s) * 0.7154));
}

// scikit-image threshold_otsu(values, nbins=256) for values in [lo, hi], given a callback that
// visits them. Returns NaN when there are no values.
template <typename ForEach>
double skimage_otsu(ForEach for_each, std::int64_t n, double lo, double hi) {
  if (n == 0) return std::numeric_limits<double>::quiet_NaN();
  if (lo == hi) return lo;
  // numpy.linspace(lo, hi, 257) and numpy.histogram's index arithmetic with its edge corrections.
  std::array<double, kBins + 1> edges{};
  const double step = (hi - lo) / kBins;
  for (int i = 0; i < kBins; ++i) edges[i] = static_cast<double>(i) * step + lo;
  edges[kBins] = hi;
  const double denom = hi - lo;
  std::array<std::int64_t, kBins> counts{};
  for_each([&](double v) {
    std::int64_t idx = static_cast<std::int64_t>(((v - lo) / denom) * kBins);
    if (idx == kBins) idx -= 1;
    if (v < edges[idx]) idx -= 1;
    if (idx != kBins - 1 && v >= edges[idx + 1]) idx += 1;
    counts[idx] += 1;
  });
  std::array<double, kBins> centers{};
  std::array<float, kBins> c32{}, w1{}, w2{};
  for (int i = 0; i < kBins; ++i) {
    centers[i] = (edges[i] + edges[i + 1]) / 2.0;
    c32[i] = static_cast<float>(counts[i]);  // scikit-image casts the counts to float32
  }
  float acc32 = 0.0f;
  for (int i = 0; i < kBins; ++i) w1[i] = (acc32 += c32[i]);
  acc32 = 0.0f;
  for (int i = kBins - 1; i >= 0; --i) w2[i] = (acc32 += c32[i]);
  std::array<double, kBins> mean1{}, mean2{};
  double acc = 0.0;
  for (int i = 0; i < kBins; ++i) {
    acc += static_cast<double>(c32[i]) * centers[i];
    mean1[i] = acc / static_cast<double>(w1[i]);
  }
  acc = 0.0;
  for (int i = kBins - 1; i >= 0; --i) {
    acc += static_cast<double>(c32[i]) * centers[i];
    mean2[i] = acc / static_cast<double>(w2[i]);
  }
  int best = 0;
  double best_v = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < kBins - 1; ++i) {
    const float ww = w1[i] * w2[i + 1];
    const double d = mean1[i] - mean2[i + 1];
    const double v = static_cast<double>(ww) * (d * d);
    if (std::isnan(v)) {  // numpy.argmax stops at the first NaN
      best = i;
      break;
    }
    if (v > best_v) {
      best_v = v;
      best = i;
    }
  }
  return centers[best];
}

py::tuple otsu_gray_mask(const CArray<std::uint8_t>& rgb) {
  require_rgb(rgb, "rgb");
  const std::ptrdiff_t h = rgb.shape(0), w = rgb.shape(1);
  py::array_t<std::uint8_t> out({h, w});
  const std::uint8_t* src = rgb.data();
  std::uint8_t* dst = out.mutable_data();
  double threshold;
  {
    py::gil_scoped_release release;
    std::vector<double> gray(static_cast<std::size_t>(h * w));
    const std::ptrdiff_t pr = h / 30, pc = w / 30;  // the reference's clear_border(prop=30)
#pragma omp parallel for schedule(static)
    for (std::ptrdiff_t r = 0; r < h; ++r) {
      for (std::ptrdiff_t c = 0; c < w; ++c) {
        const std::ptrdiff_t p = r * w + c;
        const bool band = r < pr || r >= h - pr || c < pc || c >= w - pc;
        gray[p] = band ? 0.0 : reference_gray(src[3 * p], src[3 * p + 1], src[3 * p + 2]);
      }
    }
    std::int64_t n = 0;
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (double v : gray) {
      if (v > 0.02 && v < 0.98) {
        ++n;
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
    }
    threshold = skimage_otsu(
        [&](auto&& visit) {
          for (double v : gray)
            if (v > 0.02 && v < 0.98) visit(v);
        },
        n, lo, hi);
    std::vector<std::uint8_t> raw(static_cast<std::size_t>(h * w)), tmp(raw.size());
    // NaN threshold (no usable pixel): every comparison is false, the mask is empty.
    for (std::ptrdiff_t p = 0; p < h * w; ++p) raw[p] = (gray[p] < threshold && gray[p] > 0.02) ? 1 : 0;
    // closing then opening with a 2x2 square, windows placed as scikit-image places even footprints.
    // (scikit-image's dilation and erosion both take offsets {0, +1}; their mirrored partners {-1, 0}.)
    square_filter(raw.data(), tmp.data(), h, w, 2, 0, true);
    square_filter(tmp.data(), raw.data(), h, w, 2, -1, false);
    square_filter(raw.data(), tmp.data(), h, w, 2, 0, false);
    square_filter(tmp.data(), dst, h, w, 2, -1, true);
  }
  return py::make_tuple(out, threshold);
}

// Otsu on an integer histogram (OpenCV's THRESH_OTSU): the t maximising the between-class variance
// of {v <= t} and {v > t}.
int otsu_u8(const std::array<std::int64_t, 256>& hist) {
  double total = 0, sum = 0;
  for (int i = 0; i < 256; ++i) {
    total += static_cast<double>(hist[i]);
    sum += static_cast<double>(i) * static_cast<double>(hist[i]);
  }
  double q1 = 0, s1 = 0, best = -1;
  int t_best = 0;
  for (int t = 0; t < 255; ++t) {
    q1 += static_cast<double>(hist[t]);
    s1 += static_cast<double>(t) * static_cast<double>(hist[t]);
    const double q2 = total - q1;
    if (q1 == 0 || q2 == 0) continue;
    const double mu1 = s1 / q1, mu2 = (sum - s1) / q2;
    const double v = q1 * q2 * (mu1 - mu2) * (mu1 - mu2);
    if (v > best) {
      best = v;
      t_best = t;
    }
  }
  return t_best;
}

py::tuple otsu_saturation_mask(const CArray<std::uint8_t>& rgb, int median_ksize, int close_size,
                               std::int64_t min_object_px, std::int64_t max_hole_px) {
  require_rgb(rgb, "rgb");
  if (median_ksize < 1 || median_ksize % 2 == 0) throw py::value_error("median_ksize must be odd and >= 1");
  if (close_size < 1) throw py::value_error("close_size must be >= 1");
  const std::ptrdiff_t h = rgb.shape(0), w = rgb.shape(1);
  py::array_t<std::uint8_t> out({h, w});
  const std::uint8_t* src = rgb.data();
  std::uint8_t* dst = out.mutable_data();
  int threshold;
  {
    py::gil_scoped_release release;
    const std::size_t n = static_cast<std::size_t>(h * w);
    std::vector<std::uint8_t> sat(n), blur(n), tmp(n);
#pragma omp parallel for schedule(static)
    for (std::ptrdiff_t p = 0; p < h * w; ++p) {
      const int r = src[3 * p], g = src[3 * p + 1], b = src[3 * p + 2];
      const int v = std::max(r, std::max(g, b)), m = std::min(r, std::min(g, b));
      sat[p] = v == 0 ? 0 : static_cast<std::uint8_t>((255 * (v - m) + v / 2) / v);  // HSV S, rounded
    }
    median_filter_u8(sat.data(), blur.data(), h, w, median_ksize);
    std::array<std::int64_t, 256> hist{};
    for (auto v : blur) hist[v] += 1;
    threshold = otsu_u8(hist);
    for (std::size_t p = 0; p < n; ++p) sat[p] = blur[p] > threshold ? 1 : 0;
    const int shift = -(close_size / 2);  // centred window, as OpenCV's default anchor
    square_filter(sat.data(), tmp.data(), h, w, close_size, shift, true);
    square_filter(tmp.data(), dst, h, w, close_size, -(close_size - 1 + shift), false);
    remove_small_objects(dst, h, w, min_object_px);
    fill_small_holes(dst, h, w, max_hole_px);
  }
  return py::make_tuple(out, threshold);
}

}  // namespace

void init_tissue_mask(py::module_& m) {
  m.def("otsu_gray_mask", &otsu_gray_mask, py::arg("rgb"),
        "Reference Giga-SSL tissue mask of an RGB uint8 (H, W, 3) thumbnail.\n\n"
        "Returns (mask uint8 (H, W) of 0/1, Otsu threshold on grey levels in [0, 1], NaN if no pixel\n"
        "lies strictly between 0.02 and 0.98).");
  m.def("otsu_saturation_mask", &otsu_saturation_mask, py::arg("rgb"), py::arg("median_ksize"),
        py::arg("close_size"), py::arg("min_object_px"), py::arg("max_hole_px"),
        "CLAM-style tissue mask: HSV saturation, median blur, Otsu, closing, small objects removed\n"
        "and small holes filled (areas in thumbnail pixels).\n\n"
        "Returns (mask uint8 (H, W) of 0/1, Otsu threshold on saturation in 0..255).");
}

}  // namespace gigassl
