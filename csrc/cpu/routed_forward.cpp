// CPU kernels of canet::routed_scores, canet::routed_last_hidden and canet::router_logits: the
// whole routed forward of a batch in one call (semantics: canet/model.py, Supernet.hidden_last
// and Supernet.logits).
//
// Work is split into items of (one group, a run of its users). Items run in parallel, each on
// one thread with its own workspace, when the extension is compiled with -fopenmp (see
// worker_count); their GEMMs go through ATen on strided views of the max-size weights (a
// config's weights are prefix slices, never copied), or, for float32 on AVX2 CPUs when the
// caller passes them (`packed`), through packed_gemm.h on copies packed once per weight.
//
// Padding rows are dropped: a real query never attends to a padding key, and a padding query's
// own state only feeds later padding rows, so padding positions cannot reach the last
// (real) position the scores come from. Each user contributes its real positions only, which
// keeps GEMM rows dense and makes attention purely causal.
#include "packed_gemm.h"
#include "routed_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <cstdint>
#include <numeric>
#include <optional>
#include <type_traits>
#include <string>
#include <vector>

namespace canet {
namespace {

using at::Tensor;

constexpr int64_t kTensorsPerBlock = 14;  // qkv w/b, out w/b, ln1 w/b, fc1 w/b, fc2 w/b,
                                          // ln2 w/b, res_scale1, res_scale2
// Supernet list: item_emb, pos_emb, in_proj w/b, blocks..., out w/b.
constexpr int64_t kSupernetExtra = 6;
// Router list: item_emb, pos_emb, one block, head w/b.
constexpr int64_t kRouterTensors = 4 + kTensorsPerBlock;
// Output-layer columns computed per GEMM: bounds the per-thread scratch for any item count.
constexpr int64_t kOutColumnChunk = 2048;
// Auto block sizing: about kItemsPerThread items per thread (for balance), at most
// kMaxItemRows GEMM rows per item (measured at L=50: items of 800-1200 rows run ~5% faster
// than items of 200-500; beyond that, balance suffers).
constexpr int64_t kItemsPerThread = 4;
// ... and at least this many items: up to kMinItems / kItemsPerThread threads the split, hence
// every GEMM shape and so every bit of the result, does not depend on the thread count.
constexpr int64_t kMinItems = 16;

double target_item_cost(double total_cost) {
  const int64_t items = std::max<int64_t>(kMinItems, at::get_num_threads() * kItemsPerThread);
  return total_cost / static_cast<double>(items);
}
constexpr int64_t kMaxItemRows = 1024;
// A packed GEMM called outside a parallel region (a batch of one work item) splits its columns
// over the threads from this many multiply-adds (~30 us on one core; a fork costs a few us).
constexpr int64_t kParallelGemmWork = int64_t{1} << 20;

std::string shape_str(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(sizes[i]);
  }
  return text + "]";
}

// `name()` builds the tensor's name for the message, only when a check fails: the ops check
// every weight on every call, and building ~120 strings cost ~10 us per call at batch 1.
template <typename NameFn>
void check_tensor(const Tensor& t, const char* op, const NameFn& name, at::IntArrayRef expected,
                  at::ScalarType dtype) {
  if (t.defined() && t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == expected &&
      t.is_contiguous()) {
    return;
  }
  TORCH_CHECK(t.defined(), op, ": ", name(), " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name(), " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name(), " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == expected, op, ": ", name(), " must have shape ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
  TORCH_CHECK(false, op, ": ", name(), " must be contiguous (strides ", t.strides(), " given)");
}

void check_tensor(const Tensor& t, const char* op, const char* name, at::IntArrayRef expected,
                  at::ScalarType dtype) {
  check_tensor(t, op, [name] { return std::string(name); }, expected, dtype);
}

// One transformer block at max width `width` (rows of every matrix have `width`-based strides).
struct BlockTensors {
  Tensor qkv_w, qkv_b, out_w, out_b, ln1_w, ln1_b, fc1_w, fc1_b, fc2_w, fc2_b, ln2_w, ln2_b;
  Tensor res1, res2;
  // The float weights packed by canet::pack_panels (nullptr: GEMMs through ATen).
  const float* packed_q = nullptr;
  const float* packed_k = nullptr;
  const float* packed_v = nullptr;
  const float* packed_out = nullptr;
  const float* packed_fc1 = nullptr;
  const float* packed_fc2 = nullptr;
};

// Per supernet GEMM weight, in this order: in_proj, then per block q, k, v, out, fc1, fc2.
constexpr int64_t kPackedPerBlock = 6;

BlockTensors block_at(const std::vector<Tensor>& w, int64_t first, int64_t width,
                      at::ScalarType dtype, const char* op, const char* prefix, int64_t block) {
  static const char* names[kTensorsPerBlock] = {
      "attn.qkv.weight", "attn.qkv.bias", "attn.out.weight", "attn.out.bias",
      "ln1.weight",      "ln1.bias",      "ffn.fc1.weight",  "ffn.fc1.bias",
      "ffn.fc2.weight",  "ffn.fc2.bias",  "ln2.weight",      "ln2.bias",
      "res_scale1",      "res_scale2"};
  const int64_t H = width;
  const int64_t shapes[kTensorsPerBlock][2] = {
      {3 * H, H}, {3 * H, 0}, {H, H}, {H, 0}, {H, 0}, {H, 0}, {4 * H, H}, {4 * H, 0}, {H, 4 * H},
      {H, 0},     {H, 0},     {H, 0}, {0, 0}, {0, 0}};
  for (int64_t i = 0; i < kTensorsPerBlock; ++i) {
    const int64_t rank = shapes[i][0] == 0 ? 0 : shapes[i][1] == 0 ? 1 : 2;
    check_tensor(
        w[first + i], op,
        [&] {
          const std::string where = block < 0 ? std::string(prefix) + "."
                                              : prefix + std::to_string(block) + ".";
          return "weights[" + std::to_string(first + i) + "] (" + where + names[i] + ")";
        },
        at::IntArrayRef(shapes[i], rank), dtype);
  }
  const Tensor* t = w.data() + first;
  return {t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12], t[13]};
}

// The users of one work item, with their real (non-padding) positions laid out as rows.
struct ItemRows {
  int64_t users = 0;
  int64_t rows = 0;
  std::vector<int64_t> first_row;  // [users + 1]: user u owns rows first_row[u]..first_row[u+1]
  std::vector<int64_t> item;       // [rows] item id of each row
  std::vector<int64_t> position;   // [rows] position in the sequence of each row
};

void gather_rows(const int64_t* seqs, int64_t length, const int64_t* users, int64_t count,
                 ItemRows& out) {
  out.users = count;
  out.first_row.assign(count + 1, 0);
  out.item.clear();
  out.position.clear();
  for (int64_t u = 0; u < count; ++u) {
    const int64_t* seq = seqs + users[u] * length;
    for (int64_t t = 0; t < length; ++t) {
      if (seq[t] != 0) {
        out.item.push_back(seq[t]);
        out.position.push_back(t);
      }
    }
    out.first_row[u + 1] = static_cast<int64_t>(out.item.size());
  }
  out.rows = out.first_row[count];
}

// Per-worker buffers, carved from one allocation made before the parallel region.
template <typename T>
struct Workspace {
  T* x;        // [rows, h] hidden states
  T* q;        // [rows, h] queries, then the output projection / FFN result
  T* k;        // [rows, h]
  T* v;        // [rows, h]
  T* o;        // [rows, h] attention output
  T* u;        // [rows, 4h] FFN inner activations
  T* last;     // [users, h] last-position states
  T* scratch;  // attention scratch, LayerNorm row, output-layer chunk

