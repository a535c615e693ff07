// y = x @ W.T for 6-bit W in GGUF Q6_K's structure, on an AVX-512 VNNI or an AVX2 CPU: the
// higher-precision path of `--quant int4` (r1/quant.py's Int6KernelLinear), for the tensors a
// Q4_K_M file keeps at Q6_K (the output head, half of attn_v and ffn_down) and those r1's own
// recipe keeps there. Q6_K blocks repack into this layout without a second rounding.
//
// Within a row, W = d * scale * (level - 32): levels 0..63, a signed 8-bit scale per 16 inputs
// and a float16 d per 256 (Q6_K's super-block; the last may be short): Q6_K's 6.5625 bits a weight.
// With a scale per 32 inputs instead, 6.3125 bits: r1's format for what Q4_K_M keeps at 5.5 bits
// (Q5_0, Q5_1, Q5_K), which a scale per 16 would hold at 1.06 bits a weight more than its file.
//
// Layout (packed by r1/quant.py), rows in tiles of 16 as in int4_matmul.cpp: `packed` holds each
// level's low 4 bits exactly as int4_matmul's nibbles; `high` (tiles, K / 16, 64) its top 2 bits,
// byte 4 r + j of chunk c holding those of inputs 16 c + j, + 4, + 8 and + 12 (j < 4) in bits 0-1,
// 2-3, 4-5 and 6-7, so that one shift and mask lines them up with each nibble vector. scales are
// (tiles, K / 16 or K / 32, 16) int8 and d (tiles, ceil(K / 256), 16) float16.
//
// Per group of 16, with x ~ dx * qx quantized per 16 inputs:
//   sum_k W x = d * scale * (dx * sum_k level * qx  -  32 * sum_k x)
// x the quantized x in both sums (matmul_tiles.h's xsum says why).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "matmul_tiles.h"
#include "ops.h"

namespace {

constexpr int64_t kGroup = 16, kSuperBlock = 256;

#if defined(__AVX512VNNI__)
template <int Rows>
void tile_kernel(const uint8_t* w, const uint8_t* high, const int8_t* scales, int scale_shift, const at::Half* d,
                 const float* bias, const int8_t* qx, const float* dx, const float* xsum, int64_t K, float* y,
                 int64_t ldy) {
  const __m512i low4 = _mm512_set1_epi8(0x0f), top2 = _mm512_set1_epi8(0x30);
  __m512 acc[Rows];
#pragma GCC unroll 8
  for (int m = 0; m < Rows; ++m) acc[m] = _mm512_setzero_ps();
  __m512 block_d = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const int64_t k = g * kGroup;
    prefetch_ahead(w + k * 8);
    prefetch_ahead(high + g * 64, kPrefetchBytes / 2);
    if (k % kSuperBlock == 0)
      block_d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + k / kSuperBlock * kTileRows)));
    const __m512i a = _mm512_loadu_si512(w + k * 8), b = _mm512_loadu_si512(w + k * 8 + 64);
    const __m512i h = _mm512_loadu_si512(high + g * 64);
    // Each nibble vector with its two high bits at bits 4-5: 0x30 selects them from the shifted h.
    const __m512i levels[4] = {
        _mm512_ternarylogic_epi32(top2, _mm512_slli_epi16(h, 4), _mm512_and_si512(a, low4), 0xCA),
        _mm512_ternarylogic_epi32(top2, _mm512_slli_epi16(h, 2), _mm512_and_si512(_mm512_srli_epi16(a, 4), low4), 0xCA),
        _mm512_ternarylogic_epi32(top2, h, _mm512_and_si512(b, low4), 0xCA),
        _mm512_ternarylogic_epi32(top2, _mm512_srli_epi16(h, 2), _mm512_and_si512(_mm512_srli_epi16(b, 4), low4), 0xCA)};
    __m512i dot[Rows];
    for (int m = 0; m < Rows; ++m) dot[m] = _mm512_setzero_si512();
    for (int part = 0; part < 4; ++part) {  // inputs k + 4 part .. + 4
      const int8_t* xk = qx + (k + 4 * part) * Rows;
      for (int m = 0; m < Rows; ++m) dot[m] = dpbusd_broadcast(dot[m], levels[part], xk + 4 * m);
    }
    const __m512 scale = vmul(vload(scales + (g >> scale_shift) * kTileRows), block_d), low = vmul(scale, vset(-32.f));
    for (int m = 0; m < Rows; ++m) {
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), vmul(scale, vset(dx[g * Rows + m])), acc[m]);
      acc[m] = _mm512_fmadd_ps(low, vset(xsum[g * Rows + m]), acc[m]);
    }
  }
  const __m512 bv = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < Rows; ++m) _mm512_storeu_ps(y + m * ldy, vadd(acc[m], bv));
}

