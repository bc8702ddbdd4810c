// Raw-pointer launchers for the CUDA kernels. Plain C++ signatures (no torch headers) so the .cu files
// compile with bare nvcc and the torch-facing bindings (bindings_cuda.cpp) compile without CUDA headers.
#pragma once
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace gptpar {
namespace cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Host arrays `srcs`/`numels` describe n tensors packed back to back into `dst` (dtype dst_dtype):
// dst = cast(src * scale (+ residual)); residual (fp32, optional) = value - float(cast).
void launch_pack_cast(const void* const* srcs, const int64_t* numels, int n, int src_dtype, void* dst, int dst_dtype,
                      float scale, float* residual, cudaStream_t stream);

// dsts[t] (fp32) += float(src[packed offset of t]) * scale.
void launch_unpack_accumulate(const void* src, int src_dtype, float* const* dsts, const int64_t* numels, int n,
                              float scale, cudaStream_t stream);

// grads[t] (fp32) *= inv_scale; *found_inf (device float) = 1 if any result is inf/nan (never cleared).
void launch_unscale_check(float* const* grads, const int64_t* numels, int n, float inv_scale, float* found_inf,
                          cudaStream_t stream);

// Fused AdamW on flat fp32 buffers of n elements; p_lowp (dtype lowp_dtype, may be null) gets the new params.
void launch_adamw(float* p, const float* g, float* m, float* v, int64_t n, float decay, float w1, float beta2, float w2,
                  float step_size, float bc2_sqrt, float eps, void* p_lowp, int lowp_dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace gptpar
