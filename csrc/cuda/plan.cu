// Thin torch binding of the canet::plan CUDA kernel (the kernel itself is in plan_kernel.cu).
#include "../plan.h"
#include "plan_kernel.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace canet {
namespace {

PlanResult plan_cuda(const at::Tensor& config_ids, const at::Tensor& config_table,
                     int64_t given_max_depth) {
  check_plan_inputs(config_ids, config_table, given_max_depth);
  TORCH_CHECK(config_ids.is_cuda(), "canet::plan (CUDA kernel): expected CUDA tensors, got ",
              config_ids.device());
  const int64_t C = config_table.size(0);
  TORCH_CHECK(C <= cuda::kPlanMaxConfigs, "canet::plan (CUDA kernel): supports at most ",
              cuda::kPlanMaxConfigs, " configs, got C = ", C);
  const c10::cuda::CUDAGuard guard(config_ids.device());
  const at::Tensor ids = config_ids.contiguous();
  const at::Tensor table = config_table.contiguous();
  const int64_t B = ids.size(0);
  // layer_active's length. Trusted when given (checking it would need the table's values on
  // the host); a wrong value only changes how many layers are counted, never the writes' bounds.
  const int64_t max_depth =
      given_max_depth >= 0
          ? given_max_depth
          : std::max<int64_t>(table.select(1, 0).max().item<int64_t>(), 0);  // host sync

  auto opts = ids.options();
  at::Tensor order = at::empty({B}, opts);
  at::Tensor inverse = at::empty({B}, opts);
  at::Tensor group_config = at::empty({C}, opts);
  at::Tensor group_offsets = at::empty({C + 1}, opts);
  at::Tensor layer_active = at::empty({max_depth}, opts);
  const cudaError_t err = cuda::plan_launch(
      ids.data_ptr<int64_t>(), B, table.data_ptr<int64_t>(), C, max_depth,
      order.data_ptr<int64_t>(), inverse.data_ptr<int64_t>(), group_config.data_ptr<int64_t>(),
      group_offsets.data_ptr<int64_t>(), layer_active.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "canet::plan (CUDA kernel): launch failed: ",
              cudaGetErrorString(err));
  return {order, inverse, group_config, group_offsets, layer_active};
}

}  // namespace
}  // namespace canet

TORCH_LIBRARY_IMPL(canet, CUDA, m) { m.impl("plan", &canet::plan_cuda); }