#else  // AVX2 and FMA
// Two halves of 8 rows. vpmaddubsw sums two level x qx products into int16 (at most 2 * 63 * 127);
// the two nibble vectors of 8 inputs together stay below 2^15, so they are widened to int32 then.
template <int Rows>
void tile_kernel(const uint8_t* w, const uint8_t* high, const int8_t* scales, int scale_shift, const at::Half* d,
                 const float* bias, const int8_t* qx, const float* dx, const float* xsum, int64_t K, float* y,
                 int64_t ldy) {
  const __m256i low4 = _mm256_set1_epi8(0x0f), top2 = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
  __m256 acc[Rows][2];
  for (int m = 0; m < Rows; ++m)
    for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_setzero_ps();
  __m256 block_d[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const int64_t k = g * kGroup;
    prefetch_ahead(w + k * 8);
    prefetch_ahead(high + g * 64, kPrefetchBytes / 2);
    for (int h = 0; h < 2; ++h) {
      if (k % kSuperBlock == 0)
        block_d[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + k / kSuperBlock * kTileRows + 8 * h)));
      const auto at = [&](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h)); };
      const __m256i a = at(w + k * 8), b = at(w + k * 8 + 64), hi = at(high + g * 64);
      const auto with_top = [&](__m256i nibbles, __m256i top) {
        return _mm256_or_si256(_mm256_and_si256(nibbles, low4), _mm256_and_si256(top, top2));
      };
      const __m256i levels[4] = {with_top(a, _mm256_slli_epi16(hi, 4)),
                                 with_top(_mm256_srli_epi16(a, 4), _mm256_slli_epi16(hi, 2)), with_top(b, hi),
                                 with_top(_mm256_srli_epi16(b, 4), _mm256_srli_epi16(hi, 2))};
      const __m256 scale = vmul(vload(scales + (g >> scale_shift) * kTileRows + 8 * h), block_d[h]);
      const __m256 low = vmul(scale, vset(-32.f));
      for (int m = 0; m < Rows; ++m) {
        __m256i dot = _mm256_setzero_si256();
        for (int half = 0; half < 2; ++half) {  // inputs k + 8 half .. + 8
          const int8_t* xk = qx + (k + 8 * half) * Rows;
          const __m256i p = _mm256_add_epi16(
              _mm256_maddubs_epi16(levels[2 * half], _mm256_set1_epi32(load_i32(xk + 4 * m))),
              _mm256_maddubs_epi16(levels[2 * half + 1], _mm256_set1_epi32(load_i32(xk + 4 * (Rows + m)))));
          dot = _mm256_add_epi32(dot, _mm256_madd_epi16(p, ones));
        }
        acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), vmul(scale, vset(dx[g * Rows + m])), acc[m][h]);
        acc[m][h] = _mm256_fmadd_ps(low, vset(xsum[g * Rows + m]), acc[m][h]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 bv = bias ? _mm256_loadu_ps(bias + 8 * h) : _mm256_setzero_ps();
    for (int m = 0; m < Rows; ++m) _mm256_storeu_ps(y + m * ldy + 8 * h, vadd(acc[m][h], bv));
  }
}
#endif

