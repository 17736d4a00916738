#include "morphology.hpp"

#include <algorithm>
#include <array>

namespace gigassl {

namespace {

inline std::ptrdiff_t clampi(std::ptrdiff_t v, std::ptrdiff_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

// Visits the connected component of `value` pixels that contains (r0, c0), marks it in `seen` and
// returns its pixel list in `pixels`; also reports whether it touches the image border.
template <int Connectivity>
bool flood(const std::uint8_t* mask, std::vector<std::uint8_t>& seen, std::ptrdiff_t h, std::ptrdiff_t w,
           std::ptrdiff_t start, std::uint8_t value, std::vector<std::ptrdiff_t>& pixels,
           std::vector<std::ptrdiff_t>& stack) {
  static constexpr std::array<int, 8> dr{-1, 1, 0, 0, -1, -1, 1, 1};
  static constexpr std::array<int, 8> dc{0, 0, -1, 1, -1, 1, -1, 1};
  bool border = false;
  pixels.clear();
  stack.clear();
  stack.push_back(start);
  seen[start] = 1;
  while (!stack.empty()) {
    const std::ptrdiff_t p = stack.back();
    stack.pop_back();
    pixels.push_back(p);
    const std::ptrdiff_t r = p / w, c = p % w;
    if (r == 0 || c == 0 || r == h - 1 || c == w - 1) border = true;
    for (int n = 0; n < Connectivity; ++n) {
      const std::ptrdiff_t rr = r + dr[n], cc = c + dc[n];
      if (rr < 0 || cc < 0 || rr >= h || cc >= w) continue;
      const std::ptrdiff_t q = rr * w + cc;
      if (!seen[q] && mask[q] == value) {
        seen[q] = 1;
        stack.push_back(q);
      }
    }
  }
  return border;
}

}  // namespace

void square_filter(const std::uint8_t* in, std::uint8_t* out, std::ptrdiff_t h, std::ptrdiff_t w, int k,
                   int shift, bool is_max) {
  std::vector<std::uint8_t> tmp(static_cast<std::size_t>(h * w));
  const auto pick = [is_max](std::uint8_t a, std::uint8_t b) { return is_max ? std::max(a, b) : std::min(a, b); };
#pragma omp parallel for schedule(static)
  for (std::ptrdiff_t r = 0; r < h; ++r) {
    const std::uint8_t* row = in + r * w;
    for (std::ptrdiff_t c = 0; c < w; ++c) {
      std::uint8_t v = row[clampi(c + shift, w - 1)];
      for (int o = 1; o < k; ++o) v = pick(v, row[clampi(c + shift + o, w - 1)]);
      tmp[static_cast<std::size_t>(r * w + c)] = v;
    }
  }
#pragma omp parallel for schedule(static)
  for (std::ptrdiff_t r = 0; r < h; ++r) {
    for (std::ptrdiff_t c = 0; c < w; ++c) {
      std::uint8_t v = tmp[static_cast<std::size_t>(clampi(r + shift, h - 1) * w + c)];
      for (int o = 1; o < k; ++o) v = pick(v, tmp[static_cast<std::size_t>(clampi(r + shift + o, h - 1) * w + c)]);
      out[r * w + c] = v;
    }
  }
}

void square2_filter_bits(std::uint64_t* in, std::uint64_t* out, std::uint64_t* scratch, std::ptrdiff_t h,
                         std::ptrdiff_t w, int shift, bool is_max) {
  const std::ptrdiff_t stride = bit_stride(w);
  const auto op = [is_max](std::uint64_t a, std::uint64_t b) { return is_max ? (a | b) : (a & b); };
#pragma omp parallel for schedule(static)
  for (std::ptrdiff_t r = 0; r < h; ++r) {
    std::uint64_t* x = in + r * stride;
    std::uint64_t* t = scratch + r * stride;
    if (shift == 0) {
      // Column w (a spare bit) stands for the clamped neighbour of column w - 1: copy w - 1 into it.
      const std::uint64_t last = (x[(w - 1) >> 6] >> ((w - 1) & 63)) & 1u;
      x[w >> 6] = (x[w >> 6] & ~(std::uint64_t{1} << (w & 63))) | (last << (w & 63));
      for (std::ptrdiff_t k = 0; k < stride; ++k) {
        const std::uint64_t next = (x[k] >> 1) | (k + 1 < stride ? x[k + 1] << 63 : 0);
        t[k] = op(x[k], next);
      }
    } else {
      for (std::ptrdiff_t k = 0; k < stride; ++k) {
        const std::uint64_t prev = (x[k] << 1) | (k > 0 ? x[k - 1] >> 63 : (x[0] & 1u));
        t[k] = op(x[k], prev);
      }
    }
  }
#pragma omp parallel for schedule(static)
  for (std::ptrdiff_t r = 0; r < h; ++r) {
    const std::ptrdiff_t a = std::max<std::ptrdiff_t>(0, std::min(h - 1, r + shift));
    const std::ptrdiff_t b = std::max<std::ptrdiff_t>(0, std::min(h - 1, r + shift + 1));
    const std::uint64_t* ta = scratch + a * stride;
    const std::uint64_t* tb = scratch + b * stride;
    std::uint64_t* o = out + r * stride;
    for (std::ptrdiff_t k = 0; k < stride; ++k) o[k] = op(ta[k], tb[k]);
  }
}

void unpack_bits(const std::uint64_t* bits, std::uint8_t* out, std::ptrdiff_t h, std::ptrdiff_t w) {
  const std::ptrdiff_t stride = bit_stride(w);
#pragma omp parallel for schedule(static)
  for (std::ptrdiff_t r = 0; r < h; ++r) {
    const std::uint64_t* x = bits + r * stride;
    std::uint8_t* o = out + r * w;
    for (std::ptrdiff_t k = 0; k * 64 < w; ++k) {
      const std::uint64_t word = x[k];
      const std::ptrdiff_t end = std::min<std::ptrdiff_t>(64, w - k * 64);
      for (std::ptrdiff_t j = 0; j < end; ++j) o[k * 64 + j] = static_cast<std::uint8_t>((word >> j) & 1u);
    }
  }
}

void remove_small_objects(std::uint8_t* mask, std::ptrdiff_t h, std::ptrdiff_t w, std::int64_t min_area) {
  if (min_area <= 1) return;
  std::vector<std::uint8_t> seen(static_cast<std::size_t>(h * w), 0);
  std::vector<std::ptrdiff_t> pixels, stack;
  for (std::ptrdiff_t p = 0; p < h * w; ++p) {
    if (mask[p] != 1 || seen[p]) continue;
    flood<8>(mask, seen, h, w, p, 1, pixels, stack);
    if (static_cast<std::int64_t>(pixels.size()) < min_area) {
      for (auto q : pixels) mask[q] = 0;
    }
  }
}

void fill_small_holes(std::uint8_t* mask, std::ptrdiff_t h, std::ptrdiff_t w, std::int64_t max_area) {
  if (max_area <= 0) return;
  std::vector<std::uint8_t> seen(static_cast<std::size_t>(h * w), 0);
  std::vector<std::ptrdiff_t> pixels, stack;
  for (std::ptrdiff_t p = 0; p < h * w; ++p) {
    if (mask[p] != 0 || seen[p]) continue;
    const bool border = flood<4>(mask, seen, h, w, p, 0, pixels, stack);
    if (!border && static_cast<std::int64_t>(pixels.size()) < max_area) {
      for (auto q : pixels) mask[q] = 1;
    }
  }
}

void median_filter_u8(const std::uint8_t* in, std::uint8_t* out, std::ptrdiff_t h, std::ptrdiff_t w, int k) {
  const int rad = k / 2;
  const int half = (k * k) / 2;  // the median is the value whose cumulative count first exceeds this
#pragma omp parallel for schedule(dynamic, 16)
  for (std::ptrdiff_t r = 0; r < h; ++r) {
    // Huang's running histogram along the row, with the median tracked incrementally.
    std::array<int, 256> hist{};
    const auto add_col = [&](std::ptrdiff_t c, int sign) {
      const std::ptrdiff_t cc = clampi(c, w - 1);
      for (int o = -rad; o <= rad; ++o) hist[in[clampi(r + o, h - 1) * w + cc]] += sign;
    };
    for (int o = -rad; o <= rad; ++o) add_col(o, 1);
    int med = 0, below = 0;  // below = number of window values < med
    for (std::ptrdiff_t c = 0; c < w; ++c) {
      if (c > 0) {
        const std::ptrdiff_t gone = clampi(c - rad - 1, w - 1), come = clampi(c + rad, w - 1);
        for (int o = -rad; o <= rad; ++o) {
          const int vg = in[clampi(r + o, h - 1) * w + gone], vc = in[clampi(r + o, h - 1) * w + come];
          hist[vg] -= 1;
          if (vg < med) --below;
          hist[vc] += 1;
          if (vc < med) ++below;
        }
      }
      while (below > half) below -= hist[--med];
      while (below + hist[med] <= half) below += hist[med++];
      out[r * w + c] = static_cast<std::uint8_t>(med);
    }
  }
}

}  // namespace gigassl
