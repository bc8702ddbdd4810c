// Torch-facing wrappers for the CUDA launchers (built only when torch has CUDA and nvcc exists).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include "launchers.h"

namespace gptpar {

bool unscale_check_cuda(at::Tensor grads, double inv_scale) {
  TORCH_CHECK(grads.is_cuda() && grads.scalar_type() == at::kFloat && grads.is_contiguous(),
              "unscale_check_cuda: expected a contiguous float32 CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(grads.data_ptr()) % 16 == 0, "unscale_check_cuda: tensor must be 16-byte aligned");
  auto flag = at::zeros({1}, grads.options().dtype(at::kInt));
  cuda::launch_unscale_check_f32(grads.data_ptr<float>(), grads.numel(), static_cast<float>(inv_scale),
                                 flag.data_ptr<int>(), at::cuda::getCurrentCUDAStream());
  return flag.item<int>() != 0;
}

}  // namespace gptpar
