// Raw-pointer launchers for the CUDA kernels. Plain C++ signatures (no torch headers) so the .cu
// files compile with bare nvcc, and the torch-facing bindings live in .cpp files.
#pragma once
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace gptpar {
namespace cuda {

// data[i] *= inv_scale for i < n; sets *found_inf (device int) to 1 if any result is inf/nan.
// found_inf must be zeroed by the caller; the kernel only ever writes 1 into it.
void launch_unscale_check_f32(float* data, int64_t n, float inv_scale, int* found_inf, cudaStream_t stream);

}  // namespace cuda
}  // namespace gptpar