  static int64_t size(int64_t rows, int64_t users, int64_t width, int64_t emb, int64_t length,
                      int64_t heads) {
    const int64_t attention = routed::attention_scratch(length, width / heads);
    const int64_t scratch =
        std::max({attention, width, users * kOutColumnChunk, rows * emb});
    return 5 * rows * width + 4 * rows * width + users * width + scratch + 64;
  }

  Workspace(T* base, int64_t rows, int64_t users, int64_t width) {
    x = base;
    q = x + rows * width;
    k = q + rows * width;
    v = k + rows * width;
    o = v + rows * width;
    u = o + rows * width;
    last = u + 4 * rows * width;
    scratch = last + users * width;
  }
};

// The weights as the kernels use them. Detached where they require grad: the workers of
// at::parallel_for do not inherit the caller's no_grad/inference mode, and mm_out refuses
// operands that require grad (a model's Parameters passed directly). Others are used as given
// (a detach per weight per call is measurable at batch 1).
std::vector<Tensor> detached(at::TensorList weights) {
  std::vector<Tensor> out;
  out.reserve(weights.size());
  for (const Tensor& t : weights) out.push_back(t.defined() && t.requires_grad() ? t.detach() : t);
  return out;
}

template <typename T>
Tensor view(T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(data, {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out[rows, n] = a[rows, k] @ w[row0 : row0 + n, 0 : k]^T, straight from the max-size weight.
template <typename T>
void matmul_nt(T* out, int64_t ldo, const T* a, int64_t lda, int64_t rows, const Tensor& w,
               int64_t row0, int64_t n, int64_t k) {
  Tensor out_view = view(out, rows, n, ldo);
  at::mm_out(out_view, view(const_cast<T*>(a), rows, k, lda), w.narrow(0, row0, n).narrow(1, 0, k).t());
}

// The same product from the packed copy of w[row0 : row0 + n_max, :k_max] when there is one.
template <typename T>
void matmul_nt(T* out, int64_t ldo, const T* a, int64_t lda, int64_t rows, const Tensor& w,
               int64_t row0, int64_t n, int64_t k, const float* packed) {
#ifdef CANET_HAVE_PACKED_GEMM
  if constexpr (std::is_same<T, float>::value) {
    if (packed != nullptr) {
      const int64_t k_max = w.size(1);
      const int64_t panels = routed::panel_count(n);
      const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
      if (threads > 1 && rows * n * k >= kParallelGemmWork && panels > 1) {
        // One work item (one user, say) on several threads: split the columns, in whole
        // panels, as MKL would split its GEMM. Each output element's sum is unchanged, so the
        // result does not depend on the thread count.
        const int64_t grain = std::max<int64_t>(1, panels / threads);
        at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
          const int64_t c0 = p0 * routed::kPanel;
          const int64_t c1 = std::min(n, p1 * routed::kPanel);
          routed::gemm_packed(out + c0, ldo, a, lda, rows, packed + p0 * k_max * routed::kPanel,
                              k_max, c1 - c0, k);
        });
        return;
      }
      routed::gemm_packed(out, ldo, a, lda, rows, packed, k_max, n, k);
      return;
    }
  }
#endif
  matmul_nt(out, ldo, a, lda, rows, w, row0, n, k);
}

// The fused loops, compiled for the build's baseline ISA and, on x86-64 with GCC or Clang, also
// for AVX2 (the build flags stop at SSE2); float takes the AVX2 copy when the CPU has it.
// double stays on the baseline: it is the validation dtype.
#define CANET_KERNEL_SET(NAME, ATTR)                                                           \
  template <typename T>                                                                        \
  ATTR void NAME##_attention(const T* q, int64_t ldq, int64_t first_query, const T* k,         \
                             const T* v, int64_t ldkv, const T* bq, const T* bk, const T* bv,  \
                             int64_t n, int64_t h, int64_t heads, T scale, T* o, int64_t ldo,  \
                             T* scratch) {                                                     \
    routed::attention_user<T>(q, ldq, first_query, k, v, ldkv, bq, bk, bv, n, h, heads, scale, \
                              o, ldo, scratch);                                                \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void NAME##_bias_gelu(T* u, int64_t rows, int64_t cols, int64_t ld, const T* bias) {    \
    routed::bias_gelu<T>(u, rows, cols, ld, bias);                                             \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void NAME##_layer_norm(T* x, int64_t ldx, const T* y, int64_t ldy, const T* y_bias,     \
                              T scale, const T* gamma, const T* beta, int64_t rows, int64_t h, \
                              T* tmp) {                                                        \
    routed::residual_layer_norm<T>(x, ldx, y, ldy, y_bias, scale, gamma, beta, rows, h, tmp);  \
  }

CANET_KERNEL_SET(baseline, )
#if defined(__GNUC__) && defined(__x86_64__)
#define CANET_HAVE_AVX2_KERNELS 1
CANET_KERNEL_SET(avx2, __attribute__((target("avx2,fma"))))
#endif

template <typename T>
struct Kernels {
  decltype(&baseline_attention<T>) attention = &baseline_attention<T>;
  decltype(&baseline_bias_gelu<T>) bias_gelu = &baseline_bias_gelu<T>;
  decltype(&baseline_layer_norm<T>) layer_norm = &baseline_layer_norm<T>;
};

template <typename T>
Kernels<T> kernels_for_cpu() {
  Kernels<T> k;
#ifdef CANET_HAVE_AVX2_KERNELS
  // CANET_CPU_BASELINE=1 keeps the baseline loops (to compare the two builds of them).
  const char* baseline = std::getenv("CANET_CPU_BASELINE");
  const bool forced = baseline != nullptr && *baseline != '\0' && *baseline != '0';
  if (!forced && std::is_same<T, float>::value && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma")) {
    k.attention = &avx2_attention<T>;
    k.bias_gelu = &avx2_bias_gelu<T>;
    k.layer_norm = &avx2_layer_norm<T>;
  }
#endif
  return k;
}

template <typename T>
const Kernels<T>& kernels() {
  static const Kernels<T> chosen = kernels_for_cpu<T>();
  return chosen;
}

// One block of width h (max width H) over an item's rows. When `last_only`, queries, the
// output projection, FFN and norms run on each user's last row alone, into ws.last.
template <typename T>
void run_block(const BlockTensors& blk, int64_t H, int64_t h, int64_t heads, bool last_only,
               const ItemRows& rows, Workspace<T>& ws) {
  const int64_t R = rows.rows;
  const int64_t U = rows.users;
  const T* qkv_b = blk.qkv_b.data_ptr<T>();
  matmul_nt(ws.k, h, ws.x, h, R, blk.qkv_w, H, h, h, blk.packed_k);
  matmul_nt(ws.v, h, ws.x, h, R, blk.qkv_w, 2 * H, h, h, blk.packed_v);

  // Rows that carry on past attention: every row, or each user's last one.
  T* x_rows = ws.x;
  int64_t M = R;
  if (last_only) {
    for (int64_t u = 0; u < U; ++u) {
      std::copy(ws.x + (rows.first_row[u + 1] - 1) * h, ws.x + rows.first_row[u + 1] * h,
                ws.last + u * h);
    }
    x_rows = ws.last;
    M = U;
  }
  matmul_nt(ws.q, h, x_rows, h, M, blk.qkv_w, 0, h, h, blk.packed_q);

  const Kernels<T>& kern = kernels<T>();
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(h / heads)));
  for (int64_t u = 0; u < U; ++u) {
    const int64_t first = rows.first_row[u];
    const int64_t n = rows.first_row[u + 1] - first;
    const int64_t first_query = last_only ? n - 1 : 0;
    const int64_t out_row = last_only ? u : first;
    kern.attention(ws.q + out_row * h, h, first_query, ws.k + first * h,
                              ws.v + first * h, h, qkv_b, qkv_b + H, qkv_b + 2 * H, n, h, heads,
                              scale, ws.o + out_row * h, h, ws.scratch);
  }

  matmul_nt(ws.q, h, ws.o, h, M, blk.out_w, 0, h, h, blk.packed_out);
  kern.layer_norm(x_rows, h, ws.q, h, blk.out_b.data_ptr<T>(),
                                 *blk.res1.data_ptr<T>(), blk.ln1_w.data_ptr<T>(),
                                 blk.ln1_b.data_ptr<T>(), M, h, ws.scratch);
  matmul_nt(ws.u, 4 * h, x_rows, h, M, blk.fc1_w, 0, 4 * h, h, blk.packed_fc1);
  kern.bias_gelu(ws.u, M, 4 * h, 4 * h, blk.fc1_b.data_ptr<T>());
  matmul_nt(ws.q, h, ws.u, 4 * h, M, blk.fc2_w, 0, h, 4 * h, blk.packed_fc2);
  kern.layer_norm(x_rows, h, ws.q, h, blk.fc2_b.data_ptr<T>(),
                                 *blk.res2.data_ptr<T>(), blk.ln2_w.data_ptr<T>(),
                                 blk.ln2_b.data_ptr<T>(), M, h, ws.scratch);
}

