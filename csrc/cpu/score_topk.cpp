// CPU kernel of canet::score_topk, plus the input checks shared with the CUDA binding.
//
// Users are processed in tiles over chunks of kItemChunk items: each chunk's scores for the
// tile come from one GEMM per hidden size, are offered to the users' top-k heaps while in
// cache, and the [B, N+1] score matrix never exists.
#include "../score_topk.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace canet {

void check_score_topk_inputs(const at::Tensor& hidden, const at::Tensor& hidden_sizes,
                             const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& history, int64_t k) {
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "canet::score_topk: hidden must be float32, float16, bfloat16 or float64, got ",
              dt);
  TORCH_CHECK(weight.scalar_type() == dt && bias.scalar_type() == dt,
              "canet::score_topk: weight and bias must have hidden's dtype ", dt, ", got ",
              weight.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK(hidden_sizes.scalar_type() == at::kLong,
              "canet::score_topk: hidden_sizes must be int64, got ", hidden_sizes.scalar_type());
  TORCH_CHECK(hidden.dim() == 2, "canet::score_topk: hidden must be 2-D [B, h_max], got shape ",
              hidden.sizes());
  const int64_t B = hidden.size(0);
  TORCH_CHECK(hidden_sizes.dim() == 1 && hidden_sizes.size(0) == B,
              "canet::score_topk: hidden_sizes must be [B] = [", B, "], got shape ",
              hidden_sizes.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= 2,
              "canet::score_topk: weight must be [N+1, H] with N >= 1, got shape ",
              weight.sizes());
  const int64_t rows = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == rows, "canet::score_topk: bias must be [N+1] = [",
              rows, "], got shape ", bias.sizes());
  TORCH_CHECK(rows - 1 <= std::numeric_limits<int32_t>::max(),
              "canet::score_topk: at most 2^31 - 1 items, got N = ", rows - 1);
  TORCH_CHECK(k >= 1 && k <= kScoreTopkMaxK && k <= rows - 1, "canet::score_topk: k must be in [1, ",
              std::min<int64_t>(kScoreTopkMaxK, rows - 1), "], got k = ", k);
  const auto dev = hidden.device();
  TORCH_CHECK(hidden_sizes.device() == dev && weight.device() == dev && bias.device() == dev,
              "canet::score_topk: all tensors must be on hidden's device ", dev, ", got ",
              hidden_sizes.device(), ", ", weight.device(), ", ", bias.device());
  if (!score_topk_no_history(history)) {
    TORCH_CHECK(history.scalar_type() == at::kLong,
                "canet::score_topk: history must be int64, got ", history.scalar_type());
    TORCH_CHECK(history.dim() == 2 && history.size(0) == B,
                "canet::score_topk: history must be [B, L] = [", B, ", L], got shape ",
                history.sizes());
    TORCH_CHECK(history.device() == dev, "canet::score_topk: history must be on ", dev,
                ", got ", history.device());
  }
}

