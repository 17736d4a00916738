// Binary morphology and connected components on row-major uint8 masks (0 or 1).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace gigassl {

// Min (erode) or max (dilate) filter over a k x k square whose window on each axis covers
// offsets [shift, shift + k - 1]; out-of-image neighbours are clamped to the edge, which is what
// scikit-image's default mode="reflect" amounts to for windows that reach one pixel past the edge.
void square_filter(const std::uint8_t* in, std::uint8_t* out, std::ptrdiff_t h, std::ptrdiff_t w, int k,
                   int shift, bool is_max);

// Row-packed bit masks: column c of row r is bit (c % 64) of word r * stride + c / 64, with
// stride = w / 64 + 1 so that every row has at least one spare bit past its last column.
inline std::ptrdiff_t bit_stride(std::ptrdiff_t w) { return w / 64 + 1; }

// 2x2 min/max filter (shift 0: offsets {0, +1}; shift -1: offsets {-1, 0}; edges clamped) on
// bit-packed rows, 64 pixels per operation. `in` is modified (its spare bits are
// set for the edge rule); `scratch` holds h * stride words; `out` may alias `in`.
void square2_filter_bits(std::uint64_t* in, std::uint64_t* out, std::uint64_t* scratch, std::ptrdiff_t h,
                         std::ptrdiff_t w, int shift, bool is_max);

// Bits to a uint8 (h, w) array of 0/1.
void unpack_bits(const std::uint64_t* bits, std::uint8_t* out, std::ptrdiff_t h, std::ptrdiff_t w);

// Drops 8-connected foreground components smaller than min_area pixels (in place).
void remove_small_objects(std::uint8_t* mask, std::ptrdiff_t h, std::ptrdiff_t w, std::int64_t min_area);

// Fills 4-connected background components that do not touch the image border and are smaller
// than max_area pixels (in place).
void fill_small_holes(std::uint8_t* mask, std::ptrdiff_t h, std::ptrdiff_t w, std::int64_t max_area);

// Median filter with a k x k window (k odd), edges replicated, as OpenCV's medianBlur.
void median_filter_u8(const std::uint8_t* in, std::uint8_t* out, std::ptrdiff_t h, std::ptrdiff_t w, int k);

}  // namespace gigassl
