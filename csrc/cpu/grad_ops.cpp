// CPU kernels for the memory-bound steps around a gradient all-reduce and an optimizer step.
// Each op is one pass over memory: at::parallel_for (OpenMP) over chunks of a work list, plain loops the
// compiler vectorises, no temporaries. The arithmetic is the reference's, operation for operation, so
// results are bitwise equal to gptpar.ops' pure-torch reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"

namespace gptpar {
namespace {

constexpr int64_t kChunk = 1 << 16;

// A slice [begin, end) of tensor `t`, whose elements sit at `flat + begin` in the packed buffer.
struct Span {
  int64_t t, begin, end, flat;
};

std::vector<Span> make_spans(const std::vector<int64_t>& numels) {
  std::vector<Span> spans;
  int64_t flat = 0;
  for (int64_t t = 0; t < (int64_t)numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) spans.push_back({t, b, std::min(b + kChunk, numels[t]), flat + b});
    flat += numels[t];
  }
  return spans;
}

void check_cpu_contig(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, ": expected a contiguous tensor");
}

bool low_or_f32(at::ScalarType s) { return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf; }

#define GPTPAR_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                   \
  [&] {                                                                                \
    switch (TYPE) {                                                                    \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }                   \
      case at::kBFloat16: { using NAME = c10::BFloat16; return __VA_ARGS__(); }        \
      case at::kHalf: { using NAME = c10::Half; return __VA_ARGS__(); }                \
      default: TORCH_CHECK(false, "unsupported dtype ", TYPE, " (expected float32, bfloat16 or float16)"); \
    }                                                                                  \
  }()

// The loops live in functions taking __restrict__ pointers and scalars by value: inside a lambda that
// captures by reference, a store through float* may alias a captured float, which blocks vectorisation.
template <typename Src, typename Dst>
void pack_range(const Src* __restrict__ in, Dst* __restrict__ o, float* __restrict__ r, int64_t n, float s) {
  if (r) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = to_f32(in[i]) * s + r[i];
      const Dst q = from_f32<Dst>(v);
      o[i] = q;
      r[i] = v - to_f32(q);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = from_f32<Dst>(to_f32(in[i]) * s);
  }
}

template <typename Src>
void unpack_range(const Src* __restrict__ x, float* __restrict__ o, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) o[i] = o[i] + to_f32(x[i]) * s;
}

uint32_t unscale_range(float* __restrict__ p, int64_t n, float s) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = p[i] * s;
    p[i] = v;
    bad |= nonfinite_bit(v);
  }
  return bad;
}

struct AdamScalars {
  float decay, w1, b2, w2, step_size, bc2_sqrt, eps;
};

template <typename Low>
void adamw_range(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                 Low* __restrict__ low, int64_t n, const AdamScalars c) {
  const float decay = c.decay, w1 = c.w1, b2 = c.b2, w2 = c.w2, neg_step = -c.step_size, bc2_sqrt = c.bc2_sqrt, e = c.eps;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float pi = p[i] * decay;
    const float mi = m[i] + w1 * (gi - m[i]);
    const float vi = v[i] * b2 + w2 * gi * gi;
    const float denom = std::sqrt(vi) / bc2_sqrt + e;
    const float pn = pi + neg_step * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    p[i] = pn;
    if constexpr (!std::is_same_v<Low, float>) low[i] = from_f32<Low>(pn);
  }
}

}  // namespace

// dst[flat] = cast(src * scale (+ residual)); residual = that value - float(cast). One pass.
void pack_cast_cpu(const std::vector<at::Tensor>& srcs, at::Tensor dst, double scale, c10::optional<at::Tensor> residual) {
  check_cpu_contig(dst, "pack_cast dst");
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (const auto& s : srcs) {
    check_cpu_contig(s, "pack_cast src");
    TORCH_CHECK(s.scalar_type() == srcs[0].scalar_type(), "pack_cast: all sources must share one dtype");
    numels.push_back(s.numel());
    total += s.numel();
  }
  TORCH_CHECK(dst.numel() == total, "pack_cast: dst has ", dst.numel(), " elements, sources have ", total);
  TORCH_CHECK(low_or_f32(dst.scalar_type()), "pack_cast: unsupported dst dtype ", dst.scalar_type());
  float* res = nullptr;
  if (residual.has_value()) {
    check_cpu_contig(*residual, "pack_cast residual");
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->numel() == total,
                "pack_cast: residual must be float32 with ", total, " elements");
    res = residual->data_ptr<float>();
  }
  if (srcs.empty() || total == 0) return;
  const auto spans = make_spans(numels);
  const float s = static_cast<float>(scale);
  GPTPAR_DISPATCH_FLOAT_TYPES(srcs[0].scalar_type(), Src, [&] {
    GPTPAR_DISPATCH_FLOAT_TYPES(dst.scalar_type(), Dst, [&] {
      Dst* out = reinterpret_cast<Dst*>(dst.data_ptr());
      std::vector<const Src*> ptrs;
      for (const auto& t : srcs) ptrs.push_back(reinterpret_cast<const Src*>(t.data_ptr()));
      at::parallel_for(0, (int64_t)spans.size(), 1, [&](int64_t a, int64_t b) {
        for (int64_t k = a; k < b; ++k) {
          const Span sp = spans[k];
          pack_range(ptrs[sp.t] + sp.begin, out + sp.flat, res ? res + sp.flat : nullptr, sp.end - sp.begin, s);
        }
      });
    });
  });
}

