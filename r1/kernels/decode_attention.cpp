// Attention of one-token queries to their sequences' paged KV caches, read where they lie: the
// kernel behind a decode step's attention on the CPU.
//
// Why our own: in PyTorch the cached keys and values must first be gathered out of their
// blocks into one tensor (a copy of the whole context per layer), then go through per-head
// matmuls, a mask and a softmax; at 500 cached tokens that was ~8 ms of a ~65 ms token on two
// cores. Here each sequence's blocks are read where they lie, in spans that run on different
// threads (flash-decoding's split), once for the scores and once for the weighted values, all
// query heads of a kv head (GQA) sharing each load ("one span", below, says how).
//
// Layouts: q (D, heads, head_dim) float32; keys and values (num_blocks, block_size, kv_heads,
// head_dim), float32, bf16 (half the bytes to read: a decode step's attention is bound by them),
// or int8 with float32 scales (num_blocks, block_size, kv_heads) that multiply each (token, kv
// head) vector; block_tables (D, max_blocks) int64, seq_lens (D,) int64.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <utility>
#include <optional>
#include <vector>

#include <immintrin.h>

#include "vec.h"
#include "ops.h"

namespace {

constexpr int64_t kMinSpanBlocks = 4;  // a span shorter than this costs more to merge than it saves

// row[i] = e^(row[i] - max row) for i < len; returns that max and the sum of the new values.
// Whole vectors, then the last len % kLanes one by one.
inline std::pair<float, float> exp_shifted(float* row, int64_t len) {
  const int64_t whole = len - len % kLanes;
  float max = -std::numeric_limits<float>::infinity();
  if (whole) {
    Vec top = vload(row);
    for (int64_t i = kLanes; i < whole; i += kLanes) top = vmax(top, vload(row + i));
    max = vmax_lane(top);
  }
  for (int64_t i = whole; i < len; ++i) max = std::max(max, row[i]);
  Vec total = vset(0.f);
  for (int64_t i = 0; i < whole; i += kLanes) {
    const Vec e = vexp(vsub(vload(row + i), vset(max)));
    vstore(row + i, e);
    total = vadd(total, e);
  }
  float sum = vsum(total);
  for (int64_t i = whole; i < len; ++i) sum += (row[i] = std::exp(row[i] - max));
  return {max, sum};
}

// out += weight * v, head_dim floats: merging the spans' partial sums.
inline void add_scaled(float weight, const float* v, float* out, int64_t head_dim) {
  const Vec w = vset(weight);
  for (int64_t i = 0; i < head_dim; i += kLanes) vstore(out + i, vfma(w, vload(v + i), vload(out + i)));
}

template <typename T>  // int8 or bf16
inline void to_float(const T* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) vstore(out + i, vload(x + i));
}

// ---- one span ---------------------------------------------------------------------------------
// A span is worked on in two passes over its tokens' cache rows, scores and then weighted values,
// each shaped so that arithmetic binds as little as it can. Against a dot product and a weighted
// add per token and query head, which this replaced (2 cores, R1's heads, 28 layers, min of 8
// alternating runs, the blocks shuffled as a busy engine's free list leaves them: float32 16K
// cached tokens 103 -> 62 ms, 16 x 512 48 -> 32 ms, the same in blocks that lie in order;
// int8 on VNNI 16K 53 -> 34 ms, 16 x 512 19.6 -> 14.3 ms):
// - scores come kLanes tokens at a time per query head, their dot products finished together by
//   one vsum_each, a third of the operations of a sum each; an int8 cache on VNNI multiplies its
//   keys by the queries quantized to int8 (Int8Queries), 64 products a vpdpbusd;
// - each value vector is loaded (and widened) once for all the query heads of its kv head, whose
//   sums stay in registers across kValueTokens tokens;
// - the rows kPrefetchTokens ahead are asked for (into L2) while the current ones are worked on:
//   a sequence's blocks lie anywhere, where the hardware prefetcher does not follow.

constexpr int64_t kPrefetchTokens = 32;
// Tokens that one round of add_values passes reads (every kv head of each: they share cache
// lines), and that it asks for next: kPrefetchTokens ahead, the next round.
constexpr int64_t kValueTokens = kPrefetchTokens;
// The query heads whose value sums one add_values pass holds: 6 heads x 2 vectors are 12
// accumulators, which leaves room in AVX2's 16 registers for the values and a weight.
constexpr int kMaxPassHeads = 6;

