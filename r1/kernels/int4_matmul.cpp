// y = x @ W.T for group-wise int4 W on an AVX-512 VNNI or an AVX2 CPU, the kernel behind
// `--quant int4`. r1/kernels/__init__.py compiles this file for the widest of the two this CPU has.
//
// Why our own: PyTorch's `_weight_int4pack_mm_for_cpu` widens every weight to float and runs
// FMAs, so on two cores it tops out near 33 G weights/s, below the memory bus (a decode step
// reads 1.5 G weights). Here the activations are quantized to int8 per weight group, as
// llama.cpp does, and `vpdpbusd` multiplies 64 int4 x int8 pairs per instruction (AVX2:
// `vpmaddubsw` 32 pairs into int16, widened once per 32 weights), so a decode step is bound by
// memory, and the weights unpacked once serve up to 8 (AVX2: 4) activation rows.
//
// Weight layout (packed by r1/quant.py): rows in tiles of 16, one zmm lane per output row (on
// AVX2, two ymm of 8). packed[tile][k / 8] is 64 bytes; byte 4 * r + j holds W[16 tile + r][k + j]
// (j < 4) in its low nibble and W[16 tile + r][k + 4 + j] in its high one, levels 0..15. scales
// (uint8) and lows (int8) are (tiles, K / group, 16), in units of two steps that each row holds
// for every span of K / S inputs: steps (tiles, S, 2, 16), float32 or float16, and within a group
// W = steps[0] * scale * level + steps[1] * low. r1's own quantizer takes one span a row (S = 1,
// float32); a GGUF Q4_K tensor one per 256 inputs, its d and dmin as the file has them (float16),
// so its blocks repack without rounding. 4.5 bits a weight, plus the steps: 8 bytes a row, or
// 0.125 bits a weight for Q4_K's (the 6-bit codes that Q4_K packs into 12 bytes per 256 take 16
// here, whole bytes that the epilogue loads as they are).
//
// Per group, with x ~ dx * qx (qx int8, dx one float per row and group):
//   sum_k W x = steps[0] * scale * dx * sum_k level * qx  +  steps[1] * low * sum_k x
// where x is the quantized x throughout (matmul_tiles.h's xsum says why): both sums are exact
// integers and both instruction sets compute the same ones.
//
// Past a few rows (prefill, a batch of decodes) the kernel is bound by arithmetic, not memory. On
// Zen 5 `vpdpbusd` issues on the two ports the float multiplies use, and a group's epilogue (per
// row a multiply and two FMAs) takes 3 of those slots for every 8 dot products: 8/11 of the
// ports' peak is the ceiling; the kernel reaches ~60% of that peak (measured on one core).
//
// On a CPU with AMX (Intel Xeon since Sapphire Rapids; the avx512_amx build), 32 rows and more
// take another path: each tile's weights are widened to bf16, with their group's scale and low
// applied, and AMX's tile multiply (`tdpbf16ps`, 8192 products an instruction) sums over all of
// K in its float accumulators. Int8 products (`tdpbssd`) would leave the tiles for their group's
// float epilogue every 32 inputs, a tile store and 16 reloads each: measured at 256 rows, 1.1x
// the VNNI path (the products and stores alone, without the epilogue's math, 1.8x). In bf16
// there is no epilogue: 2.2x at 256 rows. The activations go to bf16 rather than int8 per group,
// so this path is also nearer float math (relative error 2.3e-3 against VNNI's 1.3e-2 on random
// inputs). Widening the weights costs ~0.2 cycles a weight, which 16 rows do not repay: below 32
// rows the VNNI path runs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "matmul_tiles.h"
#include "ops.h"

