// The small elementwise steps of a decoder layer, one call each: RMSNorm fused with the residual
// add before it, and rotary embedding applied in place.
//
// Why our own: in eager PyTorch each is 5-7 ops on a 1536-float row, and each op costs a few
// microseconds of dispatch whatever its size; a decode step runs 57 norms and 28 rotations, so
// on two cores they took ~2.5 ms of a ~46 ms token. Here each is one call and one pass.
// float32 only (the CPU's dtype); r1/model/layers.py keeps the PyTorch forms for the rest.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace {

constexpr int64_t kRowsPerTask = 16;  // a decode step's few rows run on one thread

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm));
  m.def("rotary_(Tensor(a!) x, int heads, Tensor cos, Tensor sin) -> ()");
  m.impl("rotary_", c10::DispatchKey::CPU, TORCH_FN(rotary_));
}
