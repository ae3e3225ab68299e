// CPU kernel of canet::plan: O(B + C log C + max_depth) stable counting sort.
#include "../plan.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace canet {

PlanResult plan_cpu(const at::Tensor& config_ids, const at::Tensor& config_table,
                    int64_t given_max_depth) {
  check_plan_inputs(config_ids, config_table, given_max_depth);
  TORCH_CHECK(config_ids.device().is_cpu(), "canet::plan (CPU kernel): expected CPU tensors, got ",
              config_ids.device());
  const at::Tensor ids_c = config_ids.contiguous();
  const at::Tensor table_c = config_table.contiguous();
  const int64_t B = ids_c.size(0);
  const int64_t C = table_c.size(0);
  const int64_t* ids = ids_c.data_ptr<int64_t>();
  const int64_t* table = table_c.data_ptr<int64_t>();
  auto depth = [&](int64_t c) { return table[3 * c]; };

  // Group order: depth descending so that the users still active at layer i are a prefix of the
  // sorted rows; then hidden, emb, config id ascending so the order is total and reproducible.
  std::vector<int64_t> group_cfg(C);
  std::iota(group_cfg.begin(), group_cfg.end(), int64_t{0});
  std::sort(group_cfg.begin(), group_cfg.end(), [&](int64_t a, int64_t b) {
    const int64_t* ka = table + 3 * a;
    const int64_t* kb = table + 3 * b;
    if (ka[0] != kb[0]) return ka[0] > kb[0];
    if (ka[1] != kb[1]) return ka[1] < kb[1];
    if (ka[2] != kb[2]) return ka[2] < kb[2];
    return a < b;
  });

  std::vector<int64_t> counts(C, 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t c = ids[i];
    TORCH_CHECK(c >= 0 && c < C, "canet::plan: config_ids must be in [0, ", C,
                "), got config_ids[", i, "] = ", c);
    ++counts[c];
  }

  auto opts = at::TensorOptions().dtype(at::kLong).device(at::kCPU);
  at::Tensor group_config = at::empty({C}, opts);
  at::Tensor group_offsets = at::empty({C + 1}, opts);
  int64_t* gc = group_config.data_ptr<int64_t>();
  int64_t* go = group_offsets.data_ptr<int64_t>();
  std::vector<int64_t> cursor(C);
  int64_t running = 0;
  for (int64_t g = 0; g < C; ++g) {
    const int64_t c = group_cfg[g];
    gc[g] = c;
    go[g] = running;
    cursor[c] = running;
    running += counts[c];
  }
  go[C] = running;

  // Visiting users in index order and appending makes the placement stable.
  at::Tensor order = at::empty({B}, opts);
  at::Tensor inverse = at::empty({B}, opts);
  int64_t* ord = order.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    const int64_t r = cursor[ids[i]]++;
    ord[r] = i;
    inv[i] = r;
  }

  int64_t max_depth = 0;
  for (int64_t c = 0; c < C; ++c) max_depth = std::max(max_depth, depth(c));
  TORCH_CHECK(given_max_depth < 0 || given_max_depth == max_depth,
              "canet::plan: max_depth must equal the table's largest depth ", max_depth,
              " (or be -1), got ", given_max_depth);
  // users_at_depth[d] = #users of depth exactly d; layer_active[i] is its suffix sum over d > i.
  std::vector<int64_t> users_at_depth(static_cast<size_t>(max_depth) + 1, 0);
  for (int64_t c = 0; c < C; ++c) {
    if (depth(c) > 0) users_at_depth[depth(c)] += counts[c];
  }
  at::Tensor layer_active = at::empty({max_depth}, opts);
  int64_t* la = layer_active.data_ptr<int64_t>();
  int64_t active = 0;
  for (int64_t i = max_depth - 1; i >= 0; --i) {
    active += users_at_depth[i + 1];
    la[i] = active;
  }
  return {order, inverse, group_config, group_offsets, layer_active};
}

}  // namespace canet

TORCH_LIBRARY_IMPL(canet, CPU, m) { m.impl("plan", &canet::plan_cpu); }