namespace {

#if defined(__AVX512VNNI__)
// One tile of 16 output rows for `Rows` activation rows: y[m][0..16) = bias + x[m] . W. steps
// points at the tile's (S, 2, 16), a span being span_groups groups.
template <int Rows, typename Step>
void tile_kernel(const uint8_t* w, const uint8_t* scales, const int8_t* lows, const Step* steps, int64_t span_groups,
                 const float* bias, const int8_t* qx, const float* dx, const float* xsum, int64_t K, int64_t group,
                 float* y, int64_t ldy) {
  const int64_t groups = K / group;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 acc[Rows];
  // Unrolled, so that acc stays in registers: left as loops, GCC 12 kept acc in memory and stored
  // every row's sum to the stack after each group (3-5% of the kernel at 8-256 rows).
#pragma GCC unroll 8
  for (int m = 0; m < Rows; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t span = 0; span < groups / span_groups; ++span) {
    const __m512 scale_step = vload(steps + span * 2 * kTileRows), low_step = vload(steps + (span * 2 + 1) * kTileRows);
    for (int64_t g = span * span_groups; g < (span + 1) * span_groups; ++g) {
      __m512i dot[Rows];
      for (int m = 0; m < Rows; ++m) dot[m] = _mm512_setzero_si512();
      for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
        prefetch_ahead(w + k * 8);
        const __m512i packed = _mm512_loadu_si512(w + k * 8);
        const __m512i lo = _mm512_and_si512(packed, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
        const int8_t* xk = qx + k * Rows;  // inputs k..k+3 of every row, then k+4..k+7
        for (int m = 0; m < Rows; ++m) dot[m] = dpbusd_broadcast(dot[m], lo, xk + 4 * m);
        for (int m = 0; m < Rows; ++m) dot[m] = dpbusd_broadcast(dot[m], hi, xk + 4 * (Rows + m));
      }
      const __m512 scale = vmul(vload(scales + g * kTileRows), scale_step);
      const __m512 low = vmul(vload(lows + g * kTileRows), low_step);
      for (int m = 0; m < Rows; ++m) {
        const __m512 s = _mm512_mul_ps(scale, _mm512_set1_ps(dx[g * Rows + m]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), s, acc[m]);
        acc[m] = _mm512_fmadd_ps(low, _mm512_set1_ps(xsum[g * Rows + m]), acc[m]);
      }
    }
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < Rows; ++m) _mm512_storeu_ps(y + m * ldy, _mm512_add_ps(acc[m], b));
}

#else  // AVX2 and FMA
// One tile of 16 output rows (two halves of 8) for `Rows` activation rows. vpmaddubsw sums two
// level x qx products into int16 (at most 2 * 15 * 127); 8 of them, 32 weights, still fit in
// int16, so they are widened to int32 (vpmaddwd by ones) once per 32 weights.
template <int Rows, typename Step>
void tile_kernel(const uint8_t* w, const uint8_t* scales, const int8_t* lows, const Step* steps, int64_t span_groups,
                 const float* bias, const int8_t* qx, const float* dx, const float* xsum, int64_t K, int64_t group,
                 float* y, int64_t ldy) {
  const int64_t groups = K / group;
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  __m256 scale_step[2], low_step[2], acc[Rows][2];
  for (int m = 0; m < Rows; ++m)
    for (int h = 0; h < 2; ++h) acc[m][h] = _mm256_setzero_ps();
  for (int64_t span = 0; span < groups / span_groups; ++span) {
    for (int h = 0; h < 2; ++h) {
      const Step* st = steps + span * 2 * kTileRows + 8 * h;
      scale_step[h] = vload(st), low_step[h] = vload(st + kTileRows);
    }
    for (int64_t g = span * span_groups; g < (span + 1) * span_groups; ++g) {
      __m256i dot[Rows][2], pairs[Rows][2];
      for (int m = 0; m < Rows; ++m)
        for (int h = 0; h < 2; ++h) dot[m][h] = pairs[m][h] = _mm256_setzero_si256();
      for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
        prefetch_ahead(w + k * 8);
        for (int h = 0; h < 2; ++h) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 8 + 32 * h));
          const __m256i lo = _mm256_and_si256(packed, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
          const int8_t* xk = qx + k * Rows;
          for (int m = 0; m < Rows; ++m) {
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xk + 4 * m))),
                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xk + 4 * (Rows + m)))));
            pairs[m][h] = _mm256_add_epi16(pairs[m][h], p);
          }
        }
        if ((k + 8 - g * group) % 32 == 0 || k + 8 == (g + 1) * group)
          for (int m = 0; m < Rows; ++m)
            for (int h = 0; h < 2; ++h) {
              dot[m][h] = _mm256_add_epi32(dot[m][h], _mm256_madd_epi16(pairs[m][h], ones));
              pairs[m][h] = _mm256_setzero_si256();
            }
      }
      for (int h = 0; h < 2; ++h) {
        const __m256 scale = vmul(vload(scales + g * kTileRows + 8 * h), scale_step[h]);
        const __m256 low = vmul(vload(lows + g * kTileRows + 8 * h), low_step[h]);
        for (int m = 0; m < Rows; ++m) {
          const __m256 s = _mm256_mul_ps(scale, _mm256_set1_ps(dx[g * Rows + m]));
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][h]), s, acc[m][h]);
          acc[m][h] = _mm256_fmadd_ps(low, _mm256_set1_ps(xsum[g * Rows + m]), acc[m][h]);
        }
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 b = bias ? _mm256_loadu_ps(bias + 8 * h) : _mm256_setzero_ps();
    for (int m = 0; m < Rows; ++m) _mm256_storeu_ps(y + m * ldy + 8 * h, _mm256_add_ps(acc[m][h], b));
  }
}
#endif

