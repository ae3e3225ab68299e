// canet::plan on the GPU: a stable counting sort of users by architecture, in one block.
//
// One block suffices: the planner runs once per batch on a few thousand to a few hundred
// thousand int64s, far below what needs a grid, and a single block avoids both a second launch
// and global atomics. Stability comes from processing the batch in chunks of kPlanThreads users
// in index order: inside a warp, __match_any_sync finds the lanes holding the same config and
// the lane's rank among them; a per-(warp, config) exclusive scan across warps gives the
// offset of each warp's run; a per-config cursor carries the position across chunks.
#include "plan_kernel.cuh"

#include <cassert>

namespace canet {
namespace cuda {
namespace {

__device__ __forceinline__ bool key_less(const int64_t* table, int a, int b) {
  const int64_t* ka = table + 3 * a;
  const int64_t* kb = table + 3 * b;
  if (ka[0] != kb[0]) return ka[0] > kb[0];  // deepest first: active users form a prefix
  if (ka[1] != kb[1]) return ka[1] < kb[1];
  if (ka[2] != kb[2]) return ka[2] < kb[2];
  return a < b;
}

__global__ void __launch_bounds__(kPlanThreads)
    plan_kernel(const int64_t* __restrict__ ids, int64_t B, const int64_t* __restrict__ table,
                int C, int64_t max_depth, int64_t* __restrict__ order,
                int64_t* __restrict__ inverse, int64_t* __restrict__ group_config,
                int64_t* __restrict__ group_offsets, int64_t* __restrict__ layer_active) {
  extern __shared__ unsigned long long smem[];
  unsigned long long* cursor = smem;                       // [C] counts, then running positions
  int* group_cfg = reinterpret_cast<int*>(cursor + C);     // [C] config of group g
  int* warp_cnt = group_cfg + C;                           // [kPlanWarps * C]
  int* chunk_tot = warp_cnt + kPlanWarps * C;              // [C]

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  // Rank of each config under the group key; C <= kPlanMaxConfigs keeps the O(C^2) cheap.
  for (int c = tid; c < C; c += kPlanThreads) {
    int rank = 0;
    for (int o = 0; o < C; ++o) rank += key_less(table, o, c) ? 1 : 0;
    group_cfg[rank] = c;
    group_config[rank] = c;
    cursor[c] = 0;
  }
  __syncthreads();

  // Integer adds commute, so the histogram is deterministic despite the atomics.
  for (int64_t i = tid; i < B; i += kPlanThreads) {
    const int64_t c = ids[i];
    assert(c >= 0 && c < C);
    if (c >= 0 && c < C) atomicAdd(&cursor[c], 1ull);
  }
  __syncthreads();

  for (int64_t d = tid; d < max_depth; d += kPlanThreads) {
    unsigned long long active = 0;
    for (int c = 0; c < C; ++c) active += table[3 * c] > d ? cursor[c] : 0ull;
    layer_active[d] = static_cast<int64_t>(active);
  }
  __syncthreads();  // the scan below overwrites the counts read above
  // Exclusive scan over groups by warp 0, 32 groups per step; counts become start cursors.
  if (warp == 0) {
    unsigned long long carry = 0;
    for (int base = 0; base < C; base += 32) {
      const int g = base + lane;
      const unsigned long long n = g < C ? cursor[group_cfg[g]] : 0ull;
      unsigned long long incl = n;
      for (int s = 1; s < 32; s <<= 1) {
        const unsigned long long up = __shfl_up_sync(0xffffffffu, incl, s);
        if (lane >= s) incl += up;
      }
      const unsigned long long start = carry + incl - n;
      __syncwarp();  // every lane has read its count before any cursor is overwritten
      if (g < C) {
        group_offsets[g] = static_cast<int64_t>(start);
        cursor[group_cfg[g]] = start;
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) group_offsets[C] = static_cast<int64_t>(carry);
  }
  __syncthreads();

  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = 0; base < B; base += kPlanThreads) {
    for (int k = tid; k < kPlanWarps * C; k += kPlanThreads) warp_cnt[k] = 0;
    __syncthreads();

    const int64_t i = base + tid;
    const int64_t raw = i < B ? ids[i] : -1;
    const int c = (raw >= 0 && raw < C) ? static_cast<int>(raw) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, c);
    const int rank_in_warp = __popc(peers & lanes_below);
    if (c >= 0 && rank_in_warp == 0) warp_cnt[warp * C + c] = __popc(peers);
    __syncthreads();

    for (int cc = tid; cc < C; cc += kPlanThreads) {
      int run = 0;
      for (int w = 0; w < kPlanWarps; ++w) {
        const int n = warp_cnt[w * C + cc];
        warp_cnt[w * C + cc] = run;
        run += n;
      }
      chunk_tot[cc] = run;
    }
    __syncthreads();

    if (c >= 0) {
      const int64_t r =
          static_cast<int64_t>(cursor[c]) + warp_cnt[warp * C + c] + rank_in_warp;
      order[r] = i;
      inverse[i] = r;
    }
    __syncthreads();
    for (int cc = tid; cc < C; cc += kPlanThreads) cursor[cc] += chunk_tot[cc];
    // The next iteration's first barrier orders these updates before the cursors are read.
  }
}

}  // namespace

cudaError_t plan_launch(const int64_t* config_ids, int64_t B, const int64_t* config_table,
                        int64_t C, int64_t max_depth, int64_t* order, int64_t* inverse,
                        int64_t* group_config, int64_t* group_offsets, int64_t* layer_active,
                        cudaStream_t stream) {
  if (C < 1 || C > kPlanMaxConfigs || B < 0) return cudaErrorInvalidValue;
  plan_kernel<<<1, kPlanThreads, plan_shared_bytes(C), stream>>>(
      config_ids, B, config_table, static_cast<int>(C), max_depth < 0 ? 0 : max_depth, order,
      inverse, group_config, group_offsets, layer_active);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace canet
