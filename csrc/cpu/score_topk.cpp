// CPU kernel of canet::score_topk, plus the input checks shared with the CUDA binding.
//
// Users are processed in tiles of kUserTile over chunks of kItemChunk items: a chunk of weight
// rows (converted once to the accumulation type) is reused by every user of the tile while it
// is hot in L1/L2, and the [B, N+1] score matrix never exists. Each user keeps a heap of its
// k best (score, id); items arrive in ascending id order, so an item whose score only equals
// the current worst is never better (the tie rule prefers the smaller id) and the heap only
// changes on a strictly larger score.
#include "../score_topk.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
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

constexpr int64_t kUserTile = 8;
constexpr int64_t kItemChunk = 64;

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

// Eight independent partial sums let the compiler vectorise without reassociating a single
// floating-point chain (which it may not do without -ffast-math).
template <typename acc_t>
inline acc_t dot(const acc_t* x, const acc_t* w, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) part[l] += x[j + l] * w[j + l];
  }
  acc_t tail = 0;
  for (; j < n; ++j) tail += x[j] * w[j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) +
         tail;
}

template <typename scalar_t>
void score_topk_kernel(const at::Tensor& hidden, const int64_t* sizes, const at::Tensor& weight,
                       const at::Tensor& bias, const int64_t* history, int64_t history_len,
                       int64_t k, int64_t* out_ids, void* out_scores_raw) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  acc_t* out_scores = static_cast<acc_t*>(out_scores_raw);
  const int64_t B = hidden.size(0);
  const int64_t rows = weight.size(0);
  const int64_t H = weight.size(1);
  const int64_t h_cap = std::min(hidden.size(1), H);
  const int64_t hidden_stride = hidden.stride(0);
  const int64_t weight_stride = weight.stride(0);
  const scalar_t* hid = hidden.data_ptr<scalar_t>();
  const scalar_t* w = weight.data_ptr<scalar_t>();
  const scalar_t* bias_p = bias.data_ptr<scalar_t>();
  const int64_t tiles = (B + kUserTile - 1) / kUserTile;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<acc_t> x(static_cast<size_t>(kUserTile * h_cap));
    std::vector<acc_t> w_chunk(static_cast<size_t>(kItemChunk * h_cap));
    std::vector<acc_t> b_chunk(kItemChunk);
    std::vector<std::vector<Candidate<acc_t>>> heaps(kUserTile);
    std::vector<std::vector<int64_t>> excluded(kUserTile);  // sorted history ids per user
    std::vector<size_t> excl_pos(kUserTile);
    auto worse_on_top = [](const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
      return ranks_before(a, b);
    };

    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t u0 = tile * kUserTile;
      const int64_t nu = std::min(kUserTile, B - u0);
      int64_t tile_h = 0;
      for (int64_t t = 0; t < nu; ++t) {
        const int64_t u = u0 + t;
        const int64_t h = sizes[u];
        tile_h = std::max(tile_h, h);
        // Only the first h entries are read: the rest of the row may hold anything (NaN).
        for (int64_t j = 0; j < h; ++j) {
          x[t * h_cap + j] = static_cast<acc_t>(hid[u * hidden_stride + j]);
        }
        heaps[t].clear();
        heaps[t].reserve(static_cast<size_t>(k));
        excluded[t].clear();
        excluded[t].push_back(0);  // the padding item is never a candidate
        for (int64_t l = 0; l < history_len; ++l) {
          const int64_t id = history[u * history_len + l];
          if (id > 0 && id < rows) excluded[t].push_back(id);
        }
        std::sort(excluded[t].begin(), excluded[t].end());
        excl_pos[t] = 0;
      }

      for (int64_t base = 0; base < rows; base += kItemChunk) {
        const int64_t n_items = std::min(kItemChunk, rows - base);
        for (int64_t i = 0; i < n_items; ++i) {
          const scalar_t* src = w + (base + i) * weight_stride;
          acc_t* dst = w_chunk.data() + i * h_cap;
          for (int64_t j = 0; j < tile_h; ++j) dst[j] = static_cast<acc_t>(src[j]);
          b_chunk[i] = static_cast<acc_t>(bias_p[base + i]);
        }
        for (int64_t t = 0; t < nu; ++t) {
          const int64_t h = sizes[u0 + t];
          const acc_t* xu = x.data() + t * h_cap;
          auto& heap = heaps[t];
          const auto& excl = excluded[t];
          size_t& ep = excl_pos[t];
          for (int64_t i = 0; i < n_items; ++i) {
            const int64_t id = base + i;
            while (ep < excl.size() && excl[ep] < id) ++ep;
            if (ep < excl.size() && excl[ep] == id) continue;
            acc_t s = dot(xu, w_chunk.data() + i * h_cap, h) + b_chunk[i];
            if (std::isnan(s)) s = neg_inf;  // NaN ranks like -inf, so the order stays total
            if (static_cast<int64_t>(heap.size()) < k) {
              heap.push_back({s, id});
              std::push_heap(heap.begin(), heap.end(), worse_on_top);
            } else if (s > heap.front().score) {
              std::pop_heap(heap.begin(), heap.end(), worse_on_top);
              heap.back() = {s, id};
              std::push_heap(heap.begin(), heap.end(), worse_on_top);
            }
          }
        }
      }

      for (int64_t t = 0; t < nu; ++t) {
        auto& heap = heaps[t];
        std::sort(heap.begin(), heap.end(), ranks_before<acc_t>);
        const int64_t u = u0 + t;
        for (int64_t r = 0; r < k; ++r) {
          const bool filled = r < static_cast<int64_t>(heap.size());
          out_ids[u * k + r] = filled ? heap[r].id : -1;
          out_scores[u * k + r] = filled ? heap[r].score : neg_inf;
        }
      }
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
