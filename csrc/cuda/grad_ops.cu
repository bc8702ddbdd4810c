// CUDA kernels for the gradient pack/cast, unpack-accumulate, unscale-check and fused AdamW.
// Multi-tensor ops use a multi-tensor-apply launch: a by-value table maps each block to (tensor, chunk),
// so many small tensors cost one launch per table, not one each. Blocks whose pointers are 16-byte
// aligned use vectorised loads (float4 / 4 x 16-bit); others, and tails, take the scalar path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace gptpar {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 16;
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;

struct TensorTable {
  const void* ptr[kMaxTensors];  // per tensor: its own storage
  int64_t numel[kMaxTensors];
  int64_t flat[kMaxTensors];  // its offset in the packed buffer
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }

template <typename T> __device__ __forceinline__ T cvt(float v);
template <> __device__ __forceinline__ float cvt<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half cvt<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ int nonfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 4 consecutive elements starting at element 4*j, as one 16-byte (fp32) or 8-byte (16-bit) access.
template <typename T>
__device__ __forceinline__ bool aligned4(const T* p) { return (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0; }

__device__ __forceinline__ void load4(const float* p, int64_t j, float v[4]) {
  const float4 x = reinterpret_cast<const float4*>(p)[j];
  v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
}
template <typename T>
__device__ __forceinline__ void load4(const T* p, int64_t j, float v[4]) {
  union { uint2 raw; T h[4]; } u;
  u.raw = reinterpret_cast<const uint2*>(p)[j];
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = ld(u.h, k);
}
__device__ __forceinline__ void store4(float* p, int64_t j, const float q[4]) {
  reinterpret_cast<float4*>(p)[j] = make_float4(q[0], q[1], q[2], q[3]);
}
template <typename T>
__device__ __forceinline__ void store4(T* p, int64_t j, const T q[4]) {
  union { uint2 raw; T h[4]; } u;
#pragma unroll
  for (int k = 0; k < 4; ++k) u.h[k] = q[k];
  reinterpret_cast<uint2*>(p)[j] = u.raw;
}

// ------------------------------------------------------------------------------------------- pack_cast
template <typename Src, typename Dst>
__global__ void pack_cast_kernel(TensorTable tab, Dst* __restrict__ dst, float s, float* __restrict__ res) {
  const int t = tab.block_tensor[blockIdx.x];
  const int64_t begin = (int64_t)tab.block_chunk[blockIdx.x] * kChunk;
  const int64_t n = min(kChunk, tab.numel[t] - begin);
  const Src* in = static_cast<const Src*>(tab.ptr[t]) + begin;
  Dst* out = dst + tab.flat[t] + begin;
  float* r = res ? res + tab.flat[t] + begin : nullptr;
  int64_t i0 = 0;
  // Vector path: 4 elements per thread per step when every stream is 16-byte aligned for 4 elements.
  if (aligned4(in) && aligned4(out) && (!r || aligned16(r))) {
    const int64_t n4 = n / 4;
    for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
      float v[4];
      load4(in, j, v);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] *= s;
      if (r) {
        float4 rv = reinterpret_cast<float4*>(r)[j];
        v[0] += rv.x; v[1] += rv.y; v[2] += rv.z; v[3] += rv.w;
      }
      Dst q[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) q[k] = cvt<Dst>(v[k]);
      if (r) {
        float4 rn = make_float4(v[0] - ld(q, 0), v[1] - ld(q, 1), v[2] - ld(q, 2), v[3] - ld(q, 3));
        reinterpret_cast<float4*>(r)[j] = rn;
      }
      store4(out, j, q);
    }
    i0 = n4 * 4;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) {
    float v = ld(in, i) * s;
    if (r) v += r[i];
    const Dst q = cvt<Dst>(v);
    out[i] = q;
    if (r) r[i] = v - ld(&q, 0);
  }
}

