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

// square_filter for k = 2 on 0/1 masks (shift 0: offsets {0, +1}; shift -1: offsets {-1, 0}), written so
// the compiler vectorises it. `scratch` holds h * w bytes; `out` may alias `in`.
void square2_filter(const std::uint8_t* in, std::uint8_t* out, std::uint8_t* scratch, std::ptrdiff_t h,
                    std::ptrdiff_t w, int shift, bool is_max);

// Drops 8-connected foreground components smaller than min_area pixels (in place).
void remove_small_objects(std::uint8_t* mask, std::ptrdiff_t h, std::ptrdiff_t w, std::int64_t min_area);

// Fills 4-connected background components that do not touch the image border and are smaller
// than max_area pixels (in place).
void fill_small_holes(std::uint8_t* mask, std::ptrdiff_t h, std::ptrdiff_t w, std::int64_t max_area);

// Median filter with a k x k window (k odd), edges replicated, as OpenCV's medianBlur.
void median_filter_u8(const std::uint8_t* in, std::uint8_t* out, std::ptrdiff_t h, std::ptrdiff_t w, int k);

}  // namespace gigassl
