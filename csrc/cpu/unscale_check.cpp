// CPU kernel: in-place unscale of fp32 gradients with a non-finite check, in one pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

namespace gptpar {

// A float is inf or nan exactly when its exponent bits are all ones. Testing the bits (rather than
// std::isfinite) keeps the loop branch-free so the compiler vectorises it; -ffast-math must not be
// used here, it would let the compiler assume no inf/nan exist.
static inline uint32_t nonfinite_bit(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x7f800000u) == 0x7f800000u;
}

bool unscale_check_cpu(at::Tensor grads, double inv_scale) {
  TORCH_CHECK(grads.device().is_cpu(), "unscale_check_cpu: tensor must be on CPU, got ", grads.device());
  TORCH_CHECK(grads.scalar_type() == at::kFloat, "unscale_check_cpu: tensor must be float32, got ",
              grads.scalar_type());
  TORCH_CHECK(grads.is_contiguous(), "unscale_check_cpu: tensor must be contiguous");
  float* data = grads.data_ptr<float>();
  const float s = static_cast<float>(inv_scale);
  const int64_t n = grads.numel();
  std::atomic<uint32_t> found{0};
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    uint32_t bad = 0;
    for (int64_t i = begin; i < end; ++i) {
      const float v = data[i] * s;
      data[i] = v;
      bad |= nonfinite_bit(v);
    }
    if (bad) found.store(1, std::memory_order_relaxed);
  });
  return found.load() != 0;
}

}  // namespace gptpar
