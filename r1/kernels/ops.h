// The CPU ops that r1's kernel files register with torch.ops.r1, declared for decode_step.cpp,
// which calls them directly: one C++ call for a whole decode step instead of one call through
// Python and PyTorch's dispatcher per op. Each op's file says what it computes.

#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace r1_ops {

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& lows,
                       const at::Tensor& steps, int64_t group, const std::optional<at::Tensor>& bias);
at::Tensor int6_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& high, const at::Tensor& scales,
                       const at::Tensor& d, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps);
void rotary_(const at::Tensor& x, int64_t heads, const at::Tensor& cos, const at::Tensor& sin);
void write_kv_int8_(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, const at::Tensor& values,
                    const at::Tensor& scales);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const std::optional<at::Tensor>& key_scales, const std::optional<at::Tensor>& value_scales,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);

}  // namespace r1_ops