// Both are forced inline: called in the hot loops and left as calls, they cost 25% (measured).
template <typename T>
[[gnu::always_inline]] inline void prefetch_row(const T* cache, int64_t row, int64_t head_dim) {
  const char* p = reinterpret_cast<const char*>(cache + row * head_dim);
  for (int64_t b = 0; b < head_dim * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

// Query head k of a kv head's `group` asks for its share of that kv head's keys (row rows[t] + h)
// for the kLanes tokens kPrefetchTokens past t0: spread over the group's work, the requests
// overlap it, where asked for at once they stalled the core (float32: 128 lines a chunk).
template <typename T>
[[gnu::always_inline]] inline void prefetch_share(const T* keys, const int64_t* rows, int64_t t0, int64_t len,
                                                  int64_t h, int64_t k, int64_t group, int64_t head_dim) {
  const int64_t ahead = t0 + kPrefetchTokens;
  for (int64_t j = k * kLanes / group; j < (k + 1) * kLanes / group && ahead + j < len; ++j)
    prefetch_row(keys, rows[ahead + j] + h, head_dim);
}

// scores[g][t] = scale * (q_g . k_t) for every query head g and the span's tokens t < len, the
// keys of token t at row rows[t] + h for kv head h (rows[t]: kv head 0's). int8 and bf16 keys are
// widened to float once into `stage` (kLanes x head_dim) for all the query heads that share
// them; int8's scales are the caller's to apply.
template <typename T>
void span_scores(const float* q, const T* keys, const int64_t* rows, int64_t len, int64_t kv_heads, int64_t group,
                 int64_t head_dim, float scale, float* stage, float* scores) {
  for (int64_t t0 = 0; t0 < len; t0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, len - t0);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float* key[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) {  // past the span's end: its last key again, its score dropped
        const T* row = keys + (rows[t0 + std::min(j, n - 1)] + h) * head_dim;
        if constexpr (std::is_same_v<T, float>) {
          key[j] = row;
        } else {
          if (j < n) to_float(row, stage + j * head_dim, head_dim);
          key[j] = stage + std::min(j, n - 1) * head_dim;
        }
      }
      for (int64_t g = h * group; g < (h + 1) * group; ++g) {
        prefetch_share(keys, rows, t0, len, h, g - h * group, group, head_dim);
        const float* qg = q + g * head_dim;
        Vec dots[kLanes];
        for (int64_t j = 0; j < kLanes; ++j) {  // two chains a token: half the FMA latency
          Vec even = vmul(vload(qg), vload(key[j])), odd = vset(0.f);
          int64_t i = kLanes;
          for (; i + kLanes < head_dim; i += 2 * kLanes) {
            odd = vfma(vload(qg + i), vload(key[j] + i), odd);
            even = vfma(vload(qg + i + kLanes), vload(key[j] + i + kLanes), even);
          }
          if (i < head_dim) odd = vfma(vload(qg + i), vload(key[j] + i), odd);
          dots[j] = vadd(even, odd);
        }
        alignas(64) float out[kLanes];
        vstore(out, vmul(vsum_each(dots), vset(scale)));
        std::copy(out, out + n, scores + g * len + t0);
      }
    }
  }
}

#if defined(__AVX512VNNI__)
// The queries, each head as two int8 parts: q ~ scale * (high + low / 254), high on the 255
// levels of scale = max|q| / 127 and low its rounding error on 255 levels of its own. One part
// alone cost 0.5% perplexity on the 0.5B model's text (decoded a token at a time, int8 cache);
// both leave an error 254x smaller than the keys' own rounding, at twice the vpdpbusd.
struct Int8Queries {
  std::vector<int8_t> high, low;             // (rows, head_dim)
  std::vector<float> scales;                 // (rows,)
  std::vector<int32_t> high_sums, low_sums;  // (rows,): the sums of each row's levels