// dsts[t] += float(src[flat]) * scale. One pass.
void unpack_accumulate_cpu(at::Tensor src, const std::vector<at::Tensor>& dsts, double scale) {
  check_cpu_contig(src, "unpack_accumulate src");
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (const auto& d : dsts) {
    check_cpu_contig(d, "unpack_accumulate dst");
    TORCH_CHECK(d.scalar_type() == at::kFloat, "unpack_accumulate: destinations must be float32, got ", d.scalar_type());
    numels.push_back(d.numel());
    total += d.numel();
  }
  TORCH_CHECK(src.numel() == total, "unpack_accumulate: src has ", src.numel(), " elements, destinations have ", total);
  if (total == 0) return;
  const auto spans = make_spans(numels);
  const float s = static_cast<float>(scale);
  GPTPAR_DISPATCH_FLOAT_TYPES(src.scalar_type(), Src, [&] {
    const Src* in = reinterpret_cast<const Src*>(src.data_ptr());
    std::vector<float*> ptrs;
    for (const auto& d : dsts) ptrs.push_back(d.data_ptr<float>());
    at::parallel_for(0, (int64_t)spans.size(), 1, [&](int64_t a, int64_t b) {
      for (int64_t k = a; k < b; ++k) {
        const Span sp = spans[k];
        unpack_range(in + sp.flat, ptrs[sp.t] + sp.begin, sp.end - sp.begin, s);
      }
    });
  });
}

// grads[t] *= inv_scale; found_inf[0] = 1 if any result is inf/nan (never cleared here).
void unscale_check_cpu(const std::vector<at::Tensor>& grads, double inv_scale, at::Tensor found_inf) {
  check_cpu_contig(found_inf, "unscale_check found_inf");
  TORCH_CHECK(found_inf.scalar_type() == at::kFloat && found_inf.numel() == 1, "unscale_check: found_inf must be a 1-element float32 tensor");
  std::vector<int64_t> numels;
  std::vector<float*> ptrs;
  for (const auto& g : grads) {
    check_cpu_contig(g, "unscale_check grad");
    TORCH_CHECK(g.scalar_type() == at::kFloat, "unscale_check: grads must be float32, got ", g.scalar_type());
    numels.push_back(g.numel());
    ptrs.push_back(g.data_ptr<float>());
  }
  const auto spans = make_spans(numels);
  const float s = static_cast<float>(inv_scale);
  std::atomic<uint32_t> found{0};
  at::parallel_for(0, (int64_t)spans.size(), 1, [&](int64_t a, int64_t b) {
    uint32_t bad = 0;
    for (int64_t k = a; k < b; ++k) bad |= unscale_range(ptrs[spans[k].t] + spans[k].begin, spans[k].end - spans[k].begin, s);
    if (bad) found.store(1, std::memory_order_relaxed);
  });
  if (found.load()) found_inf.fill_(1.0);
}

// Fused AdamW on flat fp32 buffers, torch.optim.AdamW's arithmetic; optionally writes a bf16/fp16 copy.
void adamw_step_cpu(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, double lr,
                    double beta1, double beta2, double eps, double weight_decay, int64_t step,
                    c10::optional<at::Tensor> param_lowp) {
  for (auto* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    check_cpu_contig(*t, "adamw_step");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "adamw_step: params, grads and moments must be float32");
    TORCH_CHECK(t->numel() == param.numel(), "adamw_step: all buffers must have ", param.numel(), " elements");
  }
  TORCH_CHECK(step >= 1, "adamw_step: step must be >= 1 (it counts this update), got ", step);
  const int64_t n = param.numel();
  const double bc1 = 1.0 - std::pow(beta1, (double)step), bc2 = 1.0 - std::pow(beta2, (double)step);
  const AdamScalars c{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2), static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)),
                      static_cast<float>(eps)};
  float *p = param.data_ptr<float>(), *m = exp_avg.data_ptr<float>(), *v = exp_avg_sq.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  auto run = [&](auto* low) {  // low: the bf16/fp16 copy, or (float*)nullptr for none
    at::parallel_for(0, n, kChunk, [&](int64_t a, int64_t b) {
      adamw_range(p + a, g + a, m + a, v + a, low ? low + a : low, b - a, c);
    });
  };
  if (!param_lowp.has_value()) {
    run(static_cast<float*>(nullptr));
    return;
  }
  check_cpu_contig(*param_lowp, "adamw_step param_lowp");
  TORCH_CHECK(param_lowp->numel() == n, "adamw_step: param_lowp must have ", n, " elements");
  if (param_lowp->scalar_type() == at::kBFloat16) run(reinterpret_cast<c10::BFloat16*>(param_lowp->data_ptr()));
  else if (param_lowp->scalar_type() == at::kHalf) run(reinterpret_cast<c10::Half*>(param_lowp->data_ptr()));
  else TORCH_CHECK(false, "adamw_step: param_lowp must be bfloat16 or float16, got ", param_lowp->scalar_type());
}

}  // namespace gptpar