template <typename Step>
using TileFn = void (*)(const uint8_t*, const uint8_t*, const int8_t*, const Step*, int64_t, const float*,
                        const int8_t*, const float*, const float*, int64_t, int64_t, float*, int64_t);
#if defined(__AVX512VNNI__)
template <typename Step>
constexpr TileFn<Step> kTileFns[kMaxRows] = {tile_kernel<1, Step>, tile_kernel<2, Step>, tile_kernel<3, Step>,
                                             tile_kernel<4, Step>, tile_kernel<5, Step>, tile_kernel<6, Step>,
                                             tile_kernel<7, Step>, tile_kernel<8, Step>};
#else
template <typename Step>
constexpr TileFn<Step> kTileFns[kMaxRows] = {tile_kernel<1, Step>, tile_kernel<2, Step>, tile_kernel<3, Step>,
                                             tile_kernel<4, Step>};
#endif

#if defined(__AMX_BF16__)
constexpr int64_t kAmxMinRows = 32;  // from here on the AMX path is faster (1.1x at 32, 1.5x at 64 rows)

// Linux hands out AMX's tile registers only to a process that asks (they add 8 KB to each
// thread's saved state); without this the first tile instruction faults. Asked once; on a kernel
// that refuses (older than 5.16), the VNNI path runs instead.
bool amx_granted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

// Palette 1, every tile 16 rows of 64 bytes: tiles 0-3 accumulate (activation tile a, weight tile
// b at 2a + b), 4-5 hold activations (16 rows x 32 bf16), 6-7 weights (16 pairs of inputs x 16
// outputs).
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// One tile's weights (16 outputs x K) as bf16 B tiles: for every 32 inputs, 16 rows of 64 bytes,
// row p holding (W[n][2p], W[n][2p + 1]) for the 16 outputs n. A packed chunk's lane n holds
// W[n][k..k+8) in its 4 bytes' nibbles, so the 8 inputs come out one vector each (lanes = outputs).
// A level moved into the top 4 bits of 1.0's mantissa is the float 1 + level / 16, so a shift, an
// and-or and an FMA (16 scale (1 + level / 16) + low - 16 scale) widen it: no int-to-float
// conversion, and 6-8% faster at 32-64 rows (3% at 256) than and, convert and FMA.
template <typename Step>
void widen_tile(const uint8_t* w, const uint8_t* scales, const int8_t* lows, const Step* steps, int64_t span_groups,
                int64_t K, int64_t group, uint16_t* b) {
  const __m512i mantissa_top = _mm512_set1_epi32(0x00780000), one = _mm512_set1_epi32(0x3F800000);
  // cvtne2ps gives inputs 2p (words 0-15) and 2p + 1 (16-31); this pairs them up per output.
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t g = 0; g < K / group; ++g) {
    const Step* st = steps + g / span_groups * 2 * kTileRows;
    const __m512 scale = vmul(vmul(vload(scales + g * kTileRows), vload(st)), vset(16.f));
    const __m512 low = vsub(vmul(vload(lows + g * kTileRows), vload(st + kTileRows)), scale);
    for (int64_t c = g * group / 8; c < (g + 1) * group / 8; ++c) {
      const __m512i packed = _mm512_loadu_si512(w + c * 64);
      // Input k + j's level sits at bit 8 j (j < 4) or 8 (j - 4) + 4 of each lane; bit 19 is the top
      // 4 mantissa bits' lowest.
      const __m512i at19[8] = {_mm512_slli_epi32(packed, 19), _mm512_slli_epi32(packed, 11),
                               _mm512_slli_epi32(packed, 3),  _mm512_srli_epi32(packed, 5),
                               _mm512_slli_epi32(packed, 15), _mm512_slli_epi32(packed, 7),
                               _mm512_srli_epi32(packed, 1),  _mm512_srli_epi32(packed, 9)};
      __m512 f[8];
      for (int j = 0; j < 8; ++j)  // (at19 & mantissa_top) | one, as one ternary-logic instruction
        f[j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(at19[j], mantissa_top, one, 0xEA)),
                               scale, low);
      for (int p = 0; p < 4; ++p)
        _mm512_storeu_si512(b + (4 * c + p) * 32,
                            _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(f[2 * p + 1], f[2 * p])));
    }
  }
}

