// gigassl_fast._core: the compiled core. Each topic registers itself from its own file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace gigassl {
void init_tissue_mask(py::module_& m);
void init_tile_grid(py::module_& m);
void init_sparse_plan(py::module_& m);
}  // namespace gigassl

PYBIND11_MODULE(_core, m) {
  m.doc() = "gigassl-fast compiled core: tissue masks, tile grids, sparse-convolution step plans.";
  gigassl::init_tissue_mask(m);
  gigassl::init_tile_grid(m);
  gigassl::init_sparse_plan(m);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
