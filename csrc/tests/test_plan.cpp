// C++ unit test of the CPU canet::plan kernel, direct and through the dispatcher.
// Built by CMakeLists.txt and run by ctest; exits non-zero on the first failed check.
#include "plan.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

// The paper's space: hidden-major, then depth, then emb (config 0 = (2, 64, 64)).
at::Tensor default_table() {
  std::vector<int64_t> rows;
  for (int64_t h : {64, 96, 128})
    for (int64_t d : {2, 4, 6, 8})
      for (int64_t e : {64, 96, 128}) rows.insert(rows.end(), {d, h, e});
  return at::tensor(rows, at::kLong).view({36, 3});
}

void check_invariants(const at::Tensor& ids, const at::Tensor& table, const canet::PlanResult& p,
                      const std::string& name) {
  const auto& [order, inverse, group_config, group_offsets, layer_active] = p;
  const int64_t B = ids.size(0);
  const int64_t C = table.size(0);
  auto id = ids.accessor<int64_t, 1>();
  auto tb = table.accessor<int64_t, 2>();
  auto ord = order.accessor<int64_t, 1>();
  auto inv = inverse.accessor<int64_t, 1>();
  auto gc = group_config.accessor<int64_t, 1>();
  auto go = group_offsets.accessor<int64_t, 1>();
  check(order.size(0) == B && inverse.size(0) == B, name + ": order/inverse have B rows");
  check(go[0] == 0 && go[C] == B, name + ": group_offsets spans [0, B]");
  for (int64_t r = 0; r < B; ++r) check(inv[ord[r]] == r, name + ": inverse[order[r]] == r");
  for (int64_t g = 0; g < C; ++g) {
    if (g + 1 < C) {
      const int64_t a = gc[g], b = gc[g + 1];
      const bool ordered = tb[a][0] != tb[b][0]   ? tb[a][0] > tb[b][0]
                           : tb[a][1] != tb[b][1] ? tb[a][1] < tb[b][1]
                           : tb[a][2] != tb[b][2] ? tb[a][2] < tb[b][2]
                                                  : a < b;
      check(ordered, name + ": groups follow (depth desc, hidden, emb, id)");
    }
    for (int64_t r = go[g]; r < go[g + 1]; ++r) {
      check(id[ord[r]] == gc[g], name + ": row in the group of its config");
      if (r > go[g]) check(ord[r - 1] < ord[r], name + ": stable within a group");
    }
  }
  auto la = layer_active.accessor<int64_t, 1>();
  for (int64_t i = 0; i < layer_active.size(0); ++i) {
    int64_t deeper = 0;
    for (int64_t u = 0; u < B; ++u) deeper += tb[id[u]][0] > i ? 1 : 0;
    check(la[i] == deeper, name + ": layer_active counts users deeper than i");
    for (int64_t r = 0; r < la[i]; ++r)
      check(tb[id[ord[r]]][0] > i, name + ": active users are a prefix of sorted rows");
  }
}

bool same_plan(const canet::PlanResult& a, const canet::PlanResult& b) {
  return at::equal(std::get<0>(a), std::get<0>(b)) && at::equal(std::get<1>(a), std::get<1>(b)) &&
         at::equal(std::get<2>(a), std::get<2>(b)) && at::equal(std::get<3>(a), std::get<3>(b)) &&
         at::equal(std::get<4>(a), std::get<4>(b));
}

template <typename F>
void expect_error(F&& f, const std::string& name) {
  try {
    f();
    check(false, name + ": expected c10::Error");
  } catch (const c10::Error&) {
  }
}

}  // namespace

int main() {
  const at::Tensor table = default_table();
  at::manual_seed(0);
  for (int64_t B : {0, 1, 7, 1000}) {
    const at::Tensor ids = at::randint(36, {B}, at::kLong);
    const auto p = canet::plan_cpu(ids, table, /*max_depth=*/-1);
    check_invariants(ids, table, p, "B=" + std::to_string(B));
    check(std::get<4>(p).size(0) == 8, "layer_active has max_depth entries");
    // The engine passes the space's max_depth; it must give the plan read from the table.
    const auto given = canet::plan_cpu(ids, table, /*max_depth=*/8);
    check(same_plan(p, given), "max_depth=8 gives the plan of max_depth=-1");
  }

  const at::Tensor one = at::tensor(std::vector<int64_t>{5, 64, 32}, at::kLong).view({1, 3});
  const at::Tensor nine = at::zeros({9}, at::kLong);
  check_invariants(nine, one, canet::plan_cpu(nine, one, -1), "C=1");

  // Through the dispatcher: the schema from ops.cpp and the CPU kernel are both registered.
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("canet::plan", "")
                .typed<canet::PlanResult(const at::Tensor&, const at::Tensor&, int64_t)>();
  const at::Tensor ids = at::randint(36, {257}, at::kLong);
  const auto direct = canet::plan_cpu(ids, table, -1);
  check(same_plan(direct, op.call(ids, table, -1)), "the dispatcher gives the same plan");

  expect_error([&] { canet::plan_cpu(ids.to(at::kInt), table, -1); }, "int32 ids");
  expect_error([&] { canet::plan_cpu(at::full({3}, 36, at::kLong), table, -1); },
               "id out of range");
  expect_error([&] { canet::plan_cpu(ids, table.narrow(1, 0, 2), -1); }, "table [C, 2]");
  expect_error([&] { canet::plan_cpu(ids, table.narrow(0, 0, 0), -1); }, "C = 0");
  expect_error([&] { canet::plan_cpu(ids, table, 6); }, "max_depth below the table's");
  expect_error([&] { op.call(ids, table, -2); }, "max_depth = -2 (dispatcher)");

  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("test_plan: all checks passed\n");
  return EXIT_SUCCESS;
}