  Int8Queries(const float* q, int64_t rows, int64_t head_dim)
      : high(rows * head_dim), low(rows * head_dim), scales(rows), high_sums(rows), low_sums(rows) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = q + r * head_dim;
      int8_t *hi = high.data() + r * head_dim, *lo = low.data() + r * head_dim;
      scales[r] = quantize_int8(x, head_dim, hi);
      const Vec inv = vset(scales[r] > 0.f ? 1.f / scales[r] : 0.f);
      for (int64_t i = 0; i < head_dim; i += kLanes)  // the rounding error, in [-0.5, 0.5], times 254
        vstore_int8(lo + i, vmul(vsub(vmul(vload(x + i), inv), vload(hi + i)), vset(254.f)));
      high_sums[r] = std::accumulate(hi, hi + head_dim, 0);
      low_sums[r] = std::accumulate(lo, lo + head_dim, 0);
    }
  }
};

// span_scores for int8 keys on VNNI (head_dim a multiple of 64), the queries rows first_row +
// g of q. vpdpbusd multiplies unsigned bytes by signed ones, so each key is staged with its sign
// bit flipped, k + 128, and 128 * (the sum of the query's levels) comes off the dot products
// (exact integers, then high + low / 254 in float32). Kept out of line: inlined into
// attend_span beside the float32 span_scores, the int8 cache ran 4-9% slower (measured).
[[gnu::noinline]]
void span_scores(const Int8Queries& q, int64_t first_row, const int8_t* keys, const float* key_scales,
                 const int64_t* rows, int64_t len, int64_t kv_heads, int64_t group, int64_t head_dim, float scale,
                 uint8_t* stage, float* scores) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const Vec low_weight = vset(1.f / 254);
  for (int64_t t0 = 0; t0 < len; t0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, len - t0);
    for (int64_t h = 0; h < kv_heads; ++h) {
      alignas(64) float factor[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) {  // past the span's end: its last key again, its score dropped
        const int64_t row = rows[t0 + std::min(j, n - 1)] + h;
        factor[j] = key_scales[row] * scale;
        for (int64_t i = 0; i < head_dim; i += 64)
          _mm512_storeu_si512(stage + j * head_dim + i,
                              _mm512_xor_si512(_mm512_loadu_si512(keys + row * head_dim + i), flip));
      }
      for (int64_t g = h * group; g < (h + 1) * group; ++g) {
        prefetch_share(keys, rows, t0, len, h, g - h * group, group, head_dim);
        const int64_t r = first_row + g;
        const int8_t *high = q.high.data() + r * head_dim, *low = q.low.data() + r * head_dim;
        Vec dots[kLanes];
        for (int64_t j = 0; j < kLanes; ++j) {
          __m512i hi = _mm512_setzero_si512(), lo = _mm512_setzero_si512();
          for (int64_t i = 0; i < head_dim; i += 64) {
            const __m512i k = _mm512_loadu_si512(stage + j * head_dim + i);
            hi = _mm512_dpbusd_epi32(hi, k, _mm512_loadu_si512(high + i));
            lo = _mm512_dpbusd_epi32(lo, k, _mm512_loadu_si512(low + i));
          }
          dots[j] = vfma(_mm512_cvtepi32_ps(lo), low_weight, _mm512_cvtepi32_ps(hi));
        }
        const float flipped = 128.f * (static_cast<float>(q.high_sums[r]) + static_cast<float>(q.low_sums[r]) / 254);
        alignas(64) float out[kLanes];
        vstore(out, vmul(vsub(vsum_each(dots), vset(flipped)), vmul(vload(factor), vset(q.scales[r]))));
        std::copy(out, out + n, scores + g * len + t0);
      }
    }
  }
}
#else
struct Int8Queries {};  // AVX2 has no vpdpbusd: int8 keys are widened to float there
#endif

