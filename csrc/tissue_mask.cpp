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

// numpy.linspace(lo, hi, 257) and numpy.histogram's index arithmetic with its edge corrections, for
// the 256-bin histogram scikit-image's threshold_otsu builds over [lo, hi].
struct NumpyBins {
  std::array<double, kBins + 1> edges{};
  double lo, scale;
  NumpyBins(double lo_, double hi_) : lo(lo_), scale(kBins / (hi_ - lo_)) {
    const double step = (hi_ - lo_) / kBins;
    for (int i = 0; i < kBins; ++i) edges[i] = static_cast<double>(i) * step + lo_;
    edges[kBins] = hi_;
  }
  // numpy estimates the bin as ((v - lo) / denom) * 256 and then corrects it by one step against the
  // edges, so its result is the bin whose edges enclose v. A multiply gives the same estimate to within
  // one step, and walking to the enclosing edges gives the same bin, without a division per pixel.
  int index(double v) const {
    std::int64_t idx = static_cast<std::int64_t>((v - lo) * scale);
    idx = std::min<std::int64_t>(std::max<std::int64_t>(idx, 0), kBins - 1);
    while (idx > 0 && v < edges[idx]) --idx;
    while (idx < kBins - 1 && v >= edges[idx + 1]) ++idx;
    return static_cast<int>(idx);
  }
};

// scikit-image threshold_otsu from its histogram: counts cast to float32, float32 cumulative weights
// (and their float32 product), float64 class means; numpy.argmax semantics.
double skimage_otsu(const NumpyBins& bins, const std::array<std::int64_t, kBins>& counts) {
  std::array<double, kBins> centers{};
  std::array<float, kBins> c32{}, w1{}, w2{};
  for (int i = 0; i < kBins; ++i) {
    centers[i] = (bins.edges[i] + bins.edges[i + 1]) / 2.0;
    c32[i] = static_cast<float>(counts[i]);
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

inline bool usable(double g) { return g > 0.02 && g < 0.98; }

// The three passes over the thumbnail's interior rows [r0, r1) and columns [c0, c1). Each is also built
// for x86-64-v3, where std::fma is one instruction instead of a libm call; the loader picks the clone
// the CPU supports. Results are identical either way (fma is exactly rounded on both paths).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define GIGASSL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GIGASSL_CLONES
#endif

// Grey levels of n consecutive pixels into out: a tight loop the compiler vectorises (the passes
// below then branch on the buffered values instead of mixing decoding and branching).
constexpr std::ptrdiff_t kChunk = 1024;

GIGASSL_CLONES void gray_chunk(const std::uint8_t* px, std::ptrdiff_t n, double* out) {
  // De-interleave first: the arithmetic loop then runs on contiguous lanes (4 doubles per instruction
  // on x86-64-v3). Same operations as reference_gray, so the same bits.
  alignas(64) std::int32_t r[kChunk], g[kChunk], b[kChunk];
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    r[i] = px[3 * i];
    g[i] = px[3 * i + 1];
    b[i] = px[3 * i + 2];
  }
  constexpr double s = 1.0 / 255.0;
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    out[i] = std::fma(static_cast<double>(b[i]) * s, 0.0721,
                      std::fma(static_cast<double>(r[i]) * s, 0.2125, (static_cast<double>(g[i]) * s) * 0.7154));
  }
}

// Grey levels are computed exactly once per pixel. Each pixel keeps a 16-bit key, floor(g * 2^16), which
// is exact (scaling by a power of two), so every grey level with key f lies in [f, f + 1) / 2^16. Any
// comparison of g with a value E is then settled by the keys alone unless E's own key is f; only
// those few pixels get their grey level again. Key 0 marks pixels that are not usable (usable grey
// levels are > 0.02, so their keys are >= 1310).
constexpr std::int64_t kFine = std::int64_t{1} << 16;

inline std::uint16_t fine_key(double g) {
  return static_cast<std::uint16_t>(std::min<std::int64_t>(static_cast<std::int64_t>(g * kFine), kFine - 1));
}