// ------------------------------------------------------------------------------------------- unpack
template <typename Src>
__global__ void unpack_accumulate_kernel(TensorTable tab, const Src* __restrict__ src, float s) {
  const int t = tab.block_tensor[blockIdx.x];
  const int64_t begin = (int64_t)tab.block_chunk[blockIdx.x] * kChunk;
  const int64_t n = min(kChunk, tab.numel[t] - begin);
  float* out = const_cast<float*>(static_cast<const float*>(tab.ptr[t])) + begin;
  const Src* in = src + tab.flat[t] + begin;
  int64_t i0 = 0;
  if (aligned16(out) && aligned4(in)) {
    const int64_t n4 = n / 4;
    for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
      float x[4];
      load4(in, j, x);
      float4 o = reinterpret_cast<float4*>(out)[j];
      o.x += x[0] * s;
      o.y += x[1] * s;
      o.z += x[2] * s;
      o.w += x[3] * s;
      reinterpret_cast<float4*>(out)[j] = o;
    }
    i0 = n4 * 4;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) out[i] += ld(in, i) * s;
}

// ------------------------------------------------------------------------------------------- unscale
__global__ void unscale_check_kernel(TensorTable tab, float s, float* __restrict__ found_inf) {
  const int t = tab.block_tensor[blockIdx.x];
  const int64_t begin = (int64_t)tab.block_chunk[blockIdx.x] * kChunk;
  const int64_t n = min(kChunk, tab.numel[t] - begin);
  float* p = const_cast<float*>(static_cast<const float*>(tab.ptr[t])) + begin;
  int bad = 0;
  int64_t i0 = 0;
  if (aligned16(p)) {
    const int64_t n4 = n / 4;
    for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
      float4 v = reinterpret_cast<float4*>(p)[j];
      v.x *= s; v.y *= s; v.z *= s; v.w *= s;
      bad |= nonfinite(v.x) | nonfinite(v.y) | nonfinite(v.z) | nonfinite(v.w);
      reinterpret_cast<float4*>(p)[j] = v;
    }
    i0 = n4 * 4;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) {
    const float v = p[i] * s;
    p[i] = v;
    bad |= nonfinite(v);
  }
  // The flag is only ever set, never cleared, so a plain store from any warp that saw a bad value is safe.
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) *found_inf = 1.0f;
}

// ------------------------------------------------------------------------------------------- adamw
template <typename Low>
__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, int64_t n, float decay, float w1, float b2, float w2,
                             float step_size, float bc2_sqrt, float eps, Low* __restrict__ low) {
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float gi = g[i];
    const float pi = p[i] * decay;
    const float mi = m[i] + w1 * (gi - m[i]);
    const float vi = v[i] * b2 + w2 * gi * gi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    const float pn = pi + (-step_size) * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    p[i] = pn;
    if (low) low[i] = cvt<Low>(pn);
  }
}

// Fill tables of up to kMaxTensors tensors / kMaxBlocks chunks and launch `launch(table, nblocks)` per table.
template <typename Launch>
void for_each_table(const void* const* ptrs, const int64_t* numels, int n, Launch launch) {
  TensorTable tab;
  int nt = 0, nb = 0;
  int64_t flat = 0;
  for (int t = 0; t < n; ++t) {
    const int64_t chunks = (numels[t] + kChunk - 1) / kChunk;
    if (chunks == 0) continue;
    tab.ptr[nt] = ptrs[t];
    tab.numel[nt] = numels[t];
    tab.flat[nt] = flat;
    for (int64_t c = 0; c < chunks; ++c) {
      tab.block_tensor[nb] = (unsigned char)nt;
      tab.block_chunk[nb] = (int)c;
      ++nb;
      const bool blocks_full = nb == kMaxBlocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks_full || (last_chunk && nt + 1 == kMaxTensors)) {
        launch(tab, nb);
        nb = 0;
        if (!last_chunk) {  // the tensor continues in the next table, in slot 0
          tab.ptr[0] = tab.ptr[nt];
          tab.numel[0] = tab.numel[nt];
          tab.flat[0] = tab.flat[nt];
          nt = 0;
        } else {
          nt = -1;
        }
      }
    }
    ++nt;
    flat += numels[t];
  }
  if (nb > 0) launch(tab, nb);
}

