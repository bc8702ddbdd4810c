// pybind11 module gptpar._C: the native ops, dispatched by device.
#include <torch/extension.h>

namespace gptpar {
bool unscale_check_cpu(at::Tensor grads, double inv_scale);
#ifdef GPTPAR_WITH_CUDA
bool unscale_check_cuda(at::Tensor grads, double inv_scale);
#endif

static bool unscale_check(at::Tensor grads, double inv_scale) {
#ifdef GPTPAR_WITH_CUDA
  if (grads.is_cuda()) return unscale_check_cuda(grads, inv_scale);
#endif
  return unscale_check_cpu(grads, inv_scale);
}
}  // namespace gptpar

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gptpar native ops (CPU C++ and, when built, CUDA)";
  m.def("unscale_check_", &gptpar::unscale_check,
        "In place grads *= inv_scale on a contiguous float32 tensor; returns True if any result is inf/nan",
        pybind11::arg("grads"), pybind11::arg("inv_scale"));
#ifdef GPTPAR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