// out[g] += sum_t weights[g * stride + t] v_t over n tokens for Heads query heads, v_t at row
// rows[t]: Chunk vectors of head_dim at a time, every head's sums for them held in registers
// across the tokens, so each value is loaded (and widened) once. The first chunk's pass asks for
// the rows of the `prefetch` tokens kPrefetchTokens ahead.
template <int Heads, int Chunk, typename T>
void add_values(const float* weights, int64_t stride, int64_t n, const T* values, const int64_t* rows,
                int64_t head_dim, float* out, int64_t prefetch) {
  for (int64_t d = 0; d < head_dim; d += Chunk * kLanes) {
    Vec acc[Heads][Chunk];
    for (int g = 0; g < Heads; ++g)
      for (int c = 0; c < Chunk; ++c) acc[g][c] = vload(out + g * head_dim + d + c * kLanes);
    for (int64_t t = 0; t < n; ++t) {
      if (d == 0 && t < prefetch) prefetch_row(values, rows[t + kPrefetchTokens], head_dim);
      const T* v = values + rows[t] * head_dim + d;
      Vec vt[Chunk];
      for (int c = 0; c < Chunk; ++c) vt[c] = vload(v + c * kLanes);
      for (int g = 0; g < Heads; ++g) {
        const Vec w = vset(weights[g * stride + t]);
        for (int c = 0; c < Chunk; ++c) acc[g][c] = vfma(w, vt[c], acc[g][c]);
      }
    }
    for (int g = 0; g < Heads; ++g)
      for (int c = 0; c < Chunk; ++c) vstore(out + g * head_dim + d + c * kLanes, acc[g][c]);
  }
}

template <typename T>
using AddValuesFn = void (*)(const float*, int64_t, int64_t, const T*, const int64_t*, int64_t, float*, int64_t);

template <typename T, int Chunk, int... Heads>
constexpr std::array<AddValuesFn<T>, sizeof...(Heads)> add_values_fns(std::integer_sequence<int, Heads...>) {
  return {add_values<Heads + 1, Chunk, T>...};
}

// add_values for `heads` (<= kMaxPassHeads) heads, in chunks of two vectors where head_dim allows.
template <typename T>
void add_values_for(int64_t heads, const float* weights, int64_t stride, int64_t n, const T* values,
                    const int64_t* rows, int64_t head_dim, float* out, int64_t prefetch) {
  static constexpr auto pairs = add_values_fns<T, 2>(std::make_integer_sequence<int, kMaxPassHeads>());
  static constexpr auto singles = add_values_fns<T, 1>(std::make_integer_sequence<int, kMaxPassHeads>());
  (head_dim % (2 * kLanes) == 0 ? pairs : singles)[heads - 1](weights, stride, n, values, rows, head_dim, out, prefetch);
}

struct SpanScratch {  // one thread's, reused across its spans
  std::vector<float> scores, stage, row_scale;
  std::vector<int64_t> rows;
};

// scores[g][t] *= scales[rows[t] + h] for each kv head h and its query heads g: an int8 cache's
// scale of each (token, kv head) row, gathered into row_scale (len) once for its group.
inline void scale_by_rows(float* scores, const float* scales, const int64_t* rows, int64_t len, int64_t kv_heads,
                          int64_t group, float* row_scale) {
  for (int64_t h = 0; h < kv_heads; ++h) {
    for (int64_t t = 0; t < len; ++t) row_scale[t] = scales[rows[t] + h];
    for (int64_t g = h * group; g < (h + 1) * group; ++g)
      for (int64_t t = 0; t < len; ++t) scores[g * len + t] *= row_scale[t];
  }
}

