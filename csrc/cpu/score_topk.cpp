// CPU kernel of canet::score_topk, plus the input checks shared with the CUDA binding.
//
// Users are processed in tiles over chunks of items: each chunk's scores for the tile come
// from one GEMM per hidden size and are offered to the users' top-k heaps while in cache; the
// [B, N+1] score matrix never exists. The GEMM only selects: its rounding depends on the tile
// (position in the chunk, batch, thread count), so every item that could enter a heap is
// re-scored with a fixed-order dot product, and results are the same bits whatever the batch,
// the threads or the item's position (equal rows score equal, ties break by id). Runs of a
// few users (small batches) skip the GEMM and score every item exactly.
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
// scored against chunks of items with one GEMM (ATen's BLAS), so the chunk's weights are read
// once per tile and the [tile, chunk] scores stay in cache for the selection. Tiles are as
// large as the batch allows (kMaxUserTile at most); threads share the work through the
// catalogue split into parts when there are fewer tiles than threads.
constexpr int64_t kMinUserTile = 8;
constexpr int64_t kMaxUserTile = 128;
// Items per chunk: about kChunkScores scores per tile (256 KB in fp64), 512 to 4096 items;
// small tiles take long chunks so that the per-GEMM overhead stays small.
constexpr int64_t kChunkScores = 32768;
constexpr int64_t kMinItemChunk = 512;
constexpr int64_t kMaxItemChunk = 4096;
// Items per catalogue part at least: below that, a part's fixed costs (packing the users,
// their exclusions, filling the heaps) outweigh what another thread saves.
constexpr int64_t kMinPartItems = 1024;
// Runs of this many users or fewer skip the GEMM: exact dot products for every item are
// cheaper than a thin GEMM plus the bound's norms (measured crossover: 16-32 users, 2 cores).
constexpr int64_t kMaxExactOnlyRun = 16;

// The exact score's dot product: one fixed summation order for every caller. Eight
// independent partial sums let the compiler vectorise without reassociating a single chain
// (which it may not do without -ffast-math).
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

// What the selection needs of one chunk of items, for users of one hidden size h: the bias,
// and a bound on |GEMM score - exact score|. Any two summation orders of a length-h dot
// product differ by at most 2 gamma_h sum_j |x_j w_j| <= 2 gamma_h |x| |w[:h]| <= 2 gamma_h
// |x| |w| (Cauchy-Schwarz; |w| over the whole row), and adding the bias rounds once more, so
// slack = rel (|x| |w_i| + |b_i|) with rel = 2 (h + 2) eps covers both, about twice over.
// Products in the subnormal range round with an absolute error instead: floor = 4 (h + 2)
// times the smallest subnormal covers those. A GEMM in reduced precision (float32 matmul set
// to tf32/bf16 for oneDNN) gets rel = 1/64, wider than bf16's rounding of its operands.
template <typename acc_t>
struct ChunkBounds {
  int64_t base, n;        // items base + [0, n)
  const acc_t* bias;      // [n]
  const acc_t* norm;      // [n] |w_i|
  const acc_t* abs_bias;  // [n] |b_i|
  acc_t rel, floor;
};

// |v| without underflow to 0 or overflow of the squares: float squares are summed in double
// (whose range holds them all); double is scaled by its largest magnitude first, as LAPACK's
// nrm2 does. inf and NaN come back as inf and NaN.
inline float stable_norm(const float* v, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(v[j]) * v[j];
  return static_cast<float>(std::sqrt(sum));
}

inline double stable_norm(const double* v, int64_t n) {
  double big = 0;
  for (int64_t j = 0; j < n; ++j) big = std::max(big, std::abs(v[j]));
  if (!(big > 0) || !std::isfinite(big)) {
    for (int64_t j = 0; j < n; ++j) {
      if (std::isnan(v[j])) return v[j];
    }
    return big;
  }
  const double inv = 1 / big;
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (v[j] * inv) * (v[j] * inv);
  return big * std::sqrt(sum);
}

