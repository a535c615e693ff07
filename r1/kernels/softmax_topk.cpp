// Each row's `width` likeliest tokens under softmax(logits / temperature), and their
// probabilities, in descending order: what the top-k, top-p and min-p filters of r1/sampling.py
// look at before a sampled token is drawn.
//
// Why our own: PyTorch's path divides by the temperature, takes a softmax and a topk, three
// passes over a (B, 151936) float32 matrix, and topk's partial sort is a scalar loop. At R1's
// sampling settings that took 12 ms of a 16-sequence decode step (~140 ms) on two cores. Here
// each row is read twice: once for its maximum, once for the softmax's normalizer (with vexp)
// while a vector compare against the current `width`-th best value lets through only the few
// tokens that may join the candidates.
//
// Ties go to the lower token id. A NaN logit counts as -inf: it ranks last and has probability 0
// (PyTorch's softmax would make the whole row NaN), so a broken logit cannot break the sort.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

struct Candidate {
  float logit;  // NaN replaced by -inf
  int64_t id;
};

// Strict order, best first: higher logit, then lower id.
inline bool better(const Candidate& a, const Candidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

#if defined(__AVX512F__)
// Lanes of v that may hold a candidate: above the threshold, at it as well while `inclusive`
// (before the buffer first fills, so that -inf logits still count), and NaN.
inline uint32_t passing(Vec v, Vec threshold, bool inclusive) {
  return inclusive ? _mm512_cmp_ps_mask(v, threshold, _CMP_NLT_UQ) : _mm512_cmp_ps_mask(v, threshold, _CMP_NLE_UQ);
}
#else
inline uint32_t passing(Vec v, Vec threshold, bool inclusive) {
  const Vec pass = inclusive ? _mm256_cmp_ps(v, threshold, _CMP_NLT_UQ) : _mm256_cmp_ps(v, threshold, _CMP_NLE_UQ);
  return static_cast<uint32_t>(_mm256_movemask_ps(pass));
}
#endif

// Candidates a row's buffer holds before it is cut back to the best `width`.
inline size_t buffer_capacity(int64_t width) { return static_cast<size_t>(std::max<int64_t>(4 * width, 1024)); }

// One row: the `width` best candidates into values/ids (best first), as probabilities.
void row_topk(const float* logits, int64_t vocab, float temperature, int64_t width, float* values, int64_t* ids,
              std::vector<Candidate>& buffer) {
  Vec top = vset(-std::numeric_limits<float>::infinity());
  const int64_t whole = vocab / kLanes * kLanes;
  // vmax returns its second operand when either is NaN, so the running maximum stays a number.
  for (int64_t i = 0; i < whole; i += kLanes) top = vmax(vload(logits + i), top);
  float max_logit = vmax_lane(top);
  for (int64_t i = whole; i < vocab; ++i)
    if (logits[i] > max_logit) max_logit = logits[i];

  // A buffer of up to `capacity` candidates, cut back to the best `width` whenever it fills;
  // after the first cut only tokens better than the width-th best so far pass the compare.
  const size_t capacity = buffer_capacity(width);
  buffer.clear();
  float threshold = -std::numeric_limits<float>::infinity();
  bool inclusive = true;
  auto number = [](float x) { return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x; };
  auto add = [&](int64_t id) {
    buffer.push_back({number(logits[id]), id});
    if (buffer.size() == capacity) {
      std::nth_element(buffer.begin(), buffer.begin() + (width - 1), buffer.end(), better);
      buffer.resize(width);
      threshold = buffer[width - 1].logit;
      inclusive = false;
    }
  };

  const float inv_t = 1.f / temperature;
  const Vec scale = vset(inv_t), shift = vset(max_logit);
  Vec sum = vset(0.f);
  for (int64_t i = 0; i < whole; i += kLanes) {
    const Vec x = vload(logits + i);
    sum = vadd(sum, vexp(vmul(vsub(x, shift), scale)));  // vexp takes NaN to its floor, e^-87
    for (uint32_t mask = passing(x, vset(threshold), inclusive); mask; mask &= mask - 1) add(i + __builtin_ctz(mask));
  }
  float total = vsum(sum);
  for (int64_t i = whole; i < vocab; ++i) {
    const float x = number(logits[i]);
    total += std::exp(std::max((x - max_logit) * inv_t, -87.f));  // as vexp: its floor
    if (x > threshold || (inclusive && x == threshold)) add(i);
  }

  if (static_cast<int64_t>(buffer.size()) > width) {
    std::nth_element(buffer.begin(), buffer.begin() + (width - 1), buffer.end(), better);
    buffer.resize(width);
  }
  std::sort(buffer.begin(), buffer.end(), better);
  for (int64_t j = 0; j < width; ++j) {
    values[j] = std::exp((buffer[j].logit - max_logit) * inv_t) / total;
    ids[j] = buffer[j].id;
  }
}

// (values, ids), both (B, width): per row, softmax(logits / temperature)'s `width` largest
// probabilities in descending order and their columns. logits (B, V) float32, temperature (B,)
// float32 and positive.
std::tuple<at::Tensor, at::Tensor> softmax_topk(const at::Tensor& logits, const at::Tensor& temperature,
                                                int64_t width) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be contiguous (B, V) float32");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == rows && temperature.scalar_type() == at::kFloat &&
                  temperature.is_contiguous(),
              "temperature must be contiguous (B,) float32");
  TORCH_CHECK(width >= 1 && width <= vocab, "width must be in [1, V]");
  const float* t = temperature.const_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(t[r] > 0.f, "temperatures must be positive");
  auto values = at::empty({rows, width}, logits.options());
  auto ids = at::empty({rows, width}, logits.options().dtype(at::kLong));
  const float* lp = logits.const_data_ptr<float>();
  float* vp = values.mutable_data_ptr<float>();
  int64_t* ip = ids.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<Candidate> buffer;
    buffer.reserve(buffer_capacity(width));
    for (int64_t r = begin; r < end; ++r)
      row_topk(lp + r * vocab, vocab, t[r], width, vp + r * width, ip + r * width, buffer);
  });
  return {values, ids};
}