// x[r] = item_emb[item[r], :e] + pos_emb[position[r], :e] into dst (leading dim e).
template <typename T>
void embed(const ItemRows& rows, const Tensor& item_emb, const Tensor& pos_emb, int64_t e,
           T* dst) {
  const T* items = item_emb.data_ptr<T>();
  const T* positions = pos_emb.data_ptr<T>();
  const int64_t E = item_emb.size(1);
  for (int64_t r = 0; r < rows.rows; ++r) {
    const T* a = items + rows.item[r] * E;
    const T* b = positions + rows.position[r] * E;
    T* out = dst + r * e;
    for (int64_t c = 0; c < e; ++c) out[c] = a[c] + b[c];
  }
}

struct WorkItem {
  int64_t group;
  int64_t begin, end;  // sorted rows of the plan (supernet) or input rows (router)
  double cost;
};

// Runs items over at most get_num_threads() workers, largest first, each worker pulling the
// next item when done: item costs differ by an order of magnitude across configs, so a static
// split would leave threads idle. Each item's result depends on the item alone, never on the
// worker that ran it. A single item runs outside a parallel region so ATen may parallelize
// its GEMMs.
template <typename Fn>
void run_items(std::vector<WorkItem>& items, int64_t workers, const Fn& run_item) {
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  const int64_t count = static_cast<int64_t>(items.size());
  if (workers <= 1) {
    for (int64_t i = 0; i < count; ++i) run_item(items[i], 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
        run_item(items[i], worker);
      }
    }
  });
}