namespace {

// A work item is a tile of users; its users are split by hidden size and each size's rows are
// scored against chunks of kItemChunk items with one GEMM (ATen's BLAS), so the chunk's
// weights are read once per tile and the [tile, chunk] scores stay in cache for the
// selection. Tiles are kMaxUserTile users at most and smaller for small batches, so that
// every thread gets work.
constexpr int64_t kMinUserTile = 8;
constexpr int64_t kMaxUserTile = 128;
constexpr int64_t kItemChunk = 512;

template <typename acc_t>
struct Candidate {
  acc_t score;
  int64_t id;
};

// Strict total order "a ranks before b": higher score first, then the smaller id.
template <typename acc_t>
inline bool ranks_before(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// One user's k best so far. Items arrive in ascending id order, so an item whose score only
// equals the current worst is never better (the tie rule prefers the smaller id): once full,
// the heap changes only on a strictly larger score, and NaN (ranked like -inf) never enters.
template <typename acc_t>
class TopK {
 public:
  void reset(int64_t k, const int64_t* history, int64_t history_len, int64_t rows) {
    k_ = static_cast<size_t>(k);
    heap_.clear();
    heap_.reserve(k_);
    excluded_.assign(1, 0);  // the padding item is never a candidate
    for (int64_t l = 0; l < history_len; ++l) {
      const int64_t id = history[l];
      if (id > 0 && id < rows) excluded_.push_back(id);
    }
    std::sort(excluded_.begin(), excluded_.end());
  }

  // Offers items base + [0, n) with scores scores[i] + bias[i].
  void offer(const acc_t* scores, const acc_t* bias, int64_t n, int64_t base) {
    int64_t i = 0;
    for (; i < n && heap_.size() < k_; ++i) insert(scores[i] + bias[i], base + i);
    if (heap_.size() < k_) return;
    // Full: almost every item loses to the current worst, so test a block of them with one
    // branch (the compiler vectorises the test) and look closer only at blocks with a winner.
    constexpr int64_t kBlock = 16;
    acc_t worst = heap_.front().score;
    for (; i < n; i += kBlock) {
      const int64_t len = std::min(kBlock, n - i);
      bool any = false;
      if (len == kBlock) {
        for (int64_t j = 0; j < kBlock; ++j) any |= scores[i + j] + bias[i + j] > worst;
      } else {
        for (int64_t j = 0; j < len; ++j) any |= scores[i + j] + bias[i + j] > worst;
      }
      if (!any) continue;
      for (int64_t j = 0; j < len; ++j) {
        const acc_t score = scores[i + j] + bias[i + j];
        if (score > worst) {
          insert(score, base + i + j);
          worst = heap_.front().score;
        }
      }
    }
  }

  // Best first; slots past the candidates get id -1 and score -inf.
  void write(int64_t* ids, acc_t* scores) {
    std::sort(heap_.begin(), heap_.end(), ranks_before<acc_t>);
    for (size_t r = 0; r < k_; ++r) {
      const bool filled = r < heap_.size();
      ids[r] = filled ? heap_[r].id : -1;
      scores[r] = filled ? heap_[r].score : -std::numeric_limits<acc_t>::infinity();
    }
  }

 private:
  // Candidate check and heap update; with a full heap the caller has seen score beat the worst.
  void insert(acc_t score, int64_t id) {
    if (std::binary_search(excluded_.begin(), excluded_.end(), id)) return;
    if (std::isnan(score)) score = -std::numeric_limits<acc_t>::infinity();
    if (heap_.size() == k_) {
      std::pop_heap(heap_.begin(), heap_.end(), ranks_before<acc_t>);
      heap_.back() = {score, id};
    } else {
      heap_.push_back({score, id});
    }
    std::push_heap(heap_.begin(), heap_.end(), ranks_before<acc_t>);
  }

  size_t k_ = 0;
  std::vector<Candidate<acc_t>> heap_;  // worst on top (ranks_before as the heap's "less")
  std::vector<int64_t> excluded_;       // sorted
};

template <typename scalar_t>
void score_topk_kernel(const at::Tensor& hidden, const int64_t* sizes, const at::Tensor& weight,
                       const at::Tensor& bias, const int64_t* history, int64_t history_len,
                       int64_t k, int64_t* out_ids, void* out_scores_raw) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  // float32/float64 weights are multiplied in place; float16/bfloat16 chunks are widened once
  // per tile (fp32 accumulation, as on the GPU).
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  const auto acc_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  acc_t* out_scores = static_cast<acc_t*>(out_scores_raw);
  const int64_t B = hidden.size(0);
  const int64_t rows = weight.size(0);
  const int64_t h_cap = std::min(hidden.size(1), weight.size(1));
  const int64_t hidden_stride = hidden.stride(0);
  const int64_t weight_stride = weight.stride(0);
  const scalar_t* hid = hidden.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* bias_p = bias.data_ptr<scalar_t>();
  const int64_t per_thread = (B + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t user_tile = std::clamp(per_thread, kMinUserTile, kMaxUserTile);
  const int64_t tiles = (B + user_tile - 1) / user_tile;

  at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    // x: the tile's users, packed per hidden size ([n_run, h] each); scores: [n_run, chunk].
    at::Tensor x = at::empty({user_tile * h_cap}, acc_options);
    at::Tensor scores = at::empty({user_tile * kItemChunk}, acc_options);
    at::Tensor w_wide = kInPlace ? at::Tensor() : at::empty({kItemChunk, h_cap}, acc_options);
    std::vector<acc_t> b_chunk(kItemChunk);
    std::vector<TopK<acc_t>> best(static_cast<size_t>(user_tile));
    std::vector<int64_t> by_size(static_cast<size_t>(user_tile));
    struct Run {
      int64_t h, first, last, x_offset;  // users by_size[first, last) have hidden size h
    };
    std::vector<Run> runs;

    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t u0 = tile * user_tile;
      const int64_t nu = std::min(user_tile, B - u0);
      std::iota(by_size.begin(), by_size.begin() + nu, u0);
      std::stable_sort(by_size.begin(), by_size.begin() + nu,
                       [&](int64_t a, int64_t b) { return sizes[a] < sizes[b]; });
      runs.clear();
      int64_t x_offset = 0, tile_h = 0;
      acc_t* x_p = x.data_ptr<acc_t>();
      for (int64_t r = 0; r < nu; ++r) {
        const int64_t u = by_size[r];
        const int64_t h = sizes[u];
        if (runs.empty() || runs.back().h != h) runs.push_back({h, r, r, x_offset});
        runs.back().last = r + 1;
        // Only the first h entries are read: the rest of the row may hold anything (NaN).
        for (int64_t j = 0; j < h; ++j) x_p[x_offset + j] = static_cast<acc_t>(hid[u * hidden_stride + j]);
        x_offset += h;
        tile_h = std::max(tile_h, h);
        best[u - u0].reset(k, history + u * history_len, history ? history_len : 0, rows);
      }

      for (int64_t base = 0; base < rows; base += kItemChunk) {
        const int64_t n = std::min(kItemChunk, rows - base);
        at::Tensor chunk;  // [n, h_cap] rows with unit inner stride
        if constexpr (kInPlace) {
          chunk = weight.narrow(0, base, n);
        } else {
          acc_t* dst = w_wide.data_ptr<acc_t>();
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t* src = w + (base + i) * weight_stride;
            for (int64_t j = 0; j < tile_h; ++j) dst[i * h_cap + j] = static_cast<acc_t>(src[j]);
          }
          chunk = w_wide.narrow(0, 0, n);
        }
        for (int64_t i = 0; i < n; ++i) b_chunk[i] = static_cast<acc_t>(bias_p[base + i]);

        for (const Run& run : runs) {
          const int64_t m = run.last - run.first;
          at::Tensor s = scores.narrow(0, 0, m * n).view({m, n});
          if (run.h == 0) {
            s.zero_();
          } else {
            at::mm_out(s, x.narrow(0, run.x_offset, m * run.h).view({m, run.h}),
                       chunk.narrow(1, 0, run.h).t());
          }
          const acc_t* s_p = s.data_ptr<acc_t>();
          for (int64_t r = 0; r < m; ++r) {
            best[by_size[run.first + r] - u0].offer(s_p + r * n, b_chunk.data(), n, base);
          }
        }
      }

      for (int64_t t = 0; t < nu; ++t) best[t].write(out_ids + (u0 + t) * k, out_scores + (u0 + t) * k);
    }
  });
}