// Attention of sequence d's queries (rows d * heads .. of q) to its tokens [first, last),
// unnormalized: out (heads, head_dim) = sum_t exp(score_t - max) v_t, with that max and the sum
// of the weights per head, for merging with the sequence's other spans. int8_q: the queries
// quantized, for an int8 cache on VNNI (else null).
template <typename T>
void attend_span(const float* q, const Int8Queries* int8_q, int64_t d, const T* keys, const T* values,
                 const float* key_scales, const float* value_scales, const int64_t* table, int64_t first, int64_t last,
                 int64_t block_size, int64_t heads, int64_t kv_heads, int64_t head_dim, float scale, float* out,
                 float* max, float* sum, SpanScratch& scratch) {
  const int64_t len = last - first, group = heads / kv_heads;
  scratch.scores.resize(heads * len);
  scratch.rows.resize(kv_heads * len);
  scratch.stage.resize(kLanes * head_dim);
  scratch.row_scale.resize(len);
  float* scores = scratch.scores.data();
  int64_t* rows = scratch.rows.data();
  for (int64_t t = first; t < last; ++t)  // kv head 0's row of each token; kv head h's is h past it
    rows[t - first] = (table[t / block_size] * block_size + t % block_size) * kv_heads;
#if defined(__AVX512VNNI__)
  if constexpr (std::is_same_v<T, int8_t>)
    if (int8_q)
      span_scores(*int8_q, d * heads, keys, key_scales, rows, len, kv_heads, group, head_dim, scale,
                  reinterpret_cast<uint8_t*>(scratch.stage.data()), scores);
#endif
  if (!int8_q) {
    span_scores(q + d * heads * head_dim, keys, rows, len, kv_heads, group, head_dim, scale, scratch.stage.data(),
                scores);
    if (key_scales) scale_by_rows(scores, key_scales, rows, len, kv_heads, group, scratch.row_scale.data());
  }
  for (int64_t g = 0; g < heads; ++g) std::tie(max[g], sum[g]) = exp_shifted(scores + g * len, len);
  // An int8 cache's value scales go into the weights now that the weights' sums are taken.
  if (value_scales) scale_by_rows(scores, value_scales, rows, len, kv_heads, group, scratch.row_scale.data());
  for (int64_t h = kv_heads - 1; h >= 0; --h)  // a list of rows per kv head, from the last: kv head 0's is read first
    for (int64_t t = 0; t < len; ++t) rows[h * len + t] = rows[t] + h;
  std::fill(out, out + heads * head_dim, 0.f);
  for (int64_t t0 = 0; t0 < len; t0 += kValueTokens) {
    const int64_t n = std::min(kValueTokens, len - t0), ahead = std::clamp<int64_t>(len - t0 - kValueTokens, 0, n);
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t g = h * group; g < (h + 1) * group; g += kMaxPassHeads)  // a kv head's first pass asks ahead
        add_values_for(std::min<int64_t>(kMaxPassHeads, (h + 1) * group - g), scores + g * len + t0, len, n, values,
                       rows + h * len + t0, head_dim, out + g * head_dim, g == h * group ? ahead : 0);
  }
}

}  // namespace

namespace r1_ops {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const std::optional<at::Tensor>& key_scales, const std::optional<at::Tensor>& value_scales,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be contiguous (D, heads, head_dim) float32");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.scalar_type() == values.scalar_type() &&
                  keys.is_contiguous() && values.is_contiguous(),
              "keys and values must be contiguous (num_blocks, block_size, kv_heads, head_dim) of one dtype");
  const bool int8 = keys.scalar_type() == at::kChar, bf16 = keys.scalar_type() == at::kBFloat16;
  TORCH_CHECK(int8 || bf16 || keys.scalar_type() == at::kFloat, "the cache must be float32, bf16 or int8");
  TORCH_CHECK(int8 == (key_scales.has_value() && value_scales.has_value()), "an int8 cache needs its scales, and only it");
  if (int8)
    TORCH_CHECK(key_scales->sizes() == keys.sizes().slice(0, 3) && value_scales->sizes() == keys.sizes().slice(0, 3) &&
                    key_scales->scalar_type() == at::kFloat && value_scales->scalar_type() == at::kFloat &&
                    key_scales->is_contiguous() && value_scales->is_contiguous(),
                "scales must be contiguous (num_blocks, block_size, kv_heads) float32");
  const int64_t D = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = keys.size(0), block_size = keys.size(1), kv_heads = keys.size(2);
  TORCH_CHECK(keys.size(3) == head_dim && head_dim % 16 == 0, "head_dim must match q's and be a multiple of 16");
  TORCH_CHECK(heads % kv_heads == 0, "the query heads must be a multiple of the kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == D && block_tables.scalar_type() == at::kLong &&
                  block_tables.is_contiguous(),
              "block_tables must be contiguous (D, max_blocks) int64");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == D && seq_lens.scalar_type() == at::kLong,
              "seq_lens must be (D,) int64");
  const auto lens = seq_lens.contiguous();
  const int64_t* len_ptr = lens.const_data_ptr<int64_t>();
  const int64_t* tables = block_tables.const_data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  for (int64_t d = 0; d < D; ++d) {
    const int64_t len = len_ptr[d];
    TORCH_CHECK(len >= 1 && len <= max_blocks * block_size, "sequence ", d, " has length ", len,
                " but its block table holds ", max_blocks * block_size, " tokens");
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[d * max_blocks + b] >= 0 && tables[d * max_blocks + b] < num_blocks,
                  "sequence ", d, " lists block ", tables[d * max_blocks + b], " of ", num_blocks);
  }

  // Each sequence's tokens go in spans, so that even one sequence keeps every thread busy; the
  // spans' partial results are merged below (the log-sum-exp combination of split softmaxes).
  const int64_t threads = at::get_num_threads();
  const int64_t spans_per_seq = std::max<int64_t>(1, (2 * threads + D - 1) / D);
  std::vector<int64_t> seq_of, first_of, last_of;
  for (int64_t d = 0; d < D; ++d) {
    const int64_t len = len_ptr[d], blocks = (len + block_size - 1) / block_size;
    const int64_t spans = std::min(spans_per_seq, (blocks + kMinSpanBlocks - 1) / kMinSpanBlocks);
    const int64_t span_blocks = (blocks + spans - 1) / spans;
    for (int64_t b = 0; b < blocks; b += span_blocks) {
      seq_of.push_back(d);
      first_of.push_back(b * block_size);
      last_of.push_back(std::min(len, (b + span_blocks) * block_size));
    }
  }
  const int64_t items = static_cast<int64_t>(seq_of.size());
  auto partial = at::empty({items, heads, head_dim}, q.options());
  auto maxes = at::empty({items, heads}, q.options()), sums = at::empty({items, heads}, q.options());
  const float* qp = q.const_data_ptr<float>();
  float* pp = partial.mutable_data_ptr<float>();
  float* mp = maxes.mutable_data_ptr<float>();
  float* sp = sums.mutable_data_ptr<float>();
  const float* ks = int8 ? key_scales->const_data_ptr<float>() : nullptr;
  const float* vs = int8 ? value_scales->const_data_ptr<float>() : nullptr;
