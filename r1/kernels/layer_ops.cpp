// The small elementwise steps of a decoder layer, one call each: RMSNorm fused with the residual
// add before it, rotary embedding applied in place, the new keys and values quantized into an
// int8 KV cache, and SwiGLU's silu(gate) * up.
//
// Why our own: in eager PyTorch each is 5-10 ops on a few rows, and each op costs a few
// microseconds of dispatch whatever its size; a decode step runs 57 norms, 28 rotations and 28
// cache writes, so on two cores the norms and rotations took ~2.5 ms of a ~46 ms token and the
// int8 writes ~3.8 ms; PyTorch's silu and mul_ took 3.9 ms of a 16-sequence step. Here each is one
// call and one pass. float32 only (the CPU's dtype); r1/model/layers.py and attention.py keep the
// PyTorch forms for the rest.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "vec.h"
#include "ops.h"

namespace {

constexpr int64_t kRowsPerTask = 16;  // a decode step's few rows run on one thread

}  // namespace

namespace r1_ops {

// (normed, sum): sum = x + residual (a copy of x without one), normed = sum / rms(sum) * weight,
// both (N, H) float32; HF's Qwen2RMSNorm in float32.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous (N, H) float32");
  TORCH_CHECK(!residual || (residual->sizes() == x.sizes() && residual->scalar_type() == at::kFloat &&
                            residual->is_contiguous()),
              "residual must be contiguous float32 of x's shape");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "weight must be contiguous (H,) float32");
  const int64_t n = x.size(0), h = x.size(1);
  auto normed = at::empty_like(x), sum = residual ? at::empty_like(x) : x.clone();
  const float* xp = x.const_data_ptr<float>();
  const float* rp = residual ? residual->const_data_ptr<float>() : nullptr;
  const float* wp = weight.const_data_ptr<float>();
  float* np = normed.mutable_data_ptr<float>();
  float* sp = residual ? sum.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * h;
      if (rp) {
        float* out = sp + r * h;
        const float* res = rp + r * h;
#pragma omp simd
        for (int64_t i = 0; i < h; ++i) out[i] = row[i] + res[i];
        row = out;
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < h; ++i) squares += row[i] * row[i];
      const float inv = 1.f / std::sqrt(squares / h + static_cast<float>(eps));
      float* out = np + r * h;
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) out[i] = wp[i] * (row[i] * inv);
    }
  });
  return {normed, sum};
}

// Rotate the first `heads` heads of each token in x (N, total heads, head_dim) in place by the
// half-split (NeoX) convention, with cos and sin (N, head_dim / 2) float32.
void rotary_(const at::Tensor& x, int64_t heads, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be contiguous (N, heads, head_dim) float32");
  const int64_t n = x.size(0), stride = x.size(1) * x.size(2), half = x.size(2) / 2;
  TORCH_CHECK(heads >= 0 && heads <= x.size(1) && x.size(2) % 2 == 0, "bad head count or odd head_dim");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == half && t->scalar_type() == at::kFloat &&
                    t->is_contiguous(),
                "cos and sin must be contiguous (N, head_dim / 2) float32");
  float* xp = x.mutable_data_ptr<float>();
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * half;
      const float* s = sp + t * half;
      for (int64_t j = 0; j < heads; ++j) {
        float* lo = xp + t * stride + j * 2 * half;
        float* hi = lo + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = lo[i], b = hi[i];
          lo[i] = a * c[i] - b * s[i];
          hi[i] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

// Store the new keys and values k, v (N, kv_heads, head_dim) float32 (rows of any stride) at
// their slots (N,) of an int8 cache: values (2, slots, kv_heads, head_dim) int8 and scales (2,
// slots, kv_heads) float32, each (token, kv head) vector as levels of its own scale max|x| / 127
// (at least 1e-12 / 127), as r1/model/attention.py's write_kv does in PyTorch.
void write_kv_int8_(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, const at::Tensor& values,
                    const at::Tensor& scales) {
  TORCH_CHECK(values.dim() == 4 && values.size(0) == 2 && values.scalar_type() == at::kChar && values.is_contiguous(),
              "values must be contiguous (2, slots, kv_heads, head_dim) int8");
  const int64_t num_slots = values.size(1), kv_heads = values.size(2), head_dim = values.size(3);
  TORCH_CHECK(head_dim % kLanes == 0, "head_dim must be a multiple of ", kLanes);
  TORCH_CHECK(scales.sizes() == values.sizes().slice(0, 3) && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous(),
              "scales must be contiguous (2, slots, kv_heads) float32");
  const int64_t n = slots.size(0);
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == n && t->size(1) == kv_heads && t->size(2) == head_dim &&
                    t->scalar_type() == at::kFloat && t->stride(2) == 1 && t->stride(1) == head_dim,
                "k and v must be (N, kv_heads, head_dim) float32, each token's heads contiguous");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(), "slot_mapping must be (N,) int64");
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot ", sp[t], " is outside the cache's ", num_slots);
  int8_t* levels = values.mutable_data_ptr<int8_t>();
  float* scale = scales.mutable_data_ptr<float>();
  at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t which = 0; which < 2; ++which) {
        const at::Tensor& x = which ? v : k;
        for (int64_t h = 0; h < kv_heads; ++h) {
          const int64_t row = (which * num_slots + sp[t]) * kv_heads + h;
          const float* src = x.const_data_ptr<float>() + t * x.stride(0) + h * head_dim;
          scale[row] = std::max(quantize_int8(src, head_dim, levels + row * head_dim), 1e-12f / 127);
        }
      }
  });
}

// silu(gate) * up for (N, 2I) float32 gate_up, gate in the first I columns: (N, I).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat && gate_up.is_contiguous() &&
                  gate_up.size(1) % 2 == 0,
              "gate_up must be contiguous (N, 2I) float32");
  const int64_t n = gate_up.size(0), width = gate_up.size(1) / 2, whole = width / kLanes * kLanes;
  auto out = at::empty({n, width}, gate_up.options());
  const float* in = gate_up.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  // Rows in tasks of ~64K values: a decode step's few rows on one thread, a prefill chunk's on all.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = in + r * 2 * width;
      const float* up = gate + width;
      float* o = op + r * width;
      for (int64_t i = 0; i < whole; i += kLanes) {
        // g / (1 + e^-g), with g >= -87 so that e^-g stays a float: below, silu is within 1.4e-36 of 0.
        const Vec g = vmax(vload(gate + i), vset(-87.f));
        const Vec silu = vdiv(g, vadd(vset(1.f), vexp(vsub(vset(0.f), g))));
        vstore(o + i, vmul(silu, vload(up + i)));
      }
      for (int64_t i = whole; i < width; ++i) {
        const float g = std::max(gate[i], -87.f);
        o[i] = g / (1.f + std::exp(-g)) * up[i];
      }
    }
  });
  return out;
}

}  // namespace r1_ops

TORCH_LIBRARY_FRAGMENT(r1, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(r1_ops::add_rms_norm));
  m.def("rotary_(Tensor(a!) x, int heads, Tensor cos, Tensor sin) -> ()");
  m.impl("rotary_", c10::DispatchKey::CPU, TORCH_FN(r1_ops::rotary_));
  m.def("write_kv_int8_(Tensor k, Tensor v, Tensor slot_mapping, Tensor(a!) values, Tensor(b!) scales) -> ()");
  m.impl("write_kv_int8_", c10::DispatchKey::CPU, TORCH_FN(r1_ops::write_kv_int8_));
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(r1_ops::silu_mul));
}
