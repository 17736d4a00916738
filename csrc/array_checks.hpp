// Shared argument checks for the _core bindings: messages name the argument and what was expected,
// so a wrong call fails in Python with a ValueError instead of reading out of bounds.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace gigassl {

namespace py = pybind11;

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

inline void require_rgb(const CArray<std::uint8_t>& rgb, const char* name) {
  if (rgb.ndim() != 3 || rgb.shape(2) != 3) {
    throw py::value_error(std::string(name) + " must be a (H, W, 3) uint8 RGB array");
  }
  if (rgb.shape(0) < 1 || rgb.shape(1) < 1) {
    throw py::value_error(std::string(name) + " is empty");
  }
}

inline void require_2d(const py::array& a, const char* name) {
  if (a.ndim() != 2 || a.shape(0) < 1 || a.shape(1) < 1) {
    throw py::value_error(std::string(name) + " must be a non-empty 2-D array");
  }
}

}  // namespace gigassl