// y[0..16 kA rows)[16 kB outputs] = x . W + bias for kA activation tiles (16 rows each, a: bf16
// rows K apart) and kB weight tiles (b: widened, K * 16 apart). Each tile loaded serves two
// products when kA = kB = 2.
template <int kA, int kB>
void amx_block(const uint16_t* a, const uint16_t* b, int64_t K, const float* bias, int64_t rows, float* y, int64_t N) {
  _tile_zero(0);
  if constexpr (kB == 2) _tile_zero(1);
  if constexpr (kA == 2) _tile_zero(2);
  if constexpr (kA == 2 && kB == 2) _tile_zero(3);
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, a + k, 2 * K);
    _tile_loadd(6, b + 16 * k, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kB == 2) {
      _tile_loadd(7, b + 16 * (K + k), 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (kA == 2) {
      _tile_loadd(5, a + 16 * K + k, 2 * K);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float sums[4][16][16];
  _tile_stored(0, sums[0], 64);
  if constexpr (kB == 2) _tile_stored(1, sums[1], 64);
  if constexpr (kA == 2) _tile_stored(2, sums[2], 64);
  if constexpr (kA == 2 && kB == 2) _tile_stored(3, sums[3], 64);
  for (int i = 0; i < kA; ++i)
    for (int j = 0; j < kB; ++j) {
      const __m512 bj = bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps();
      for (int64_t r = 0; r < std::min<int64_t>(16, rows - 16 * i); ++r)
        _mm512_storeu_ps(y + (16 * i + r) * N + 16 * j, _mm512_add_ps(_mm512_load_ps(sums[2 * i + j][r]), bj));
    }
}

template <typename Step>
at::Tensor amx_int4_matmul(const at::Tensor& x, const uint8_t* w, const uint8_t* scales, const int8_t* lows,
                           const Step* steps, int64_t spans, int64_t tiles, int64_t group, const float* bias) {
  const int64_t M = x.size(0), K = x.size(1), N = tiles * kTileRows, groups = K / group;
  const int64_t tile_bytes = K / 2 * kTileRows;
  const int64_t padded = (M + 15) / 16 * 16;  // whole activation tiles, the last one's extra rows zero
  auto xb = at::empty({padded, K}, x.options().dtype(at::kBFloat16));
  xb.narrow(0, 0, M).copy_(x);
  xb.narrow(0, M, padded - M).zero_();
  const auto* a = reinterpret_cast<const uint16_t*>(xb.const_data_ptr<at::BFloat16>());
  auto y = at::empty({M, N}, x.options());
  float* out = y.mutable_data_ptr<float>();
  // Threads take pairs of weight tiles, widen them once into their own buffer (in L2: 2 x 16 x K
  // bf16, 573 KB at K = 8960) and run every activation row past them.
  at::parallel_for(0, (tiles + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    const TileConfig config;
    _tile_loadconfig(&config);  // per thread: the tile registers are each thread's own
    const std::unique_ptr<uint16_t[]> widened(new uint16_t[2 * K * kTileRows]);  // written whole before read
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t t = 2 * pair, both = std::min<int64_t>(2, tiles - t);
      for (int64_t i = 0; i < both; ++i)
        widen_tile(w + (t + i) * tile_bytes, scales + (t + i) * groups * kTileRows,
                   lows + (t + i) * groups * kTileRows, steps + (t + i) * spans * 2 * kTileRows, groups / spans, K,
                   group, widened.get() + i * K * kTileRows);
      const float* bias_t = bias ? bias + t * kTileRows : nullptr;
      for (int64_t m = 0; m < M; m += 32) {
        const uint16_t* am = a + m * K;
        float* ym = out + m * N + t * kTileRows;
        const bool two_a = padded - m >= 32;
        if (two_a && both == 2) amx_block<2, 2>(am, widened.get(), K, bias_t, M - m, ym, N);
        else if (two_a) amx_block<2, 1>(am, widened.get(), K, bias_t, M - m, ym, N);
        else if (both == 2) amx_block<1, 2>(am, widened.get(), K, bias_t, M - m, ym, N);
        else amx_block<1, 1>(am, widened.get(), K, bias_t, M - m, ym, N);
      }
    }
    _tile_release();
  });
  return y;
}
#endif

template <typename Step>
at::Tensor tiled_matmul(const at::Tensor& x, const uint8_t* w, const uint8_t* scales, const int8_t* lows,
                        const Step* steps, int64_t spans, int64_t tiles, int64_t group, const float* bias) {
  const int64_t K = x.size(1), groups = K / group;
#if defined(__AMX_BF16__)
  if (x.size(0) >= kAmxMinRows && K % 32 == 0 && amx_granted())
    return amx_int4_matmul(x, w, scales, lows, steps, spans, tiles, group, bias);
#endif
  const int64_t tile_bytes = K / 2 * kTileRows;
  return run_tiles(x, group, tiles, tile_bytes,
                   [&](int rows, int64_t t, const int8_t* q, const float* d, const float* s, float* y, int64_t ldy) {
                     kTileFns<Step>[rows - 1](w + t * tile_bytes, scales + t * groups * kTileRows,
                                              lows + t * groups * kTileRows, steps + t * spans * 2 * kTileRows,
                                              groups / spans, bias ? bias + t * kTileRows : nullptr, q, d, s, K, group,
                                              y, ldy);
                   });
}

}  // namespace