template <typename Src, typename Dst>
void pack_cast_typed(const void* const* srcs, const int64_t* numels, int n, void* dst, float s, float* res,
                     cudaStream_t stream) {
  for_each_table(srcs, numels, n, [&](const TensorTable& tab, int nb) {
    pack_cast_kernel<Src, Dst><<<nb, kThreads, 0, stream>>>(tab, static_cast<Dst*>(dst), s, res);
  });
}

}  // namespace

void launch_pack_cast(const void* const* srcs, const int64_t* numels, int n, int src_dtype, void* dst, int dst_dtype,
                      float scale, float* residual, cudaStream_t stream) {
#define GPTPAR_PACK(S, D) pack_cast_typed<S, D>(srcs, numels, n, dst, scale, residual, stream)
#define GPTPAR_PACK_DST(S)                                   \
  switch (dst_dtype) {                                       \
    case kF32: GPTPAR_PACK(S, float); break;                 \
    case kBF16: GPTPAR_PACK(S, __nv_bfloat16); break;        \
    default: GPTPAR_PACK(S, __half); break;                  \
  }
  switch (src_dtype) {
    case kF32: GPTPAR_PACK_DST(float); break;
    case kBF16: GPTPAR_PACK_DST(__nv_bfloat16); break;
    default: GPTPAR_PACK_DST(__half); break;
  }
#undef GPTPAR_PACK_DST
#undef GPTPAR_PACK
}

void launch_unpack_accumulate(const void* src, int src_dtype, float* const* dsts, const int64_t* numels, int n,
                              float scale, cudaStream_t stream) {
  for_each_table(reinterpret_cast<const void* const*>(dsts), numels, n, [&](const TensorTable& tab, int nb) {
    switch (src_dtype) {
      case kF32: unpack_accumulate_kernel<<<nb, kThreads, 0, stream>>>(tab, static_cast<const float*>(src), scale); break;
      case kBF16: unpack_accumulate_kernel<<<nb, kThreads, 0, stream>>>(tab, static_cast<const __nv_bfloat16*>(src), scale); break;
      default: unpack_accumulate_kernel<<<nb, kThreads, 0, stream>>>(tab, static_cast<const __half*>(src), scale); break;
    }
  });
}

void launch_unscale_check(float* const* grads, const int64_t* numels, int n, float inv_scale, float* found_inf,
                          cudaStream_t stream) {
  for_each_table(reinterpret_cast<const void* const*>(grads), numels, n, [&](const TensorTable& tab, int nb) {
    unscale_check_kernel<<<nb, kThreads, 0, stream>>>(tab, inv_scale, found_inf);
  });
}

void launch_adamw(float* p, const float* g, float* m, float* v, int64_t n, float decay, float w1, float beta2, float w2,
                  float step_size, float bc2_sqrt, float eps, void* p_lowp, int lowp_dtype, cudaStream_t stream) {
  if (n == 0) return;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 8192) blocks = 8192;  // grid-stride beyond this
  if (p_lowp == nullptr) {
    adamw_kernel<float><<<(unsigned)blocks, kThreads, 0, stream>>>(p, g, m, v, n, decay, w1, beta2, w2, step_size, bc2_sqrt, eps, nullptr);
  } else if (lowp_dtype == kBF16) {
    adamw_kernel<__nv_bfloat16><<<(unsigned)blocks, kThreads, 0, stream>>>(p, g, m, v, n, decay, w1, beta2, w2, step_size, bc2_sqrt, eps, static_cast<__nv_bfloat16*>(p_lowp));
  } else {
    adamw_kernel<__half><<<(unsigned)blocks, kThreads, 0, stream>>>(p, g, m, v, n, decay, w1, beta2, w2, step_size, bc2_sqrt, eps, static_cast<__half*>(p_lowp));
  }
}

}  // namespace cuda
}  // namespace gptpar
