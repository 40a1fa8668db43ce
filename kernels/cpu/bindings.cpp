// The one pybind11 module, mmfast._C. Each op lives in its own kernels/cpu/<op>.cpp and adds its
// functions to the module through a register_<op>() hook declared here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_similarity(py::module_& m);
void register_codebook(py::module_& m);
void register_decode_attention(py::module_& m);
void register_group_norm(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfast CPU kernels (C++17, OpenMP, vectorized)";
  register_similarity(m);
  register_codebook(m);
  register_decode_attention(m);
  register_group_norm(m);
}