namespace r1_ops {

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& lows,
                       const at::Tensor& steps, int64_t group, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 64 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous (N/16, K/8, 64) uint8");
  TORCH_CHECK(group > 0 && group % 16 == 0 && group <= kMaxGroup, "group must be a positive multiple of 16, at most 256");
  const int64_t tiles = packed.size(0), N = tiles * kTileRows;
  const float* bias_ptr = checked_x_and_bias(x, bias, N);
  const int64_t K = x.size(1), groups = K / group;
  TORCH_CHECK(K % group == 0 && packed.size(1) * 8 == K,
              "K must be a multiple of the group size and packed must hold K / 8 chunks");
  TORCH_CHECK(scales.sizes() == at::IntArrayRef({tiles, groups, kTileRows}) && scales.sizes() == lows.sizes() &&
                  scales.scalar_type() == at::kByte && lows.scalar_type() == at::kChar && scales.is_contiguous() &&
                  lows.is_contiguous(),
              "scales and lows must be contiguous (N/16, K/group, 16) uint8 and int8");
  TORCH_CHECK(steps.dim() == 4 && steps.size(0) == tiles && steps.size(1) > 0 && groups % steps.size(1) == 0 &&
                  steps.size(2) == 2 && steps.size(3) == kTileRows && steps.is_contiguous() &&
                  (steps.scalar_type() == at::kFloat || steps.scalar_type() == at::kHalf),
              "steps must be contiguous (N/16, S, 2, 16) float32 or float16, S dividing K/group");
  const auto* w = packed.const_data_ptr<uint8_t>();
  const auto* sc = scales.const_data_ptr<uint8_t>();
  const auto* lo = lows.const_data_ptr<int8_t>();
  return steps.scalar_type() == at::kHalf
             ? tiled_matmul(x, w, sc, lo, steps.const_data_ptr<at::Half>(), steps.size(1), tiles, group, bias_ptr)
             : tiled_matmul(x, w, sc, lo, steps.const_data_ptr<float>(), steps.size(1), tiles, group, bias_ptr);
}

}  // namespace r1_ops

TORCH_LIBRARY(r1, m) {
  m.def("int4_matmul(Tensor x, Tensor packed, Tensor scales, Tensor lows, Tensor steps, int group, Tensor? bias) -> Tensor");
  m.impl("int4_matmul", c10::DispatchKey::CPU, TORCH_FN(r1_ops::int4_matmul));
}