// Writes the first `count` of `ranked` (best first) into k slots; slots past them get id -1
// and score -inf.
template <typename acc_t>
void write_ranked(const Candidate<acc_t>* ranked, size_t count, int64_t k, int64_t* ids,
                  acc_t* scores) {
  for (int64_t r = 0; r < k; ++r) {
    const bool filled = static_cast<size_t>(r) < count;
    ids[r] = filled ? ranked[r].id : -1;
    scores[r] = filled ? ranked[r].score : -std::numeric_limits<acc_t>::infinity();
  }
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

  // Offers the items of one chunk to this user. `approx` holds the GEMM's scores (bias not
  // added); an item can only beat the current worst if approx + bias + its slack does, and
  // only then is its exact score computed.
  template <typename Exact>
  void offer(const acc_t* approx, const ChunkBounds<acc_t>& chunk, acc_t x_norm,
             const Exact& exact) {
    const int64_t n = chunk.n;
    int64_t i = 0;
    for (; i < n && heap_.size() < k_; ++i) insert(exact(i), chunk.base + i);
    if (heap_.size() < k_) return;
    // Full: almost every item loses, so test a block of them with one branch (the compiler
    // vectorises the test) and look closer only at blocks with a possible winner.
    constexpr int64_t kBlock = 16;
    const acc_t* b = chunk.bias;
    const acc_t* norm = chunk.norm;
    const acc_t* abs_b = chunk.abs_bias;
    const acc_t rel = chunk.rel, floor = chunk.floor;
    acc_t worst = heap_.front().score;
    // "Not provably below the worst": a NaN anywhere in the bound (non-finite weights or
    // bias, 0 * inf) means re-score, never skip.
    auto may_win = [&](int64_t t) {
      return !(approx[t] + b[t] + (rel * (x_norm * norm[t] + abs_b[t]) + floor) <= worst);
    };
    for (; i < n; i += kBlock) {
      const int64_t len = std::min(kBlock, n - i);
      bool any = false;
      if (len == kBlock) {
        for (int64_t j = 0; j < kBlock; ++j) any |= may_win(i + j);
      } else {
        for (int64_t j = 0; j < len; ++j) any |= may_win(i + j);
      }
      if (!any) continue;
      for (int64_t j = 0; j < len; ++j) {
        if (!may_win(i + j)) continue;
        const acc_t score = exact(i + j);
        if (score > worst) {
          insert(score, chunk.base + i + j);
          worst = heap_.front().score;
        }
      }
    }
  }

  // Offers items base + [0, n) by their exact scores alone (runs of a few users, where a GEMM
  // and the bound would cost more than they save).
  template <typename Exact>
  void offer_exact(int64_t base, int64_t n, const Exact& exact) {
    int64_t i = 0;
    for (; i < n && heap_.size() < k_; ++i) insert(exact(i), base + i);
    for (; i < n; ++i) {
      const acc_t score = exact(i);
      if (score > heap_.front().score) insert(score, base + i);
    }
  }

  // Best first; slots past the candidates get id -1 and score -inf.
  void write(int64_t* ids, acc_t* scores) {
    std::sort(heap_.begin(), heap_.end(), ranks_before<acc_t>);
    write_ranked(heap_.data(), heap_.size(), static_cast<int64_t>(k_), ids, scores);
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
  // Large tiles: every tile streams the whole catalogue's weights once, so fewer tiles means
  // less memory traffic. Work for every thread (two items each, for balance) then comes from
  // splitting the catalogue into parts of whole chunks, at least kMinPartItems items each;
  // each part keeps its own top-k per user and the parts are merged at the end. Scores are
  // exact, so the result does not depend on the split.
  const at::Float32Precision matmul_precision =
      at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  const bool reduced_precision_gemm =
      std::is_same_v<acc_t, float> && (matmul_precision == at::Float32Precision::TF32 ||
                                       matmul_precision == at::Float32Precision::BF16);
  const int64_t threads = at::get_num_threads();
  const int64_t user_tile = std::clamp(B, kMinUserTile, kMaxUserTile);
  const int64_t tiles = (B + user_tile - 1) / user_tile;
  const int64_t item_chunk =
      std::clamp((kChunkScores / user_tile + 511) / 512 * 512, kMinItemChunk, kMaxItemChunk);
  const int64_t chunks = (rows + item_chunk - 1) / item_chunk;
  const int64_t parts = std::max<int64_t>(
      1, std::min({(2 * threads + tiles - 1) / tiles, chunks, rows / kMinPartItems}));
  const int64_t part_items = (chunks + parts - 1) / parts * item_chunk;
  // Per part, the users' k best: [parts, B, k] (unused when parts == 1).
  std::vector<int64_t> part_ids(parts > 1 ? static_cast<size_t>(parts * B * k) : 0);
  std::vector<acc_t> part_scores(part_ids.size());

  at::parallel_for(0, tiles * parts, 1, [&](int64_t work_begin, int64_t work_end) {
    // x: the tile's users, packed per hidden size ([n_run, h] each); scores: [n_run, chunk].
    at::Tensor x = at::empty({user_tile * h_cap}, acc_options);
    at::Tensor scores = at::empty({user_tile * item_chunk}, acc_options);
    at::Tensor w_wide = kInPlace ? at::Tensor() : at::empty({item_chunk, h_cap}, acc_options);
    std::vector<acc_t> b_chunk(item_chunk), abs_bias(item_chunk), item_norm(item_chunk);
    std::vector<acc_t> x_norm(static_cast<size_t>(user_tile));
    std::vector<TopK<acc_t>> best(static_cast<size_t>(user_tile));
    std::vector<int64_t> by_size(static_cast<size_t>(user_tile));
    struct Run {
      int64_t h, first, last, x_offset;  // users by_size[first, last) have hidden size h
    };
    std::vector<Run> runs;

    for (int64_t work = work_begin; work < work_end; ++work) {
      const int64_t tile = work / parts, part = work % parts;
      const int64_t first_item = part * part_items;
      const int64_t end_item = std::min(rows, first_item + part_items);
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
        for (int64_t j = 0; j < h; ++j) {
          x_p[x_offset + j] = static_cast<acc_t>(hid[u * hidden_stride + j]);
        }
        x_norm[u - u0] = stable_norm(x_p + x_offset, h);
        x_offset += h;
        tile_h = std::max(tile_h, h);
        best[u - u0].reset(k, history + u * history_len, history ? history_len : 0, rows);
      }

      const bool gemm_runs = std::any_of(runs.begin(), runs.end(), [](const Run& run) {
        return run.last - run.first > kMaxExactOnlyRun;
      });
      for (int64_t base = first_item; base < end_item; base += item_chunk) {
        const int64_t n = std::min(item_chunk, end_item - base);
        at::Tensor chunk;  // [n, h_cap] rows with unit inner stride
        const acc_t* chunk_rows = nullptr;
        int64_t chunk_ld = 0;
        if constexpr (kInPlace) {
          chunk = weight.narrow(0, base, n);
          chunk_rows = w + base * weight_stride;
          chunk_ld = weight_stride;
        } else {
          acc_t* dst = w_wide.data_ptr<acc_t>();
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t* src = w + (base + i) * weight_stride;
            for (int64_t j = 0; j < tile_h; ++j) dst[i * h_cap + j] = static_cast<acc_t>(src[j]);
          }
          chunk = w_wide.narrow(0, 0, n);
          chunk_rows = dst;
          chunk_ld = h_cap;
        }
        for (int64_t i = 0; i < n; ++i) {
          b_chunk[i] = static_cast<acc_t>(bias_p[base + i]);
          abs_bias[i] = std::abs(b_chunk[i]);
          // |w_i| over the columns the tile reads bounds |w_i[:h]| for all of its sizes.
          if (gemm_runs) item_norm[i] = stable_norm(chunk_rows + i * chunk_ld, tile_h);
        }

        for (const Run& run : runs) {
          const int64_t m = run.last - run.first;
          // The exact score of item base + i for the run's r-th user.
          const auto exact_for = [&](int64_t r) {
            const acc_t* xu = x_p + run.x_offset + r * run.h;
            return [&, xu](int64_t i) {
              return dot(xu, chunk_rows + i * chunk_ld, run.h) + b_chunk[i];
            };
          };
          if (m <= kMaxExactOnlyRun) {
            for (int64_t r = 0; r < m; ++r) {
              best[by_size[run.first + r] - u0].offer_exact(base, n, exact_for(r));
            }
            continue;
          }
          at::Tensor s = scores.narrow(0, 0, m * n).view({m, n});
          if (run.h == 0) {
            s.zero_();
          } else {
            at::mm_out(s, x.narrow(0, run.x_offset, m * run.h).view({m, run.h}),
                       chunk.narrow(1, 0, run.h).t());
          }
          const acc_t rel = 2 * static_cast<acc_t>(run.h + 2) * std::numeric_limits<acc_t>::epsilon();
          const ChunkBounds<acc_t> bounds{
              base, n, b_chunk.data(), item_norm.data(), abs_bias.data(),
              reduced_precision_gemm ? std::max(rel, acc_t(1) / 64) : rel,
              4 * static_cast<acc_t>(run.h + 2) * std::numeric_limits<acc_t>::denorm_min()};
          const acc_t* s_p = s.data_ptr<acc_t>();
          for (int64_t r = 0; r < m; ++r) {
            const int64_t t = by_size[run.first + r] - u0;
            best[t].offer(s_p + r * n, bounds, x_norm[t], exact_for(r));
          }
        }
      }

      int64_t* ids_to = parts == 1 ? out_ids : part_ids.data() + part * B * k;
      acc_t* scores_to = parts == 1 ? out_scores : part_scores.data() + part * B * k;
      for (int64_t t = 0; t < nu; ++t) {
        best[t].write(ids_to + (u0 + t) * k, scores_to + (u0 + t) * k);
      }
    }
  });
  if (parts == 1) return;

  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    std::vector<Candidate<acc_t>> all;
    for (int64_t u = begin; u < end; ++u) {
      all.clear();
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t at = (part * B + u) * k;
        for (int64_t r = 0; r < k && part_ids[at + r] >= 0; ++r) {
          all.push_back({part_scores[at + r], part_ids[at + r]});
        }
      }
      const size_t keep = std::min(all.size(), static_cast<size_t>(k));
      std::partial_sort(all.begin(), all.begin() + keep, all.end(), ranks_before<acc_t>);
      write_ranked(all.data(), keep, k, out_ids + u * k, out_scores + u * k);
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
                                    // Detached: the workers of at::parallel_for do not
                                    // inherit no_grad, and mm_out refuses inputs that
                                    // require grad (a model's Parameter).
                                    score_topk_kernel<scalar_t>(
                                        in.hidden.detach(), size_p, in.weight.detach(), in.bias,
                                        in.history_ptr(),
                                        in.history_len(), k, ids.data_ptr<int64_t>(),
                                        scores.data_ptr());
                                  });
  return {ids, scores};
}

}  // namespace
}  // namespace canet

TORCH_LIBRARY_IMPL(canet, CPU, m) { m.impl("score_topk", &canet::score_topk_cpu); }
