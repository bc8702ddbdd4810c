// pybind11 module gptpar._C: the native ops. Each takes CPU or (when built with CUDA) CUDA tensors; CUDA
// calls take the stream as an integer handle (torch.cuda.current_stream().cuda_stream).
#include <torch/extension.h>

#include <vector>

namespace gptpar {
void pack_cast_cpu(const std::vector<at::Tensor>& srcs, at::Tensor dst, double scale, c10::optional<at::Tensor> residual);
void unpack_accumulate_cpu(at::Tensor src, const std::vector<at::Tensor>& dsts, double scale);
void unscale_check_cpu(const std::vector<at::Tensor>& grads, double inv_scale, at::Tensor found_inf);
void adamw_step_cpu(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, double lr, double beta1,
                    double beta2, double eps, double weight_decay, int64_t step, c10::optional<at::Tensor> param_lowp);
#ifdef GPTPAR_WITH_CUDA
void pack_cast_cuda(const std::vector<at::Tensor>& srcs, at::Tensor dst, double scale, c10::optional<at::Tensor> residual,
                    int64_t stream);
void unpack_accumulate_cuda(at::Tensor src, const std::vector<at::Tensor>& dsts, double scale, int64_t stream);
void unscale_check_cuda(const std::vector<at::Tensor>& grads, double inv_scale, at::Tensor found_inf, int64_t stream);
void adamw_step_cuda(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int64_t step, c10::optional<at::Tensor> param_lowp,
                     int64_t stream);
#define GPTPAR_ON_CUDA(t, call) \
  if ((t).is_cuda()) return call;
#else
#define GPTPAR_ON_CUDA(t, call) \
  TORCH_CHECK(!(t).is_cuda(), "gptpar._C was built without CUDA; got a CUDA tensor");
#endif

static void pack_cast(const std::vector<at::Tensor>& srcs, at::Tensor dst, double scale, c10::optional<at::Tensor> residual,
                      int64_t stream) {
  GPTPAR_ON_CUDA(dst, pack_cast_cuda(srcs, dst, scale, residual, stream));
  pack_cast_cpu(srcs, dst, scale, residual);
}

static void unpack_accumulate(at::Tensor src, const std::vector<at::Tensor>& dsts, double scale, int64_t stream) {
  GPTPAR_ON_CUDA(src, unpack_accumulate_cuda(src, dsts, scale, stream));
  unpack_accumulate_cpu(src, dsts, scale);
}

static void unscale_check(const std::vector<at::Tensor>& grads, double inv_scale, at::Tensor found_inf, int64_t stream) {
  GPTPAR_ON_CUDA(found_inf, unscale_check_cuda(grads, inv_scale, found_inf, stream));
  unscale_check_cpu(grads, inv_scale, found_inf);
}

static void adamw_step(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, double lr, double beta1,
                       double beta2, double eps, double weight_decay, int64_t step, c10::optional<at::Tensor> param_lowp,
                       int64_t stream) {
  GPTPAR_ON_CUDA(param, adamw_step_cuda(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, param_lowp, stream));
  adamw_step_cpu(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, param_lowp);
}
}  // namespace gptpar

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "gptpar native ops (CPU C++/OpenMP and, when built, CUDA)";
  m.def("pack_cast", &gptpar::pack_cast, "dst[packed] = cast(srcs * scale (+ residual)); residual <- cast error",
        py::arg("srcs"), py::arg("dst"), py::arg("scale"), py::arg("residual") = py::none(), py::arg("stream") = 0);
  m.def("unpack_accumulate", &gptpar::unpack_accumulate, "dsts[t] += float(src[packed]) * scale", py::arg("src"),
        py::arg("dsts"), py::arg("scale"), py::arg("stream") = 0);
  m.def("unscale_check_", &gptpar::unscale_check, "grads *= inv_scale; found_inf <- 1 if any result is inf/nan",
        py::arg("grads"), py::arg("inv_scale"), py::arg("found_inf"), py::arg("stream") = 0);
  m.def("adamw_step_", &gptpar::adamw_step, "fused AdamW on flat float32 buffers", py::arg("param"), py::arg("grad"),
        py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("step"), py::arg("param_lowp") = py::none(), py::arg("stream") = 0);
#ifdef GPTPAR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