// at::parallel_for is inline: it only forks when THIS file is compiled with OpenMP
// (-fopenmp); without it the items run one after another on the calling thread, and ATen's
// (OpenMP-built) BLAS parallelizes each GEMM instead. One workspace is then enough.
int64_t worker_count(size_t items) {
#ifdef _OPENMP
  return std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items));
#else
  (void)items;
  return 1;
#endif
}

// Splits `users` consecutive rows of one group into items: `block_users` each when given,
// else runs whose cost reaches `target_cost` (capped at kMaxItemRows rows).
void split_group(int64_t group, int64_t begin, int64_t end, const std::vector<int64_t>& lengths,
                 const int64_t* user_of_row, int64_t block_users, double target_cost,
                 double cost_per_row, double cost_per_user, std::vector<WorkItem>& items) {
  int64_t start = begin;
  int64_t rows = 0;
  double cost = 0.0;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = lengths[user_of_row[r]];
    const bool full = block_users > 0
                          ? r - start == block_users
                          : r > start && (cost >= target_cost || rows + n > kMaxItemRows);
    if (full) {
      items.push_back({group, start, r, cost});
      start = r;
      rows = 0;
      cost = 0.0;
    }
    rows += n;
    cost += cost_per_user + cost_per_row * static_cast<double>(n);
  }
  if (end > start) items.push_back({group, start, end, cost});
}

void check_seqs(const Tensor& seqs, const char* op) {
  TORCH_CHECK(seqs.device().is_cpu(), op, ": seqs must be a CPU tensor, got device ",
              seqs.device());
  TORCH_CHECK(seqs.scalar_type() == at::kLong, op, ": seqs must be int64 item ids, got ",
              seqs.scalar_type());
  TORCH_CHECK(seqs.dim() == 2, op, ": seqs must be 2-D [B, L], got shape ",
              shape_str(seqs.sizes()));
}

// Item ids index the embedding table, so they are checked here whatever the caller did.
std::vector<int64_t> real_lengths(const int64_t* seqs, int64_t batch, int64_t length,
                                  int64_t num_rows, const char* op) {
  std::vector<int64_t> lengths(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* seq = seqs + b * length;
    int64_t n = 0;
    for (int64_t t = 0; t < length; ++t) {
      TORCH_CHECK(seq[t] >= 0 && seq[t] < num_rows, op, ": item ids must be in [0, ",
                  num_rows - 1, "], got seqs[", b, ", ", t, "] = ", seq[t]);
      n += seq[t] != 0;
    }
    TORCH_CHECK(seq[length - 1] != 0, op,
                ": every sequence must end with a real item (left padding), but seqs[", b,
                ", ", length - 1, "] is 0");
    lengths[b] = n;
  }
  return lengths;
}

template <typename T>
void copy_scores(const T* chunk, const T* bias, int64_t cols, T* dst) {
  for (int64_t c = 0; c < cols; ++c) dst[c] = chunk[c] + bias[c];
}

// What the routed forward writes: the scores [B, N+1], or the last position's hidden states
// [B, H] (for canet::score_topk, which scores and selects without the score matrix).
enum class Output { kScores, kLastHidden };

