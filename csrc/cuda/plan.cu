// Thin torch binding of the canet::plan CUDA kernel (the kernel itself is in plan_kernel.cu).
#include "../plan.h"
#include "plan_kernel.cuh"

#include <ATen/ATen.h>
#include <c10/core/TensorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <mutex>

namespace canet {
namespace {

// layer_active's length is max(config_table[:, 0]), a value on the device: reading it costs a
// host sync. The engine passes the same config_table tensor every batch, so the value is cached
// per tensor (weak reference + version counter): a freed or modified-in-place table misses.
int64_t cached_max_depth(const at::Tensor& table) {
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  static std::mutex mu;
  static WeakImpl cached_impl{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  static uint32_t cached_version = 0;
  static int64_t cached_value = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto alive = cached_impl.lock();
    if (alive.defined() && alive.get() == table.unsafeGetTensorImpl() &&
        cached_version == table._version()) {
      return cached_value;
    }
  }
  const int64_t value = table.select(1, 0).max().item<int64_t>();
  std::lock_guard<std::mutex> lock(mu);
  cached_impl = WeakImpl(table.getIntrusivePtr());
  cached_version = table._version();
  cached_value = value;
  return value;
}

PlanResult plan_cuda(const at::Tensor& config_ids, const at::Tensor& config_table) {
  check_plan_inputs(config_ids, config_table);
  TORCH_CHECK(config_ids.is_cuda(), "canet::plan (CUDA kernel): expected CUDA tensors, got ",
              config_ids.device());
  const int64_t C = config_table.size(0);
  TORCH_CHECK(C <= cuda::kPlanMaxConfigs, "canet::plan (CUDA kernel): supports at most ",
              cuda::kPlanMaxConfigs, " configs, got C = ", C);
  const c10::cuda::CUDAGuard guard(config_ids.device());
  const at::Tensor ids = config_ids.contiguous();
  const at::Tensor table = config_table.contiguous();
  const int64_t B = ids.size(0);
  const int64_t max_depth = std::max<int64_t>(cached_max_depth(config_table), 0);

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
