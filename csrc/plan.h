// Shared declarations for the canet::plan operator (CPU and CUDA implementations).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace canet {

// (order, inverse, group_config, group_offsets, layer_active); see csrc/ops.cpp for the schema.
using PlanResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks dtype, rank, shape and device agreement; shared by every backend so the messages
// are identical whichever kernel the dispatcher picks.
void check_plan_inputs(const at::Tensor& config_ids, const at::Tensor& config_table,
                       int64_t max_depth);

PlanResult plan_cpu(const at::Tensor& config_ids, const at::Tensor& config_table,
                    int64_t max_depth);

}  // namespace canet
