// Scalar float <-> bf16/fp16 conversions written so that loops using them auto-vectorise.
// bf16 rounding is round-to-nearest-even with NaN -> 0x7FC0, bit-identical to torch's .to(torch.bfloat16).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace gptpar {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// 1 if v is inf or nan (exponent all ones). Bit test instead of std::isfinite keeps the loop branch-free.
inline uint32_t nonfinite_bit(float v) { return (f32_bits(v) & 0x7f800000u) == 0x7f800000u; }

inline uint16_t f32_to_bf16_rne(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(rounded);
}

template <typename T> inline float to_f32(T v);
template <> inline float to_f32<float>(float v) { return v; }
template <> inline float to_f32<c10::BFloat16>(c10::BFloat16 v) { return bits_f32(uint32_t(v.x) << 16); }
template <> inline float to_f32<c10::Half>(c10::Half v) { return static_cast<float>(v); }

template <typename T> inline T from_f32(float v);
template <> inline float from_f32<float>(float v) { return v; }
template <> inline c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  return c10::BFloat16(f32_to_bf16_rne(v), c10::BFloat16::from_bits());
}
template <> inline c10::Half from_f32<c10::Half>(float v) { return c10::Half(v); }  // RNE (IEEE conversion)

}  // namespace gptpar