using TileFn = void (*)(const uint8_t*, const uint8_t*, const int8_t*, int, const at::Half*, const float*,
                        const int8_t*, const float*, const float*, int64_t, float*, int64_t);
#if defined(__AVX512VNNI__)
constexpr TileFn kTileFns[kMaxRows] = {tile_kernel<1>, tile_kernel<2>, tile_kernel<3>, tile_kernel<4>,
                                       tile_kernel<5>, tile_kernel<6>, tile_kernel<7>, tile_kernel<8>};
#else
constexpr TileFn kTileFns[kMaxRows] = {tile_kernel<1>, tile_kernel<2>, tile_kernel<3>, tile_kernel<4>};
#endif

}  // namespace

namespace r1_ops {

at::Tensor int6_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& high, const at::Tensor& scales,
                       const at::Tensor& d, const std::optional<at::Tensor>& bias) {
  const int64_t tiles = packed.size(0), N = tiles * kTileRows;
  const float* bias_ptr = checked_x_and_bias(x, bias, N);
  const int64_t K = x.size(1);
  const int64_t groups = K / kGroup, blocks = (K + kSuperBlock - 1) / kSuperBlock;
  TORCH_CHECK(K % kGroup == 0, "K must be a multiple of 16");
  TORCH_CHECK(packed.sizes() == at::IntArrayRef({tiles, K / 8, 64}) && packed.scalar_type() == at::kByte &&
                  packed.is_contiguous(),
              "packed must be contiguous (N/16, K/8, 64) uint8");
  TORCH_CHECK(high.sizes() == at::IntArrayRef({tiles, groups, 64}) && high.scalar_type() == at::kByte &&
                  high.is_contiguous(),
              "high must be contiguous (N/16, K/16, 64) uint8");
  // A scale per 16 inputs (Q6_K's), or per 32 (for what Q4_K_M keeps at 5.5 bits).
  const int scale_shift = scales.dim() == 3 && K % 32 == 0 && scales.size(1) == groups / 2 ? 1 : 0;
  TORCH_CHECK(scales.sizes() == at::IntArrayRef({tiles, groups >> scale_shift, kTileRows}) &&
                  scales.scalar_type() == at::kChar && scales.is_contiguous(),
              "scales must be contiguous (N/16, K/16 or K/32, 16) int8");
  TORCH_CHECK(d.sizes() == at::IntArrayRef({tiles, blocks, kTileRows}) && d.scalar_type() == at::kHalf &&
                  d.is_contiguous(),
              "d must be contiguous (N/16, ceil(K/256), 16) float16");
  const auto* w = packed.const_data_ptr<uint8_t>();
  const auto* hi = high.const_data_ptr<uint8_t>();
  const auto* sc = scales.const_data_ptr<int8_t>();
  const auto* dp = d.const_data_ptr<at::Half>();
  const int64_t tile_bytes = K / 2 * kTileRows + groups * 64;
  return run_tiles(x, kGroup, tiles, tile_bytes,
                   [&](int rows, int64_t t, const int8_t* q, const float* dx, const float* s, float* y, int64_t ldy) {
                     kTileFns[rows - 1](w + t * K / 2 * kTileRows, hi + t * groups * 64,
                                        sc + t * (groups >> scale_shift) * kTileRows, scale_shift,
                                        dp + t * blocks * kTileRows, bias_ptr ? bias_ptr + t * kTileRows : nullptr, q,
                                        dx, s, K, y, ldy);
                   });
}

}  // namespace r1_ops

TORCH_LIBRARY_FRAGMENT(r1, m) {
  m.def("int6_matmul(Tensor x, Tensor packed, Tensor high, Tensor scales, Tensor d, Tensor? bias) -> Tensor");
  m.impl("int6_matmul", c10::DispatchKey::CPU, TORCH_FN(r1_ops::int6_matmul));
}
