// Torch-free interface of the canet::plan CUDA kernel: raw device pointers and a stream, so the
// kernel compiles (and can be tested) with plain nvcc, without torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace canet {
namespace cuda {

// Threads of the single block that plans a whole batch.
constexpr int kPlanThreads = 512;
constexpr int kPlanWarps = kPlanThreads / 32;

// Largest config count the kernel accepts: its shared memory grows as
// plan_shared_bytes(C) and must stay under the 48 KiB available without opt-in.
constexpr int64_t kPlanMaxConfigs = 512;

// Dynamic shared memory the kernel needs for C configs.
inline size_t plan_shared_bytes(int64_t num_configs) {
  // counts/cursor (u64) + group->config (i32) + per-warp counts (i32 x warps) + chunk totals (i32)
  return static_cast<size_t>(num_configs) *
         (sizeof(unsigned long long) + sizeof(int) * (2 + kPlanWarps));
}

// Enqueues the planner on `stream`; one block, no host synchronisation, no allocation.
//   config_ids   [B]      in [0, C)   (out-of-range ids trip a device-side assert)
//   config_table [C, 3]   row-major (depth, hidden, emb), contiguous
//   order, inverse [B]; group_config [C]; group_offsets [C + 1]; layer_active [max_depth]
// Returns cudaErrorInvalidValue for C outside [1, kPlanMaxConfigs] or B < 0, else the launch
// status (cudaGetLastError after the launch).
cudaError_t plan_launch(const int64_t* config_ids, int64_t B, const int64_t* config_table,
                        int64_t C, int64_t max_depth, int64_t* order, int64_t* inverse,
                        int64_t* group_config, int64_t* group_offsets, int64_t* layer_active,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace canet