template <typename T>
void routed_forward_impl(const Tensor& seqs, const int64_t* order, const int64_t* group_config,
                         const int64_t* group_offsets, int64_t num_groups, const int64_t* table,
                         const std::vector<Tensor>& w, int64_t depth_max, int64_t heads,
                         int64_t block_users, const std::vector<BlockTensors>& blocks,
                         const float* packed_in, const std::vector<int64_t>& lengths,
                         Output output, Tensor& out) {
  const int64_t L = seqs.size(1);
  const Tensor& item_emb = w[0];
  const Tensor& pos_emb = w[1];
  const Tensor& in_w = w[2];
  const T* in_b = w[3].data_ptr<T>();
  const Tensor& out_w = w[4 + kTensorsPerBlock * depth_max];
  const T* out_b = w[5 + kTensorsPerBlock * depth_max].data_ptr<T>();
  const int64_t E = item_emb.size(1);
  const int64_t H = in_w.size(0);
  const int64_t columns = out_w.size(0);
  const int64_t* seq_data = seqs.data_ptr<int64_t>();

  // Cost per user of a group ~ its FLOPs: per real row (projections, FFN; attention is folded
  // in at the full length), plus the output layer.
  std::vector<WorkItem> items;
  double total = 0.0;
  std::vector<double> per_row(num_groups), per_user(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t* cfg = table + 3 * group_config[g];
    const double d = static_cast<double>(cfg[0]), h = static_cast<double>(cfg[1]),
                 e = static_cast<double>(cfg[2]);
    per_row[g] = d * (24.0 * h * h + 4.0 * static_cast<double>(L) * h) + 2.0 * e * h;
    per_user[g] = output == Output::kScores ? 2.0 * h * static_cast<double>(columns) : h;
    for (int64_t r = group_offsets[g]; r < group_offsets[g + 1]; ++r) {
      total += per_user[g] + per_row[g] * static_cast<double>(lengths[order[r]]);
    }
  }
  const double target = target_item_cost(total);
  for (int64_t g = 0; g < num_groups; ++g) {
    split_group(g, group_offsets[g], group_offsets[g + 1], lengths, order, block_users, target,
                per_row[g], per_user[g], items);
  }
  if (items.empty()) return;

  int64_t max_rows = 0, max_users = 0;
  for (const WorkItem& it : items) {
    int64_t rows = 0;
    for (int64_t r = it.begin; r < it.end; ++r) rows += lengths[order[r]];
    max_rows = std::max(max_rows, rows);
    max_users = std::max(max_users, it.end - it.begin);
  }
  const int64_t workers = worker_count(items.size());
  const int64_t ws_size = Workspace<T>::size(max_rows, max_users, H, E, L, heads);
  Tensor buffer = at::empty({workers, ws_size}, out.options());
  T* out_data = out.data_ptr<T>();

  run_items(items, workers, [&](const WorkItem& it, int64_t worker) {
    const int64_t cfg_id = group_config[it.group];
    const int64_t depth = table[3 * cfg_id], h = table[3 * cfg_id + 1],
                  e = table[3 * cfg_id + 2];
    ItemRows rows;
    gather_rows(seq_data, L, order + it.begin, it.end - it.begin, rows);
    Workspace<T> ws(buffer.data_ptr<T>() + worker * ws_size, rows.rows, rows.users, H);

    embed<T>(rows, item_emb, pos_emb, e, ws.scratch);
    matmul_nt(ws.x, h, ws.scratch, e, rows.rows, in_w, 0, h, e, packed_in);
    for (int64_t r = 0; r < rows.rows; ++r) {
      T* xr = ws.x + r * h;
      for (int64_t c = 0; c < h; ++c) xr[c] += in_b[c];
    }
    for (int64_t i = 0; i < depth; ++i) {
      run_block<T>(blocks[i], H, h, heads, i == depth - 1, rows, ws);
    }
    if (depth == 0) {
      for (int64_t u = 0; u < rows.users; ++u) {
        std::copy(ws.x + (rows.first_row[u + 1] - 1) * h, ws.x + rows.first_row[u + 1] * h,
                  ws.last + u * h);
      }
    }
    if (output == Output::kLastHidden) {  // columns past h stay zero
      for (int64_t u = 0; u < rows.users; ++u) {
        std::copy(ws.last + u * h, ws.last + (u + 1) * h, out_data + order[it.begin + u] * H);
      }
      return;
    }
    // Output layer on the last positions, in column chunks straight into the users' rows.
    for (int64_t c0 = 0; c0 < columns; c0 += kOutColumnChunk) {
      const int64_t cols = std::min(kOutColumnChunk, columns - c0);
      matmul_nt(ws.scratch, cols, ws.last, h, rows.users, out_w, c0, cols, h);
      for (int64_t u = 0; u < rows.users; ++u) {
        copy_scores(ws.scratch + u * cols, out_b + c0, cols,
                    out_data + order[it.begin + u] * columns + c0);
      }
    }
    for (int64_t u = 0; u < rows.users; ++u) {
      out_data[order[it.begin + u] * columns] = -std::numeric_limits<T>::infinity();
    }
  });
}