// Pass 1: keys of the interior, a histogram of usable keys, and the count, min and max of usable grey
// levels.
GIGASSL_CLONES void grey_keys(const std::uint8_t* src, std::ptrdiff_t w, std::ptrdiff_t r0, std::ptrdiff_t r1,
                              std::ptrdiff_t c0, std::ptrdiff_t c1, std::uint16_t* keys,
                              std::vector<std::uint32_t>& fine, std::int64_t& n, double& lo, double& hi) {
  std::int64_t cnt = 0;
  double mn = lo, mx = hi;
#pragma omp parallel reduction(min : mn) reduction(max : mx) reduction(+ : cnt)
  {
    std::vector<std::uint32_t> local(static_cast<std::size_t>(kFine), 0);
    std::array<double, kChunk> g{};
#pragma omp for schedule(static) nowait
    for (std::ptrdiff_t r = r0; r < r1; ++r) {
      for (std::ptrdiff_t c = c0; c < c1; c += kChunk) {
        const std::ptrdiff_t len = std::min(kChunk, c1 - c);
        gray_chunk(src + 3 * (r * w + c), len, g.data());
        std::uint16_t* key = keys + r * w + c;
        for (std::ptrdiff_t i = 0; i < len; ++i) {
          const bool u = usable(g[i]);
          const std::uint16_t k = u ? fine_key(g[i]) : 0;
          key[i] = k;
          local[k] += u;
          cnt += u;
          mn = u && g[i] < mn ? g[i] : mn;
          mx = u && g[i] > mx ? g[i] : mx;
        }
      }
    }
#pragma omp critical
    for (std::int64_t f = 0; f < kFine; ++f) fine[static_cast<std::size_t>(f)] += local[static_cast<std::size_t>(f)];
  }
  n = cnt;
  lo = mn;
  hi = mx;
}

// Pass 2: the 256-bin histogram. Key buckets that hold no bin edge go whole into their bin; pixels in
// buckets that hold an edge are binned one by one from their exact grey level.
GIGASSL_CLONES std::array<std::int64_t, kBins> usable_histogram(const std::uint8_t* src, std::ptrdiff_t w,
                                                                std::ptrdiff_t r0, std::ptrdiff_t r1,
                                                                std::ptrdiff_t c0, std::ptrdiff_t c1,
                                                                const std::uint16_t* keys,
                                                                const std::vector<std::uint32_t>& fine,
                                                                const NumpyBins& bins) {
  std::vector<std::uint8_t> split(static_cast<std::size_t>(kFine), 0);
  for (double e : bins.edges) split[fine_key(e)] = 1;
  split[0] = 0;  // key 0 holds only unusable pixels
  std::array<std::int64_t, kBins> counts{};
  std::int64_t in_split = 0;
  for (std::int64_t f = 1; f < kFine; ++f) {
    const auto i = static_cast<std::size_t>(f);
    if (fine[i] && !split[i]) counts[bins.index((static_cast<double>(f) + 0.5) / static_cast<double>(kFine))] += fine[i];
    if (split[i]) in_split += fine[i];
  }
  if (in_split == 0) return counts;
#pragma omp parallel
  {
    std::array<std::int64_t, kBins> local{};
#pragma omp for schedule(static) nowait
    for (std::ptrdiff_t r = r0; r < r1; ++r) {
      const std::uint16_t* key = keys + r * w;
      for (std::ptrdiff_t c = c0; c < c1; ++c) {
        if (split[key[c]]) {
          const std::uint8_t* p = src + 3 * (r * w + c);
          local[bins.index(reference_gray(p[0], p[1], p[2]))] += 1;
        }
      }
    }
#pragma omp critical
    for (int i = 0; i < kBins; ++i) counts[i] += local[i];
  }
  return counts;
}

