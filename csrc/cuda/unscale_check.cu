// CUDA kernel: in-place unscale of fp32 gradients with a non-finite flag. Grid-stride loop,
// 16-byte (float4) vectorised loads on the aligned body, scalar tail.
#include <cuda_runtime.h>
#include "launchers.h"

namespace gptpar {
namespace cuda {

__device__ __forceinline__ int nonfinite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

__global__ void unscale_check_f32_kernel(float* __restrict__ data, int64_t n, float s, int* __restrict__ found_inf) {
  int bad = 0;
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t n4 = n / 4;
  float4* d4 = reinterpret_cast<float4*>(data);
  for (int64_t i = tid; i < n4; i += stride) {
    float4 v = d4[i];
    v.x *= s; v.y *= s; v.z *= s; v.w *= s;
    bad |= nonfinite(v.x) | nonfinite(v.y) | nonfinite(v.z) | nonfinite(v.w);
    d4[i] = v;
  }
  for (int64_t i = n4 * 4 + tid; i < n; i += stride) {
    const float v = data[i] * s;
    data[i] = v;
    bad |= nonfinite(v);
  }
  // One write per warp at most: the flag is only ever set, never cleared, so no atomics needed.
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) *found_inf = 1;
}

void launch_unscale_check_f32(float* data, int64_t n, float inv_scale, int* found_inf, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  int64_t blocks = (n / 4 + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535) blocks = 65535;
  unscale_check_f32_kernel<<<(unsigned)blocks, threads, 0, stream>>>(data, n, inv_scale, found_inf);
}

}  // namespace cuda
}  // namespace gptpar
