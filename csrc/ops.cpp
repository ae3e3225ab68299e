// Operator schemas of the canet namespace (declared once, here) and the tiny Python module.
#include "plan.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace canet {

void check_plan_inputs(const at::Tensor& config_ids, const at::Tensor& config_table,
                       int64_t max_depth) {
  TORCH_CHECK(config_ids.scalar_type() == at::kLong,
              "canet::plan: config_ids must be int64, got ", config_ids.scalar_type());
  TORCH_CHECK(config_table.scalar_type() == at::kLong,
              "canet::plan: config_table must be int64, got ", config_table.scalar_type());
  TORCH_CHECK(config_ids.dim() == 1, "canet::plan: config_ids must be 1-D [B], got ",
              config_ids.dim(), "-D with shape ", config_ids.sizes());
  TORCH_CHECK(config_table.dim() == 2 && config_table.size(1) == 3,
              "canet::plan: config_table must be [C, 3] (depth, hidden, emb), got shape ",
              config_table.sizes());
  TORCH_CHECK(config_table.size(0) >= 1,
              "canet::plan: config_table must have at least one config (C >= 1), got C = ",
              config_table.size(0));
  TORCH_CHECK(config_ids.device() == config_table.device(),
              "canet::plan: config_ids and config_table must be on the same device, got ",
              config_ids.device(), " and ", config_table.device());
  TORCH_CHECK(max_depth >= -1, "canet::plan: max_depth must be -1 (read it from the table) or "
              ">= 0, got ", max_depth);
}

}  // namespace canet

TORCH_LIBRARY(canet, m) {
  // max_depth: max(config_table[:, 0]) when the caller knows it (the engine does); -1 reads it
  // from the table, which on CUDA costs a host sync (and so cannot be captured in a graph).
  m.def(
      "plan(Tensor config_ids, Tensor config_table, int max_depth=-1) -> (Tensor order, "
      "Tensor inverse, Tensor group_config, Tensor group_offsets, Tensor layer_active)");
  // The whole routed forward of a batch: scores [B, N+1] in input order (column 0 = -inf).
  // weights: item_emb, pos_emb, in_proj w/b, 14 per block (qkv w/b, out w/b, ln1 w/b,
  // fc1 w/b, fc2 w/b, ln2 w/b, res_scale1, res_scale2 as 0-d), out w/b. block_users: users per
  // work item (0 = automatic). packed: [] or the pack_panels copies below (CPU, float32).
  m.def(
      "routed_scores(Tensor seqs, Tensor order, Tensor group_config, Tensor group_offsets, "
      "Tensor config_table, Tensor[] weights, int heads, int block_users=0, "
      "Tensor[]? packed=None) -> Tensor");
  // The same forward, stopped before the output layer: the last position's hidden states
  // [B, H] in input order, zero past each user's hidden size (canet::score_topk's input).
  m.def(
      "routed_last_hidden(Tensor seqs, Tensor order, Tensor group_config, Tensor group_offsets, "
      "Tensor config_table, Tensor[] weights, int heads, int block_users=0, "
      "Tensor[]? packed=None) -> Tensor");
  // The float32 GEMM weights of routed_scores / routed_last_hidden packed once (their `packed`
  // argument: in_proj, then per block q, k, v, out, fc1, fc2): rows [row0, row0 + rows) of
  // weight as [ceil(rows / 16), K, 16] column panels (csrc/cpu/packed_gemm.h).
  m.def("pack_panels(Tensor weight, int row0, int rows) -> Tensor");
  // Router logits [B, C]: weights item_emb, pos_emb, the 14 block tensors, head w/b.
  m.def("router_logits(Tensor seqs, Tensor[] weights, int heads, int block_users=0) -> Tensor");
  // Top-k items per user from last-position hidden states, without the [B, N+1] score matrix:
  // ids [B, k] int64 (-1 past the last candidate), scores [B, k] fp32 (fp64 for fp64 inputs).
  m.def(
      "score_topk(Tensor hidden, Tensor hidden_sizes, Tensor weight, Tensor bias, "
      "Tensor? history, int k) -> (Tensor ids, Tensor scores)");
}

// cpp_extension defines TORCH_EXTENSION_NAME; the CMake development build does not, so it
// stays free of Python and links only against libtorch.
#ifdef TORCH_EXTENSION_NAME
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "canet native extension: registers the canet::* operators with torch";
  mod.def("build_info", []() {
    py::dict info;
#ifdef CANET_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    return info;
  }, "What this build of the extension contains: {'cuda': bool}. The operators it registers "
     "are listed once, in canet/_ext.py (OPS), and queried from torch's dispatcher.");
}
#endif