Tensor routed_forward_cpu(const Tensor& seqs_in, const Tensor& order_in,
                          const Tensor& group_config_in, const Tensor& group_offsets_in,
                          const Tensor& config_table_in, at::TensorList weights, int64_t heads,
                          int64_t block_users, at::TensorList packed, Output output) {
  const char* op =
      output == Output::kScores ? "canet::routed_scores" : "canet::routed_last_hidden";
  c10::InferenceMode guard;
  check_seqs(seqs_in, op);
  TORCH_CHECK(heads >= 1, op, ": heads must be >= 1, got ", heads);
  TORCH_CHECK(block_users >= 0, op, ": block_users must be >= 0 (0 = automatic), got ",
              block_users);
  const int64_t count = static_cast<int64_t>(weights.size());
  TORCH_CHECK(count >= kSupernetExtra && (count - kSupernetExtra) % kTensorsPerBlock == 0, op,
              ": weights must hold ", kSupernetExtra, " + ", kTensorsPerBlock,
              " * max_depth tensors (item_emb, pos_emb, in_proj w/b, per block ",
              kTensorsPerBlock, ", out w/b), got ", count);
  const int64_t depth_max = (count - kSupernetExtra) / kTensorsPerBlock;
  const std::vector<Tensor> w = detached(weights);
  TORCH_CHECK(w[0].defined() && w[0].dim() == 2 && w[2].defined() && w[2].dim() == 2, op,
              ": weights[0] (item_emb) and weights[2] (in_proj.weight) must be 2-D");
  const at::ScalarType dtype = w[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": weights must be float32 or float64, got ", dtype);
  const int64_t rows_items = w[0].size(0), E = w[0].size(1), H = w[2].size(0);
  const int64_t B = seqs_in.size(0), L = seqs_in.size(1);
  check_tensor(w[0], op, "weights[0] (item_emb.weight)", {rows_items, E}, dtype);
  check_tensor(w[1], op, "weights[1] (pos_emb.weight)", {L, E}, dtype);
  check_tensor(w[2], op, "weights[2] (in_proj.weight)", {H, E}, dtype);
  check_tensor(w[3], op, "weights[3] (in_proj.bias)", {H}, dtype);
  std::vector<BlockTensors> blocks;
  for (int64_t i = 0; i < depth_max; ++i) {
    blocks.push_back(block_at(w, 4 + kTensorsPerBlock * i, H, dtype, op, "blocks.", i));
  }
  const int64_t out_at = 4 + kTensorsPerBlock * depth_max;
  check_tensor(w[out_at], op,
               [&] { return "weights[" + std::to_string(out_at) + "] (out.weight)"; },
               {rows_items, H}, dtype);
  check_tensor(w[out_at + 1], op,
               [&] { return "weights[" + std::to_string(out_at + 1) + "] (out.bias)"; },
               {rows_items}, dtype);
  // packed: empty, or canet::pack_panels of in_proj and of every block's q, k, v, out, fc1,
  // fc2 (float32 only); used where the CPU has AVX2 and FMA, ignored elsewhere.
  const int64_t packed_count = static_cast<int64_t>(packed.size());
  TORCH_CHECK(packed_count == 0 || packed_count == 1 + kPackedPerBlock * depth_max, op,
              ": packed must be empty or hold 1 + ", kPackedPerBlock, " * max_depth = ",
              1 + kPackedPerBlock * depth_max, " tensors (canet::pack_panels of in_proj, then "
              "per block q, k, v, out, fc1, fc2), got ", packed_count);
  const float* packed_in = nullptr;
  if (packed_count > 0) {
    TORCH_CHECK(dtype == at::kFloat, op, ": packed weights are for float32 weights, got ",
                dtype, " weights");
    auto panels = [&](int64_t j, int64_t n_max, int64_t k_max, const char* name) {
      check_tensor(packed[j], op,
                   [&] { return "packed[" + std::to_string(j) + "] (" + name + ")"; },
                   {routed::panel_count(n_max), k_max, routed::kPanel}, at::kFloat);
      return routed::packed_gemm_supported() ? packed[j].data_ptr<float>() : nullptr;
    };
    packed_in = panels(0, H, E, "in_proj");
    for (int64_t i = 0; i < depth_max; ++i) {
      const int64_t j = 1 + kPackedPerBlock * i;
      BlockTensors& b = blocks[i];
      b.packed_q = panels(j, H, H, "q");
      b.packed_k = panels(j + 1, H, H, "k");
      b.packed_v = panels(j + 2, H, H, "v");
      b.packed_out = panels(j + 3, H, H, "out");
      b.packed_fc1 = panels(j + 4, 4 * H, H, "fc1");
      b.packed_fc2 = panels(j + 5, H, 4 * H, "fc2");
    }
  }

  const Tensor config_table = config_table_in.contiguous();
  TORCH_CHECK(config_table.device().is_cpu() && config_table.scalar_type() == at::kLong &&
                  config_table.dim() == 2 && config_table.size(1) == 3,
              op, ": config_table must be a CPU int64 [C, 3] tensor, got ",
              config_table.scalar_type(), " ", shape_str(config_table.sizes()), " on ",
              config_table.device());
  const int64_t C = config_table.size(0);
  const int64_t* table = config_table.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t d = table[3 * c], h = table[3 * c + 1], e = table[3 * c + 2];
    TORCH_CHECK(d >= 0 && d <= depth_max, op, ": config ", c, " has depth ", d,
                ", expected 0..", depth_max, " (the blocks in weights)");
    TORCH_CHECK(h >= 1 && h <= H && h % heads == 0, op, ": config ", c, " has hidden ", h,
                ", expected 1..", H, " and divisible by heads=", heads);
    TORCH_CHECK(e >= 1 && e <= E, op, ": config ", c, " has emb ", e, ", expected 1..", E);
  }

  auto check_index = [&](const Tensor& t, const char* name, int64_t size) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                    t.size(0) == size,
                op, ": ", name, " must be a CPU int64 [", size, "] tensor, got ",
                t.scalar_type(), " ", shape_str(t.sizes()), " on ", t.device());
    return t.contiguous();
  };
  const Tensor order = check_index(order_in, "order", B);
  TORCH_CHECK(group_config_in.dim() == 1, op, ": group_config must be 1-D [G], got shape ",
              shape_str(group_config_in.sizes()));
  const int64_t G = group_config_in.size(0);
  const Tensor group_config = check_index(group_config_in, "group_config", G);
  const Tensor group_offsets = check_index(group_offsets_in, "group_offsets", G + 1);
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* gc = group_config.data_ptr<int64_t>();
  const int64_t* go = group_offsets.data_ptr<int64_t>();
  TORCH_CHECK(go[0] == 0 && go[G] == B, op, ": group_offsets must run from 0 to B=", B,
              ", got ", go[0], " .. ", go[G]);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(go[g] <= go[g + 1], op, ": group_offsets must be non-decreasing, got ", go[g],
                " then ", go[g + 1], " at group ", g);
    TORCH_CHECK(gc[g] >= 0 && gc[g] < C, op, ": group_config[", g, "] = ", gc[g],
                " is not a config id in [0, ", C, ")");
  }
  // Every user must be written exactly once, or some output rows would stay uninitialized.
  std::vector<char> seen(B, 0);
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(ord[r] >= 0 && ord[r] < B && !seen[ord[r]], op,
                ": order must be a permutation of 0..B-1, got order[", r, "] = ", ord[r]);
    seen[ord[r]] = 1;
  }

  const Tensor seqs = seqs_in.contiguous();
  Tensor out = output == Output::kScores ? at::empty({B, rows_items}, w[0].options())
                                         : at::zeros({B, H}, w[0].options());
  if (B == 0) return out;
  TORCH_CHECK(L >= 1, op, ": seqs must have at least one position, got shape ",
              shape_str(seqs.sizes()));
  const std::vector<int64_t> lengths =
      real_lengths(seqs.data_ptr<int64_t>(), B, L, rows_items, op);
  AT_DISPATCH_FLOATING_TYPES(dtype, "canet::routed_forward", [&] {
    routed_forward_impl<scalar_t>(seqs, ord, gc, go, G, table, w, depth_max, heads, block_users,
                                  blocks, packed_in, lengths, output, out);
  });
  return out;
}

