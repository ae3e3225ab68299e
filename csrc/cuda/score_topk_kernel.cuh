// Torch-free interface of the canet::score_topk CUDA kernels: raw device pointers and a stream,
// so the kernels compile (and can be tested) with plain nvcc, without torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace canet {
namespace cuda {

enum class ScoreDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest k: a block keeps k candidates per user of its tile in shared memory.
constexpr int kScoreTopkMaxK = 200;
// Users per block of the scoring kernel, and items per inner tile (one MMA pass).
constexpr int kScoreUserTile = 64;
constexpr int kScoreItemTile = 128;

struct ScoreTopkArgs {
  const void* hidden;          // [B, h_max] rows of hidden_stride elements, unit inner stride
  const int64_t* hidden_sizes; // [B], clamped to [0, min(h_max, H)] in the kernel
  const void* weight;          // [rows, H] rows of weight_stride elements, unit inner stride
  const void* bias;            // [rows]
  const int64_t* history;      // [B, history_len] contiguous, or null; ids outside [1, rows) ignored
  int64_t batch;
  int64_t h_max;
  int64_t hidden_stride;
  int64_t rows;                // N + 1, at most 2^31 - 1
  int64_t H;
  int64_t weight_stride;
  int64_t history_len;
  int k;                       // [1, kScoreTopkMaxK]
  ScoreDtype dtype;
  int64_t* out_ids;            // [B, k] contiguous
  float* out_scores;           // [B, k] contiguous
};

// Item chunks the scoring kernel splits the catalogue into (grid x), chosen so that the grid
// has a few blocks per SM even for small batches, while the merge reads at most ~16k
// candidates per user.
int64_t score_topk_num_chunks(int64_t batch, int64_t rows, int k, int num_sms);

// Dynamic shared memory per block of the scoring kernel for this k and dtype (it grows with
// k: the candidates of the block's users live there). H100/A100 fit every k <= 200; GPUs with
// ~100 KB per block (sm_86/sm_89) fit k up to about 70.
size_t score_topk_shared_bytes(int k, ScoreDtype dtype);

// Bytes of the scratch buffer (per-chunk candidates) score_topk_launch needs; 256-byte aligned.
size_t score_topk_workspace_bytes(int64_t batch, int64_t num_chunks, int k);

// Enqueues the scoring kernel and the merge on `stream`: no host synchronisation, no
// allocation (the caller provides `workspace` of score_topk_workspace_bytes). Returns
// cudaErrorInvalidValue on out-of-contract sizes, else the launch status.
cudaError_t score_topk_launch(const ScoreTopkArgs& args, int64_t num_chunks, void* workspace,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace canet