ScoreTopkResult score_topk_cpu(const at::Tensor& hidden, const at::Tensor& hidden_sizes,
                               const at::Tensor& weight, const at::Tensor& bias,
                               const std::optional<at::Tensor>& history_opt, int64_t k) {
  const at::Tensor history = history_opt.has_value() ? *history_opt : at::Tensor();
  check_score_topk_inputs(hidden, hidden_sizes, weight, bias, history, k);
  TORCH_CHECK(hidden.device().is_cpu(), "canet::score_topk (CPU kernel): expected CPU tensors, got ",
              hidden.device());
  const ScoreTopkOperands in = score_topk_operands(hidden, hidden_sizes, weight, bias, history);
  const int64_t B = hidden.size(0);
  const auto score_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor ids = at::empty({B, k}, hidden.options().dtype(at::kLong));
  at::Tensor scores = at::empty({B, k}, hidden.options().dtype(score_dtype));
  if (B == 0) return {ids, scores};
  const int64_t h_cap = std::min(hidden.size(1), weight.size(1));
  const int64_t* size_p = in.hidden_sizes.data_ptr<int64_t>();
  for (int64_t u = 0; u < B; ++u) {
    TORCH_CHECK(size_p[u] >= 0 && size_p[u] <= h_cap,
                "canet::score_topk: hidden_sizes must be in [0, min(h_max, H)] = [0, ", h_cap,
                "], got hidden_sizes[", u, "] = ", size_p[u]);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "score_topk_cpu",
                                  [&] {
                                    score_topk_kernel<scalar_t>(
                                        in.hidden, size_p, in.weight, in.bias, in.history_ptr(),
                                        in.history_len(), k, ids.data_ptr<int64_t>(),
                                        scores.data_ptr());
                                  });
  return {ids, scores};
}

}  // namespace
}  // namespace canet

TORCH_LIBRARY_IMPL(canet, CPU, m) { m.impl("score_topk", &canet::score_topk_cpu); }