Tensor routed_scores_cpu(const Tensor& seqs, const Tensor& order, const Tensor& group_config,
                         const Tensor& group_offsets, const Tensor& config_table,
                         at::TensorList weights, int64_t heads, int64_t block_users,
                         const std::optional<std::vector<Tensor>>& packed) {
  return routed_forward_cpu(seqs, order, group_config, group_offsets, config_table, weights,
                            heads, block_users, packed ? at::TensorList(*packed) : at::TensorList(),
                            Output::kScores);
}

Tensor routed_last_hidden_cpu(const Tensor& seqs, const Tensor& order, const Tensor& group_config,
                              const Tensor& group_offsets, const Tensor& config_table,
                              at::TensorList weights, int64_t heads, int64_t block_users,
                              const std::optional<std::vector<Tensor>>& packed) {
  return routed_forward_cpu(seqs, order, group_config, group_offsets, config_table, weights,
                            heads, block_users, packed ? at::TensorList(*packed) : at::TensorList(),
                            Output::kLastHidden);
}

// canet::pack_panels: rows [row0, row0 + rows) of a float32 2-D weight as the panels
// [ceil(rows / 16), K, 16] of packed_gemm.h (zero past `rows`).
Tensor pack_panels_cpu(const Tensor& weight_in, int64_t row0, int64_t rows) {
  constexpr const char* op = "canet::pack_panels";
  c10::InferenceMode guard;
  TORCH_CHECK(weight_in.device().is_cpu() && weight_in.scalar_type() == at::kFloat &&
                  weight_in.dim() == 2,
              op, ": weight must be a CPU float32 2-D tensor, got ", weight_in.scalar_type(),
              " ", shape_str(weight_in.sizes()), " on ", weight_in.device());
  TORCH_CHECK(row0 >= 0 && rows >= 1 && row0 + rows <= weight_in.size(0), op,
              ": rows [", row0, ", ", row0 + rows, ") must lie inside the weight's ",
              weight_in.size(0), " rows");
  const Tensor weight = weight_in.detach().contiguous();
  const int64_t K = weight.size(1);
  Tensor out = at::empty({routed::panel_count(rows), K, routed::kPanel}, weight.options());
  routed::pack_panels(weight.data_ptr<float>(), K, row0, rows, K, out.data_ptr<float>());
  return out;
}

