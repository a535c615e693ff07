// What r1's weight-times-activation kernels share (int4_matmul.cpp, int6_matmul.cpp): output rows
// in tiles of 16, activations quantized to int8 per group and interleaved so that a tile kernel
// reaches every row from one pointer, and the loop that hands tiles and row slices to threads.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t kTileRows = 16;  // output rows per tile: one zmm of int32 lanes
constexpr int64_t kMaxGroup = 256;  // int4_quantize's bound too

// How far ahead of the weights it reads a tile kernel asks for more (into the next tile at the end
// of one), or 0 for not at all: r1/kernels/__init__.py's prefetch_bytes() picks it per CPU at build
// time. Where the kernels were first tuned, the hardware prefetcher alone left 6-20% of a step's
// time waiting on memory; on Zen 4 the instructions cost more than they bring.
#ifndef R1_PREFETCH_BYTES
#define R1_PREFETCH_BYTES 4096
#endif
constexpr int64_t kPrefetchBytes = R1_PREFETCH_BYTES;

inline void prefetch_ahead(const uint8_t* p, int64_t distance = kPrefetchBytes) {
  if constexpr (kPrefetchBytes > 0) _mm_prefetch(reinterpret_cast<const char*>(p + distance), _MM_HINT_T0);
}

// One slice of `rows` rows of x (at most kMaxRows) -> int8 levels qx, and per group dx = max|x| / 127
// and xsum = dx * the sum of the group's levels, laid out so that a tile kernel finds the rows side
// by side: qx[k / 4][row][4] and dx, xsum [group][row]. The kernel then reaches every row at a
// constant offset from one pointer; with rows K bytes apart it held an address per row, spilled
// them, and ran ~10% slower.
// xsum is the quantized x's sum, not x's: a weight's offset (int4's low, int6's -32) then meets the
// same activations as its levels, and the product's error is sum_k W (x - dx qx), small where W is
// centred. With x's own sum only the levels would see the quantized x, and the error would be that
// of the uncentred levels (0..15, 0..63) times the scale: several times larger. Both instruction
// sets get the same qx, dx and xsum.
void quantize_slice(const float* x, int rows, int64_t K, int64_t group, int8_t* qx, float* dx, float* xsum) {
  int8_t levels[kMaxGroup];
  for (int r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < K / group; ++g) {
      const float* xg = x + r * K + g * group;
      const float scale = quantize_int8(xg, group, levels);
      int32_t level_sum = 0;
      for (int64_t j = 0; j < group; ++j) level_sum += levels[j];
      dx[g * rows + r] = scale;
      xsum[g * rows + r] = scale * static_cast<float>(level_sum);
      for (int64_t j = 0; j < group; j += 4) std::memcpy(qx + (g * group + j) * rows + 4 * r, levels + j, 4);
    }
  }
}

#if defined(__AVX512VNNI__)
// dot += nibbles . (the 4 int8 at x, in every lane), as one instruction that broadcasts from
// memory: from the intrinsics GCC 12 emits a separate broadcast and a register copy per
// accumulator, 3 instructions where 1 does (1-4% of the kernel's time at 8-16 rows).
inline __m512i dpbusd_broadcast(__m512i dot, __m512i nibbles, const int8_t* x) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(dot) : "v"(nibbles), "m"(*reinterpret_cast<const int32_t*>(x)));
  return dot;
}

constexpr int kMaxRows = 8;  // activation rows that share one unpacking of a tile's weights
#else  // AVX2
constexpr int kMaxRows = 4;  // two ymm accumulators a row: 8 rows would not fit in 16 registers

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
#endif

// The checks both matmuls make of their activations and bias; the bias's pointer, or null.
inline const float* checked_x_and_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous (M, K) float32");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat &&
                        bias->is_contiguous()),
              "bias must be contiguous (N,) float32");
  return bias ? bias->const_data_ptr<float>() : nullptr;
}

// y (M, tiles * 16) = x (M, K) times a tiled weight. tile(rows, t, qx, dx, xsum, y, ldy) writes
// tile t's 16 outputs for `rows` (at most kMaxRows) activation rows, quantized per `group` as
// quantize_slice lays them out; tile_bytes, the weight bytes of one tile, sizes the L2 blocks.
template <typename Tile>
at::Tensor run_tiles(const at::Tensor& x, int64_t group, int64_t tiles, int64_t tile_bytes, const Tile& tile) {
  const int64_t M = x.size(0), K = x.size(1), N = tiles * kTileRows, groups = K / group;
  // Rows in slices of kMaxRows, each quantized into its own interleaved block (see quantize_slice).
  // A decode step's rows are one slice, which each thread quantizes for itself below: that saves
  // a parallel region's fork and join, 1% of a batch-1 step's matmuls and 3% at 8 rows.
  const bool one_slice = M <= kMaxRows;
  at::Tensor qx, dx, xsum;
  if (!one_slice) {
    qx = at::empty({M, K}, x.options().dtype(at::kChar));
    dx = at::empty({M, groups}, x.options());
    xsum = at::empty({M, groups}, x.options());
    at::parallel_for(0, (M + kMaxRows - 1) / kMaxRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t slice = begin; slice < end; ++slice) {
        const int64_t m0 = slice * kMaxRows;
        quantize_slice(x.const_data_ptr<float>() + m0 * K, static_cast<int>(std::min<int64_t>(kMaxRows, M - m0)), K,
                       group, qx.mutable_data_ptr<int8_t>() + m0 * K, dx.mutable_data_ptr<float>() + m0 * groups,
                       xsum.mutable_data_ptr<float>() + m0 * groups);
      }
    });
  }

  auto y = at::empty({M, N}, x.options());
  // Tiles in blocks whose weights stay in L2 while every kMaxRows-row slice of x passes over
  // them, and at least 4 blocks a thread so that small matrices still spread over every core
  // (q/k/v's 128 tiles made 7 blocks of 256 KB: 9 of 16 threads idle). A decode step
  // (M <= kMaxRows) reads each tile once, so its blocks are single tiles.
  const int64_t min_blocks = 4 * at::get_num_threads();
  const int64_t l2_block = std::min((256 << 10) / tile_bytes, (tiles + min_blocks - 1) / min_blocks);
  const int64_t block = M <= kMaxRows ? 1 : std::clamp<int64_t>(l2_block, 1, tiles);
  auto* out = y.mutable_data_ptr<float>();
  at::parallel_for(0, (tiles + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> own_qx;
    std::vector<float> own_dx_xsum;
    const int8_t* q;
    const float *d, *s;
    if (one_slice) {
      own_qx.resize(M * K), own_dx_xsum.resize(2 * M * groups);
      q = own_qx.data(), d = own_dx_xsum.data(), s = d + M * groups;
      quantize_slice(x.const_data_ptr<float>(), static_cast<int>(M), K, group, own_qx.data(), own_dx_xsum.data(),
                     own_dx_xsum.data() + M * groups);
    } else {
      q = qx.const_data_ptr<int8_t>(), d = dx.const_data_ptr<float>(), s = xsum.const_data_ptr<float>();
    }
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * block, last = std::min(tiles, first + block);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        for (int64_t t = first; t < last; ++t)
          tile(rows, t, q + m0 * K, d + m0 * groups, s + m0 * groups, out + m0 * N + t * kTileRows, N);
      }
    }
  });
  return y;
}

}  // namespace
