// A whole decode step of the Qwen2 decoder in one call, on the CPU: every layer's norms, linears,
// rotary embedding, KV cache write, attention and SwiGLU, then the final norm, for a batch in
// which each new token is a one-token query: a decode step, or a speculative verification step's
// k + 1 tokens a sequence as k + 1 rows (r1/model/cpu_decode.py builds it; r1/model/qwen2.py
// calls it).
//
// Why: at batch 1 the weights stream at the memory bus's speed, and what is left of a step is the
// ~400 calls around them, each through Python, nn.Module and PyTorch's dispatcher: a few
// microseconds apiece, ~10% of a step on two cores (docs/performance.md). Here they are plain C++
// calls of the same ops (ops.h) in the same order as the Python layers make them, so a decode
// step's numbers are the same to the bit (tests/test_cpu_decode.py).

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "ops.h"

namespace {

// One linear as the model's modules hold it: one or more runs of output rows, each on r1's int4
// or int6 kernel or a float32 weight (a stacked q, k, v or gate, up may hold its parts in two
// formats), their outputs side by side, then the stacked linear's bias.
struct Linear : torch::CustomClassHolder {
  struct Run {
    std::string kind;  // "int4": packed, scales, lows, steps; "int6": packed, high, scales, d; "float": weight
    std::vector<at::Tensor> tensors;
    int64_t group;  // int4's group size
    std::optional<at::Tensor> bias;
  };
  std::vector<Run> runs;
  std::optional<at::Tensor> bias;  // added after the runs' outputs are joined

  void add_run(std::string kind, std::vector<at::Tensor> tensors, int64_t group, std::optional<at::Tensor> run_bias) {
    const size_t wanted = kind == "float" ? 1 : kind == "int4" || kind == "int6" ? 4 : 0;
    TORCH_CHECK(wanted > 0, "a linear's run is int4, int6 or float, not ", kind);
    TORCH_CHECK(tensors.size() == wanted, kind, " takes ", wanted, " tensors, not ", tensors.size());
    runs.push_back({std::move(kind), std::move(tensors), group, std::move(run_bias)});
  }

  void set_bias(std::optional<at::Tensor> joined_bias) { bias = std::move(joined_bias); }

  at::Tensor operator()(const at::Tensor& x) const {
    std::vector<at::Tensor> outs;
    for (const Run& r : runs) {
      const auto& t = r.tensors;
      if (r.kind == "int4") outs.push_back(r1_ops::int4_matmul(x, t[0], t[1], t[2], t[3], r.group, r.bias));
      else if (r.kind == "int6") outs.push_back(r1_ops::int6_matmul(x, t[0], t[1], t[2], t[3], r.bias));
      else outs.push_back(at::linear(x, t[0], r.bias));
    }
    at::Tensor y = outs.size() == 1 ? outs[0] : at::cat(outs, 1);
    return bias ? y + *bias : y;
  }
};

// The decoder's layers and final norm. forward's cache is the model's whole KV cache: float32 or
// bf16 (layers, 2, blocks, block_size, kv_heads, head_dim), or int8 values of that shape with
// their scales (layers, 2, blocks, block_size, kv_heads).
struct DecodeStack : torch::CustomClassHolder {
  struct Layer {
    at::Tensor input_norm, post_norm;
    c10::intrusive_ptr<Linear> qkv, o, gate_up, down;
  };
  int64_t heads, kv_heads, head_dim;
  double eps, scale;
  at::Tensor final_norm;
  std::vector<Layer> layers;

  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale, at::Tensor final_norm)
      : heads(heads), kv_heads(kv_heads), head_dim(head_dim), eps(eps), scale(scale), final_norm(std::move(final_norm)) {}

  void add_layer(at::Tensor input_norm, c10::intrusive_ptr<Linear> qkv, c10::intrusive_ptr<Linear> o,
                 at::Tensor post_norm, c10::intrusive_ptr<Linear> gate_up, c10::intrusive_ptr<Linear> down) {
    layers.push_back({std::move(input_norm), std::move(post_norm), std::move(qkv), std::move(o), std::move(gate_up),
                      std::move(down)});
  }

  // Hidden states (N, hidden) after the final norm, for x the N new tokens' embeddings, cos and
  // sin their rotation (N, head_dim / 2), slots their cache slots (N,), and per token its
  // sequence's block table (N, blocks) and the length it attends to, itself included (N,). Every
  // token's key and value are written before any attends, so tokens of one sequence see each
  // other as far as their lengths reach.
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache,
                     const std::optional<at::Tensor>& cache_scales, const at::Tensor& slots,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens) const {
    TORCH_CHECK(cache.dim() == 6 && cache.size(0) == static_cast<int64_t>(layers.size()),
                "cache must be (layers, 2, blocks, block_size, kv_heads, head_dim)");
    const int64_t n = x.size(0), num_slots = cache.size(2) * cache.size(3);
    std::optional<at::Tensor> residual;
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& layer = layers[i];
      auto [h, sum] = r1_ops::add_rms_norm(x, residual, layer.input_norm, eps);
      const at::Tensor qkv = (*layer.qkv)(h).view({n, heads + 2 * kv_heads, head_dim});
      r1_ops::rotary_(qkv, heads + kv_heads, cos, sin);  // queries and keys
      const at::Tensor k = qkv.narrow(1, heads, kv_heads), v = qkv.narrow(1, heads + kv_heads, kv_heads);
      const at::Tensor layer_cache = cache[i];
      std::optional<at::Tensor> key_scales, value_scales;
      if (cache_scales) {
        const at::Tensor layer_scales = (*cache_scales)[i];
        r1_ops::write_kv_int8_(k, v, slots, layer_cache.view({2, num_slots, kv_heads, head_dim}),
                               layer_scales.view({2, num_slots, kv_heads}));
        key_scales = layer_scales[0], value_scales = layer_scales[1];
      } else {
        const at::Tensor flat = layer_cache.view({2, num_slots, kv_heads, head_dim});
        flat[0].index_copy_(0, slots, k.to(flat.scalar_type()));
        flat[1].index_copy_(0, slots, v.to(flat.scalar_type()));
      }
      const at::Tensor attended = r1_ops::decode_attention(qkv.narrow(1, 0, heads).contiguous(), layer_cache[0],
                                                           layer_cache[1], key_scales, value_scales, block_tables,
                                                           seq_lens, scale);
      std::tie(h, sum) = r1_ops::add_rms_norm((*layer.o)(attended.reshape({n, heads * head_dim})), sum,
                                              layer.post_norm, eps);
      x = (*layer.down)(r1_ops::silu_mul((*layer.gate_up)(h)));
      residual = sum;
    }
    return std::get<0>(r1_ops::add_rms_norm(x, residual, final_norm, eps));
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1, m) {
  m.class_<Linear>("Linear")
      .def(torch::init<>())
      .def("add_run", &Linear::add_run)
      .def("set_bias", &Linear::set_bias);
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, at::Tensor>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward);
}