// (tokens (B,), settled (B,) bool): each row's draw among its candidates `values` (B, W),
// probabilities in descending order as softmax_topk gives them, and their `ids`, under top-p and
// min-p (per row; 1 and 0 turn them off), from its uniform number u (B,); and whether the row's
// kept tokens certainly all lie among the candidates (if not, the caller samples it over the
// whole vocabulary). One call for what r1/sampling.py's _filter_sorted and draw do in some thirty
// ops without top-k, with their arithmetic, so that both paths draw the same token: float32
// values, and cumulative sums accumulated in double as PyTorch's CPU cumsum does.
std::tuple<at::Tensor, at::Tensor> filter_draw(const at::Tensor& values, const at::Tensor& ids,
                                               const at::Tensor& top_p, const at::Tensor& min_p,
                                               const at::Tensor& u) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "values must be contiguous (B, W) float32");
  const int64_t rows = values.size(0), width = values.size(1);
  TORCH_CHECK(width >= 1, "values must hold at least one candidate a row");
  TORCH_CHECK(ids.sizes() == values.sizes() && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "ids must be contiguous (B, W) int64");
  for (const at::Tensor* x : {&top_p, &min_p, &u})
    TORCH_CHECK(x->dim() == 1 && x->size(0) == rows && x->scalar_type() == at::kFloat && x->is_contiguous(),
                "top_p, min_p and u must be contiguous (B,) float32");
  auto tokens = at::empty({rows}, ids.options());
  auto settled = at::empty({rows}, values.options().dtype(at::kBool));
  const float *vp = values.const_data_ptr<float>(), *pp = top_p.const_data_ptr<float>(),
              *mp = min_p.const_data_ptr<float>(), *up = u.const_data_ptr<float>();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  int64_t* tp = tokens.mutable_data_ptr<int64_t>();
  bool* sp = settled.mutable_data_ptr<bool>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> cdf(width);
    for (int64_t r = begin; r < end; ++r) {
      const float* v = vp + r * width;
      const float p = pp[r], m = mp[r], floor = m * v[0];
      const bool has_p = p < 1.f, has_m = m > 0.f;
      // The kept tokens' probabilities: a token is needed while those before it fall short of
      // top_p, and it must reach min_p's floor. Their cumulative sums make the draw's cdf.
      double seen = 0, kept_so_far = 0;
      float seen_total = 0;
      for (int64_t j = 0; j < width; ++j) {
        const float x = v[j] > 0.f ? v[j] : 0.f;
        seen += x;
        seen_total = static_cast<float>(seen);
        const bool keep = x > 0.f && (!has_p || seen_total - x < p) && (!has_m || v[j] >= floor);
        kept_so_far += keep ? x : 0.f;
        cdf[j] = static_cast<float>(kept_so_far);
      }
      sp[r] = (has_p && seen_total >= p) || (has_m && v[width - 1] < floor);
      const float target = (1.f - up[r]) * cdf[width - 1];
      const int64_t at = std::lower_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
      tp[r] = ip[r * width + std::min(at, width - 1)];
    }
  });
  return {tokens, settled};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1, m) {
  m.def("softmax_topk(Tensor logits, Tensor temperature, int width) -> (Tensor, Tensor)");
  m.impl("softmax_topk", c10::DispatchKey::CPU, TORCH_FN(softmax_topk));
  m.def("filter_draw(Tensor values, Tensor ids, Tensor top_p, Tensor min_p, Tensor u) -> (Tensor, Tensor)");
  m.impl("filter_draw", c10::DispatchKey::CPU, TORCH_FN(filter_draw));
}
