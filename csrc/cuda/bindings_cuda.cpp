// Torch-facing wrappers for the CUDA launchers. Only torch/extension.h and launchers.h are included (no
// CUDA or c10/cuda headers): the caller passes the CUDA stream as an integer handle, so this file also
// compiles, and is syntax-checked in CI, against a CPU-only torch.
#include <torch/extension.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <vector>

#include "cuda/launchers.h"

namespace gptpar {
namespace {

int code(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return cuda::kF32;
    case at::kBFloat16: return cuda::kBF16;
    case at::kHalf: return cuda::kF16;
    default: TORCH_CHECK(false, "unsupported dtype ", s, " (expected float32, bfloat16 or float16)");
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), what, ": expected a tensor on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, ": expected a contiguous tensor");
}

cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void pack_cast_cuda(const std::vector<at::Tensor>& srcs, at::Tensor dst, double scale, c10::optional<at::Tensor> residual,
                    int64_t stream) {
  check_cuda(dst, dst, "pack_cast dst");
  c10::DeviceGuard guard(dst.device());
  std::vector<const void*> ptrs;
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (const auto& s : srcs) {
    check_cuda(s, dst, "pack_cast src");
    TORCH_CHECK(s.scalar_type() == srcs[0].scalar_type(), "pack_cast: all sources must share one dtype");
    ptrs.push_back(s.data_ptr());
    numels.push_back(s.numel());
    total += s.numel();
  }
  TORCH_CHECK(dst.numel() == total, "pack_cast: dst has ", dst.numel(), " elements, sources have ", total);
  float* res = nullptr;
  if (residual.has_value()) {
    check_cuda(*residual, dst, "pack_cast residual");
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->numel() == total, "pack_cast: residual must be float32 with ", total, " elements");
    res = residual->data_ptr<float>();
  }
  if (srcs.empty()) return;
  cuda::launch_pack_cast(ptrs.data(), numels.data(), (int)ptrs.size(), code(srcs[0].scalar_type()), dst.data_ptr(),
                         code(dst.scalar_type()), (float)scale, res, as_stream(stream));
}

void unpack_accumulate_cuda(at::Tensor src, const std::vector<at::Tensor>& dsts, double scale, int64_t stream) {
  check_cuda(src, src, "unpack_accumulate src");
  c10::DeviceGuard guard(src.device());
  std::vector<float*> ptrs;
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (const auto& d : dsts) {
    check_cuda(d, src, "unpack_accumulate dst");
    TORCH_CHECK(d.scalar_type() == at::kFloat, "unpack_accumulate: destinations must be float32");
    ptrs.push_back(d.data_ptr<float>());
    numels.push_back(d.numel());
    total += d.numel();
  }
  TORCH_CHECK(src.numel() == total, "unpack_accumulate: src has ", src.numel(), " elements, destinations have ", total);
  cuda::launch_unpack_accumulate(src.data_ptr(), code(src.scalar_type()), ptrs.data(), numels.data(), (int)ptrs.size(),
                                 (float)scale, as_stream(stream));
}

void unscale_check_cuda(const std::vector<at::Tensor>& grads, double inv_scale, at::Tensor found_inf, int64_t stream) {
  check_cuda(found_inf, found_inf, "unscale_check found_inf");
  TORCH_CHECK(found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1, "unscale_check: found_inf must be a 1-element float32 tensor");
  c10::DeviceGuard guard(found_inf.device());
  std::vector<float*> ptrs;
  std::vector<int64_t> numels;
  for (const auto& g : grads) {
    check_cuda(g, found_inf, "unscale_check grad");
    TORCH_CHECK(g.scalar_type() == at::kFloat, "unscale_check: grads must be float32");
    ptrs.push_back(g.data_ptr<float>());
    numels.push_back(g.numel());
  }
  cuda::launch_unscale_check(ptrs.data(), numels.data(), (int)ptrs.size(), (float)inv_scale, found_inf.data_ptr<float>(),
                             as_stream(stream));
}

void adamw_step_cuda(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int64_t step, c10::optional<at::Tensor> param_lowp,
                     int64_t stream) {
  for (auto* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    check_cuda(*t, param, "adamw_step");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == param.numel(), "adamw_step: buffers must be float32 with ", param.numel(), " elements");
  }
  TORCH_CHECK(step >= 1, "adamw_step: step must be >= 1, got ", step);
  c10::DeviceGuard guard(param.device());
  void* low = nullptr;
  int low_code = cuda::kBF16;
  if (param_lowp.has_value()) {
    check_cuda(*param_lowp, param, "adamw_step param_lowp");
    TORCH_CHECK(param_lowp->numel() == param.numel(), "adamw_step: param_lowp must have ", param.numel(), " elements");
    low_code = code(param_lowp->scalar_type());
    TORCH_CHECK(low_code != cuda::kF32, "adamw_step: param_lowp must be bfloat16 or float16");
    low = param_lowp->data_ptr();
  }
  const double bc1 = 1.0 - std::pow(beta1, (double)step), bc2 = 1.0 - std::pow(beta2, (double)step);
  cuda::launch_adamw(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                     param.numel(), (float)(1.0 - lr * weight_decay), (float)(1.0 - beta1), (float)beta2, (float)(1.0 - beta2),
                     (float)(lr / bc1), (float)std::sqrt(bc2), (float)eps, low, low_code, as_stream(stream));
}

}  // namespace gptpar