template <typename T>
void router_logits_impl(const Tensor& seqs, const std::vector<Tensor>& w, int64_t heads,
                        int64_t block_users, const BlockTensors& blk,
                        const std::vector<int64_t>& lengths, Tensor& out) {
  const int64_t B = seqs.size(0), L = seqs.size(1);
  const int64_t H = w[0].size(1);
  const Tensor& head_w = w[2 + kTensorsPerBlock];
  const T* head_b = w[3 + kTensorsPerBlock].data_ptr<T>();
  const int64_t C = head_w.size(0);
  std::vector<int64_t> identity(B);
  std::iota(identity.begin(), identity.end(), int64_t{0});
  const double per_row = 24.0 * H * H + 4.0 * L * H;
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) total += per_row * static_cast<double>(lengths[b]);
  const double target = target_item_cost(total);
  std::vector<WorkItem> items;
  split_group(0, 0, B, lengths, identity.data(), block_users, target, per_row, 0.0, items);

  int64_t max_rows = 0, max_users = 0;
  for (const WorkItem& it : items) {
    int64_t rows = 0;
    for (int64_t r = it.begin; r < it.end; ++r) rows += lengths[r];
    max_rows = std::max(max_rows, rows);
    max_users = std::max(max_users, it.end - it.begin);
  }
  const int64_t workers = worker_count(items.size());
  const int64_t ws_size = Workspace<T>::size(max_rows, max_users, H, H, L, heads);
  Tensor buffer = at::empty({workers, ws_size}, out.options());
  const int64_t* seq_data = seqs.data_ptr<int64_t>();
  T* out_data = out.data_ptr<T>();

  run_items(items, workers, [&](const WorkItem& it, int64_t worker) {
    ItemRows rows;
    gather_rows(seq_data, L, identity.data() + it.begin, it.end - it.begin, rows);
    Workspace<T> ws(buffer.data_ptr<T>() + worker * ws_size, rows.rows, rows.users, H);
    embed<T>(rows, w[0], w[1], H, ws.x);
    run_block<T>(blk, H, H, heads, /*last_only=*/true, rows, ws);
    // Users of a router item are consecutive input rows, so logits land in place.
    matmul_nt(out_data + it.begin * C, C, ws.last, H, rows.users, head_w, 0, C, H);
    for (int64_t u = 0; u < rows.users; ++u) {
      T* row = out_data + (it.begin + u) * C;
      for (int64_t c = 0; c < C; ++c) row[c] += head_b[c];
    }
  });
}

Tensor router_logits_cpu(const Tensor& seqs_in, at::TensorList weights, int64_t heads,
                         int64_t block_users) {
  constexpr const char* op = "canet::router_logits";
  c10::InferenceMode guard;
  check_seqs(seqs_in, op);
  TORCH_CHECK(heads >= 1, op, ": heads must be >= 1, got ", heads);
  TORCH_CHECK(block_users >= 0, op, ": block_users must be >= 0 (0 = automatic), got ",
              block_users);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kRouterTensors, op, ": weights must hold ",
              kRouterTensors, " tensors (item_emb, pos_emb, ", kTensorsPerBlock,
              " block tensors, head w/b), got ", weights.size());
  const std::vector<Tensor> w = detached(weights);
  TORCH_CHECK(w[0].defined() && w[0].dim() == 2, op,
              ": weights[0] (item_emb.weight) must be 2-D [N+1, dim]");
  const at::ScalarType dtype = w[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": weights must be float32 or float64, got ", dtype);
  const int64_t rows_items = w[0].size(0), H = w[0].size(1);
  const int64_t B = seqs_in.size(0), L = seqs_in.size(1);
  TORCH_CHECK(H % heads == 0, op, ": router dim ", H, " must be divisible by heads=", heads);
  check_tensor(w[0], op, "weights[0] (item_emb.weight)", {rows_items, H}, dtype);
  check_tensor(w[1], op, "weights[1] (pos_emb.weight)", {L, H}, dtype);
  const BlockTensors blk = block_at(w, 2, H, dtype, op, "block", -1);
  TORCH_CHECK(w[2 + kTensorsPerBlock].defined() && w[2 + kTensorsPerBlock].dim() == 2, op,
              ": weights[", 2 + kTensorsPerBlock, "] (head.weight) must be 2-D [C, dim]");
  const int64_t C = w[2 + kTensorsPerBlock].size(0);
  check_tensor(w[2 + kTensorsPerBlock], op, "weights[16] (head.weight)", {C, H}, dtype);
  check_tensor(w[3 + kTensorsPerBlock], op, "weights[17] (head.bias)", {C}, dtype);

  const Tensor seqs = seqs_in.contiguous();
  Tensor out = at::empty({B, C}, w[0].options());
  if (B == 0) return out;
  TORCH_CHECK(L >= 1, op, ": seqs must have at least one position, got shape ",
              shape_str(seqs.sizes()));
  const std::vector<int64_t> lengths =
      real_lengths(seqs.data_ptr<int64_t>(), B, L, rows_items, op);
  AT_DISPATCH_FLOATING_TYPES(dtype, "canet::router_logits", [&] {
    router_logits_impl<scalar_t>(seqs, w, heads, block_users, blk, lengths, out);
  });
  return out;
}

}  // namespace
}  // namespace canet

TORCH_LIBRARY_IMPL(canet, CPU, m) {
  m.impl("routed_scores", &canet::routed_scores_cpu);
  m.impl("routed_last_hidden", &canet::routed_last_hidden_cpu);
  m.impl("router_logits", &canet::router_logits_cpu);
  m.impl("pack_panels", &canet::pack_panels_cpu);
}
