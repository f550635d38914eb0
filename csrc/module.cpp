// The Python module gapfix._C. It holds no Python functions: importing it
// loads the shared library, whose TORCH_LIBRARY blocks register the ops under
// torch.ops.gapfix. build_info() reports how the library was compiled.
#include <Python.h>

#include <string>

#include <torch/library.h>

namespace gapfix {

std::string build_info() {
  std::string info = "cxx=" __VERSION__;
#ifdef _OPENMP
  info += " openmp=" + std::to_string(_OPENMP);
#else
  info += " openmp=no";
#endif
  info += " cpu_features=";
  std::string features;
#ifdef __POPCNT__
  features += "popcnt,";
#endif
#ifdef __BMI2__
  features += "bmi2,";
#endif
#ifdef __AVX2__
  features += "avx2,";
#endif
#ifdef __AVX512F__
  features += "avx512f,";
#endif
#ifdef __ARM_NEON
  features += "neon,";
#endif
  if (!features.empty()) features.pop_back();
  info += features.empty() ? "baseline" : features;
#ifdef GAPFIX_WITH_CUDA
  info += " cuda=yes";
#else
  info += " cuda=no";
#endif
  return info;
}

}  // namespace gapfix

TORCH_LIBRARY_FRAGMENT(gapfix, m) {
  m.def("build_info() -> str", &gapfix::build_info);
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