// Pass 3: bits of (usable and grey < threshold), from the keys; only pixels whose key is the
// threshold's own need their grey level again.
GIGASSL_CLONES void below_threshold(const std::uint8_t* src, const std::uint16_t* keys, std::ptrdiff_t w,
                                    std::ptrdiff_t r0, std::ptrdiff_t r1, std::ptrdiff_t c0, std::ptrdiff_t c1,
                                    double threshold, std::uint64_t* bits) {
  const std::ptrdiff_t stride = bit_stride(w);
  const std::uint16_t kt = fine_key(threshold);
#pragma omp parallel for schedule(static)
  for (std::ptrdiff_t r = r0; r < r1; ++r) {
    std::uint64_t* row = bits + r * stride;
    const std::uint16_t* key = keys + r * w;
    // Whole 64-pixel words at a time, built in a register; the first and last words are partial.
    for (std::ptrdiff_t k = c0 >> 6; k <= (c1 - 1) >> 6; ++k) {
      const std::ptrdiff_t base = k << 6;
      const std::ptrdiff_t j0 = std::max<std::ptrdiff_t>(0, c0 - base), j1 = std::min<std::ptrdiff_t>(64, c1 - base);
      std::uint64_t word = 0;
      bool exact = false;
      for (std::ptrdiff_t j = j0; j < j1; ++j) {
        const std::uint16_t kj = key[base + j];
        word |= static_cast<std::uint64_t>(kj != 0 && kj < kt) << j;
        exact |= kj == kt;
      }
      if (exact) {
        for (std::ptrdiff_t j = j0; j < j1; ++j) {
          if (key[base + j] == kt) {
            const std::uint8_t* p = src + 3 * (r * w + base + j);
            word |= static_cast<std::uint64_t>(reference_gray(p[0], p[1], p[2]) < threshold) << j;
          }
        }
      }
      row[k] = word;
    }
  }
}

struct Workspace {
  std::vector<std::uint16_t> keys;
  std::vector<std::uint32_t> fine;
  std::vector<std::uint64_t> bits, scratch;
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

py::tuple otsu_gray_mask(const CArray<std::uint8_t>& rgb) {
  require_rgb(rgb, "rgb");
  const std::ptrdiff_t h = rgb.shape(0), w = rgb.shape(1);
  py::array_t<std::uint8_t> out({h, w});
  const std::uint8_t* src = rgb.data();
  std::uint8_t* dst = out.mutable_data();
  double threshold = std::numeric_limits<double>::quiet_NaN();
  {
    py::gil_scoped_release release;
    // The reference zeroes a border band (clear_border, prop=30); zero is never tissue, so only the
    // interior is ever looked at (its keys stay 0).
    const std::ptrdiff_t r0 = h / 30, r1 = h - h / 30, c0 = w / 30, c1 = w - w / 30;
    // Buffers are kept per calling thread and reused: a cohort masks one thumbnail after another,
    // and fresh pages cost the kernel as much time as a pass over them.
    Workspace& ws = workspace();
    ws.keys.resize(std::max(ws.keys.size(), static_cast<std::size_t>(h * w)));
    ws.fine.assign(static_cast<std::size_t>(kFine), 0);
    std::uint16_t* keys = ws.keys.data();
    std::vector<std::uint32_t>& fine = ws.fine;
    std::int64_t n = 0;
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    grey_keys(src, w, r0, r1, c0, c1, keys, fine, n, lo, hi);
    bool any_below = false;
    if (n > 0 && lo == hi) {
      threshold = lo;  // threshold_otsu of a constant image is that value; no usable pixel is below it
    } else if (n > 0) {
      const NumpyBins bins(lo, hi);
      threshold = skimage_otsu(bins, usable_histogram(src, w, r0, r1, c0, c1, keys, fine, bins));
      any_below = true;
    }
    // The mask is bit-packed from here on: the four 2x2 passes then touch 64 pixels per operation.
    const std::size_t words = static_cast<std::size_t>(h * bit_stride(w));
    ws.bits.assign(words, 0);
    ws.scratch.resize(std::max(ws.scratch.size(), words));
    std::uint64_t* bits = ws.bits.data();
    std::uint64_t* scratch = ws.scratch.data();
    if (any_below) below_threshold(src, keys, w, r0, r1, c0, c1, threshold, bits);
    // Closing then opening with a 2x2 square. scikit-image's dilation and erosion both look at offsets
    // {0, +1}; closing and opening then apply the mirrored footprint, offsets {-1, 0}.
    square2_filter_bits(bits, bits, scratch, h, w, 0, true);
    square2_filter_bits(bits, bits, scratch, h, w, -1, false);
    square2_filter_bits(bits, bits, scratch, h, w, 0, false);
    square2_filter_bits(bits, bits, scratch, h, w, -1, true);
    unpack_bits(bits, dst, h, w);
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