#if defined(__AVX512VNNI__)
  const bool vnni = int8 && head_dim % 64 == 0;
  const Int8Queries int8_q(qp, vnni ? D * heads : 0, head_dim);  // each sequence's, once for all its spans
  const Int8Queries* int8_queries = vnni ? &int8_q : nullptr;
#else
  const Int8Queries* int8_queries = nullptr;
#endif
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    SpanScratch scratch;
    for (int64_t i = begin; i < end; ++i) {
      auto run = [&](const auto* keys, const auto* values) {
        const int64_t d = seq_of[i];
        attend_span(qp, int8_queries, d, keys, values, ks, vs, tables + d * max_blocks, first_of[i], last_of[i],
                    block_size, heads, kv_heads, head_dim, static_cast<float>(scale), pp + i * heads * head_dim,
                    mp + i * heads, sp + i * heads, scratch);
      };
      if (int8)
        run(keys.const_data_ptr<int8_t>(), values.const_data_ptr<int8_t>());
      else if (bf16)
        run(keys.const_data_ptr<at::BFloat16>(), values.const_data_ptr<at::BFloat16>());
      else
        run(keys.const_data_ptr<float>(), values.const_data_ptr<float>());
    }
  });

  auto out = at::empty_like(q);
  float* op = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < items;) {  // the spans of sequence seq_of[i] are items [i, j)
    int64_t j = i;
    while (j < items && seq_of[j] == seq_of[i]) ++j;
    for (int64_t g = 0; g < heads; ++g) {
      float top = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t k = i; k < j; ++k) top = std::max(top, mp[k * heads + g]);
      float* o = op + (seq_of[i] * heads + g) * head_dim;
      std::fill(o, o + head_dim, 0.f);
      for (int64_t k = i; k < j; ++k) {
        const float w = std::exp(mp[k * heads + g] - top);
        total += w * sp[k * heads + g];
        add_scaled(w, pp + (k * heads + g) * head_dim, o, head_dim);
      }
      for (int64_t e = 0; e < head_dim; ++e) o[e] /= total;
    }
    i = j;
  }
  return out;
}

}  // namespace r1_ops

TORCH_LIBRARY_FRAGMENT(r1, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor? key_scales, Tensor? value_scales, "
        "Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(r1_ops::decode_attention));
}
