// canet::score_topk on the GPU: FAISS-style block select over a fused score computation.
//
// Scoring kernel, one block per (tile of kScoreUserTile users, chunk of items): the chunk is
// walked in tiles of kScoreItemTile items; each tile's [users x items] scores are computed
// into shared memory (tensor cores for fp16/bf16 via WMMA, fp32 FMAs for fp32), then every
// warp folds the scores of its users into their running top-k, kept in shared memory. Most
// scores lose against the current k-th best and cost one ballot; only the winners pay for
// an insertion. The block writes each user's k best of its chunk to the workspace.
// Merge kernel, one warp per user: the same selection over the chunks' candidates, then a
// rank sort (k <= 200) into the output. The [B, N+1] score matrix is never written.
//
// Order: "a before b" when a's score is higher or, on equal scores, a's item id is smaller;
// ids are unique, so it is a strict total order and the result does not depend on the order
// in which warps meet candidates. NaN scores are folded to -inf to keep the order total.
#include "score_topk_kernel.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace canet {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUsersPerWarp = kScoreUserTile / kWarps;
constexpr int kExclWords = kScoreItemTile / 32;
constexpr int kScoreLd = kScoreItemTile + 4;  // floats; multiple of 4 as WMMA stores need
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMergeWarps = 4;

// Tensor-core path (fp16/bf16 operands): K chunk of 64, rows padded by 8 elements so that
// consecutive rows start on different banks while every 16x16 fragment stays 32-byte aligned.
constexpr int kMmaK = 64;
constexpr int kMmaLd = kMmaK + 8;
// FMA path (fp32, or 16-bit types on GPUs without bf16 MMA): K chunk of 32, odd row pitch so
// the 16 item rows a half-warp reads fall into distinct banks.
constexpr int kFmaK = 32;
constexpr int kFmaLd = kFmaK + 1;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kArchHasMma16 = false;
#else
constexpr bool kArchHasMma16 = true;
#endif

template <typename T>
constexpr bool kUsesMma = !std::is_same_v<T, float> && kArchHasMma16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T zero_of() {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half(0.0f);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(0.0f);
  } else {
    return 0.0f;
  }
}

__device__ __forceinline__ bool ranks_before(float a, int id_a, float b, int id_b) {
  return a > b || (a == b && id_a < id_b);
}

// Shared-memory layout of the scoring kernel; every region starts on 128 bytes.
struct ScoreSmem {
  size_t scores, a_tile, b_tile, bias, excl, sizes, state, vals, ids, total;
};

__host__ __device__ constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }

template <typename T>
__host__ __device__ ScoreSmem score_smem_layout(int k) {
  // The FMA fallback stores fp32 tiles; size the operand tiles for whichever path is bigger.
  const size_t a_mma = sizeof(T) * kScoreUserTile * kMmaLd;
  const size_t b_mma = sizeof(T) * kScoreItemTile * kMmaLd;
  const size_t a_fma = sizeof(float) * kScoreUserTile * kFmaLd;
  const size_t b_fma = sizeof(float) * kScoreItemTile * kFmaLd;
  const bool mma_types = !std::is_same_v<T, float>;
  ScoreSmem s{};
  size_t at = 0;
  s.scores = at;
  at += align128(sizeof(float) * kScoreUserTile * kScoreLd);
  s.a_tile = at;
  at += align128(mma_types ? (a_mma > a_fma ? a_mma : a_fma) : a_fma);
  s.b_tile = at;
  at += align128(mma_types ? (b_mma > b_fma ? b_mma : b_fma) : b_fma);
  s.bias = at;
  at += align128(sizeof(float) * kScoreItemTile);
  s.excl = at;
  at += align128(sizeof(unsigned) * kScoreUserTile * kExclWords);
  s.sizes = at;
  at += align128(sizeof(int) * (kScoreUserTile + 1));
  s.state = at;  // per user: count, worst position, worst id (int), worst score (float)
  at += align128(sizeof(int) * kScoreUserTile * 4);
  s.vals = at;
  at += align128(sizeof(float) * kScoreUserTile * k);
  s.ids = at;
  at += align128(sizeof(int) * kScoreUserTile * k);
  s.total = at;
  return s;
}

// Running top-k of one user, owned by one warp. count/worst are warp-uniform registers; the
// k entries live in shared memory, unsorted.
struct WarpTopK {
  float* vals;
  int* ids;
  int k;
  int count;
  float worst_score;
  int worst_id;
  int worst_pos;

  __device__ void find_worst(int lane) {
    float ws = 0.0f;
    int wi = 0;
    int wp = -1;
    for (int p = lane; p < count; p += 32) {
      const float v = vals[p];
      const int id = ids[p];
      if (wp < 0 || ranks_before(ws, wi, v, id)) {
        ws = v;
        wi = id;
        wp = p;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float os = __shfl_xor_sync(kFullMask, ws, offset);
      const int oi = __shfl_xor_sync(kFullMask, wi, offset);
      const int op = __shfl_xor_sync(kFullMask, wp, offset);
      if (op >= 0 && (wp < 0 || ranks_before(ws, wi, os, oi))) {
        ws = os;
        wi = oi;
        wp = op;
      }
    }
    worst_score = ws;
    worst_id = wi;
    worst_pos = wp;
    __syncwarp();  // every lane has read the entries before the next replacement
  }

  // Offers one candidate per lane (valid lanes only); called by the whole warp.
  __device__ void offer(float score, int id, bool valid, int lane) {
    if (count < k) {
      const unsigned want = __ballot_sync(kFullMask, valid);
      const int rank = __popc(want & ((1u << lane) - 1u));
      const bool take = valid && count + rank < k;
      if (take) {
        vals[count + rank] = score;
        ids[count + rank] = id;
      }
      const int free_slots = k - count;
      const int wanted = __popc(want);
      count += wanted < free_slots ? wanted : free_slots;
      valid = valid && !take;
      __syncwarp();
      if (count < k) return;
      find_worst(lane);
    }
    unsigned better = __ballot_sync(
        kFullMask, valid && ranks_before(score, id, worst_score, worst_id));
    while (better != 0u) {
      const int src = __ffs(static_cast<int>(better)) - 1;
      better &= better - 1u;
      const float s = __shfl_sync(kFullMask, score, src);
      const int i = __shfl_sync(kFullMask, id, src);
      // The worst only improves, so an earlier winner of this round may no longer beat it.
      if (ranks_before(s, i, worst_score, worst_id)) {
        if (lane == 0) {
          vals[worst_pos] = s;
          ids[worst_pos] = i;
        }
        __syncwarp();
        find_worst(lane);
      }
    }
  }
};

// Loads the operand tiles of K columns [k0, k0 + kc) for the tensor-core path.
template <typename T>
__device__ void load_tiles_mma(const ScoreTopkArgs& a, int64_t user0, int64_t item0, int k0,
                               int k_limit, const int* sizes, T* a_tile, T* b_tile) {
  const T* hidden = static_cast<const T*>(a.hidden);
  const T* weight = static_cast<const T*>(a.weight);
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kGroups = kMmaK / kVec;
  const bool hidden_vec = (reinterpret_cast<uintptr_t>(hidden) % 16 == 0) &&
                          (a.hidden_stride % kVec == 0);
  const bool weight_vec = (reinterpret_cast<uintptr_t>(weight) % 16 == 0) &&
                          (a.weight_stride % kVec == 0);
  for (int g = threadIdx.x; g < kScoreUserTile * kGroups; g += kThreads) {
    const int u = g / kGroups;
    const int kk = (g % kGroups) * kVec;
    const int64_t user = user0 + u;
    const int col = k0 + kk;
    T* dst = a_tile + u * kMmaLd + kk;
    const int size = sizes[u];  // 0 for users past the batch
    const T* src = hidden + user * a.hidden_stride + col;
    if (hidden_vec && col + kVec <= size) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < kVec; ++e) dst[e] = col + e < size ? src[e] : zero_of<T>();
    }
  }
  for (int g = threadIdx.x; g < kScoreItemTile * kGroups; g += kThreads) {
    const int i = g / kGroups;
    const int kk = (g % kGroups) * kVec;
    const int64_t row = item0 + i;
    const int col = k0 + kk;
    T* dst = b_tile + i * kMmaLd + kk;
    const bool row_ok = row < a.rows;
    const T* src = weight + row * a.weight_stride + col;
    if (weight_vec && row_ok && col + kVec <= k_limit) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < kVec; ++e) dst[e] = row_ok && col + e < k_limit ? src[e] : zero_of<T>();
    }
  }
}

template <typename T>
__device__ void load_tiles_fma(const ScoreTopkArgs& a, int64_t user0, int64_t item0, int k0,
                               int k_limit, const int* sizes, float* a_tile, float* b_tile) {
  const T* hidden = static_cast<const T*>(a.hidden);
  const T* weight = static_cast<const T*>(a.weight);
  for (int e = threadIdx.x; e < kScoreUserTile * kFmaK; e += kThreads) {
    const int u = e / kFmaK;
    const int col = k0 + e % kFmaK;
    a_tile[u * kFmaLd + e % kFmaK] =
        col < sizes[u] ? to_float(hidden[(user0 + u) * a.hidden_stride + col]) : 0.0f;
  }
  for (int e = threadIdx.x; e < kScoreItemTile * kFmaK; e += kThreads) {
    const int i = e / kFmaK;
    const int col = k0 + e % kFmaK;
    const int64_t row = item0 + i;
    b_tile[i * kFmaLd + e % kFmaK] =
        row < a.rows && col < k_limit ? to_float(weight[row * a.weight_stride + col]) : 0.0f;
  }
}

// Scores of the block's users against items [item0, item0 + kScoreItemTile) into `scores`
// ([user][item], pitch kScoreLd), bias not yet added. Begins with a barrier.
template <typename T>
__device__ void score_tile(const ScoreTopkArgs& a, int64_t user0, int64_t item0, int tile_h,
                           const int* sizes, unsigned char* smem, const ScoreSmem& lay,
                           float* scores) {
  const int k_limit = tile_h < a.H ? tile_h : static_cast<int>(a.H);
  const int warp = threadIdx.x / 32;
  if constexpr (kUsesMma<T>) {
    using namespace nvcuda;
    T* a_tile = reinterpret_cast<T*>(smem + lay.a_tile);
    T* b_tile = reinterpret_cast<T*>(smem + lay.b_tile);
    // 8 warps as 2 (users) x 4 (items), each computing 32 x 32 as 2 x 2 fragments.
    const int wm = warp / 4;
    const int wn = warp % 4;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int k0 = 0; k0 < tile_h; k0 += kMmaK) {
      __syncthreads();  // the previous chunk's fragments are loaded
      load_tiles_mma<T>(a, user0, item0, k0, k_limit, sizes, a_tile, b_tile);
      __syncthreads();
      for (int kk = 0; kk < kMmaK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], a_tile + (wm * 32 + i * 16) * kMmaLd + kk, kMmaLd);
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(fb[j], b_tile + (wn * 32 + j * 16) * kMmaLd + kk, kMmaLd);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(scores + (wm * 32 + i * 16) * kScoreLd + wn * 32 + j * 16,
                                acc[i][j], kScoreLd, wmma::mem_row_major);
  } else {
    float* a_tile = reinterpret_cast<float*>(smem + lay.a_tile);
    float* b_tile = reinterpret_cast<float*>(smem + lay.b_tile);
    // Thread (ty, tx) computes users 4ty..4ty+3 x items tx + 16c, c < 8.
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
    float acc[4][8];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 8; ++c) acc[r][c] = 0.0f;
    for (int k0 = 0; k0 < tile_h; k0 += kFmaK) {
      __syncthreads();
      load_tiles_fma<T>(a, user0, item0, k0, k_limit, sizes, a_tile, b_tile);
      __syncthreads();
      for (int kk = 0; kk < kFmaK; ++kk) {
        float av[4];
        float bv[8];
        for (int r = 0; r < 4; ++r) av[r] = a_tile[(ty * 4 + r) * kFmaLd + kk];
        for (int c = 0; c < 8; ++c) bv[c] = b_tile[(tx + 16 * c) * kFmaLd + kk];
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 8; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 8; ++c) scores[(ty * 4 + r) * kScoreLd + tx + 16 * c] = acc[r][c];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    score_chunk_kernel(ScoreTopkArgs a, int64_t items_per_chunk, int64_t num_chunks,
                       float* __restrict__ cand_scores, int* __restrict__ cand_ids) {
  extern __shared__ __align__(128) unsigned char smem[];
  const ScoreSmem lay = score_smem_layout<T>(a.k);
  float* scores = reinterpret_cast<float*>(smem + lay.scores);
  float* bias_tile = reinterpret_cast<float*>(smem + lay.bias);
  unsigned* excl = reinterpret_cast<unsigned*>(smem + lay.excl);
  int* sizes = reinterpret_cast<int*>(smem + lay.sizes);  // [kScoreUserTile] + tile max
  int* state = reinterpret_cast<int*>(smem + lay.state);
  float* top_vals = reinterpret_cast<float*>(smem + lay.vals);
  int* top_ids = reinterpret_cast<int*>(smem + lay.ids);

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t user0 = static_cast<int64_t>(blockIdx.x) * kScoreUserTile;
  const int64_t chunk = blockIdx.y;
  const int64_t chunk_lo = chunk * items_per_chunk;
  const int64_t chunk_hi = chunk_lo + items_per_chunk < a.rows ? chunk_lo + items_per_chunk
                                                               : a.rows;
  const int k = a.k;
  const T* bias = static_cast<const T*>(a.bias);
  const int64_t size_cap = a.h_max < a.H ? a.h_max : a.H;

  if (threadIdx.x == 0) sizes[kScoreUserTile] = 0;
  __syncthreads();
  if (threadIdx.x < kScoreUserTile) {
    const int64_t user = user0 + threadIdx.x;
    int64_t size = user < a.batch ? a.hidden_sizes[user] : 0;
    size = size < 0 ? 0 : (size > size_cap ? size_cap : size);
    sizes[threadIdx.x] = static_cast<int>(size);
    atomicMax(&sizes[kScoreUserTile], static_cast<int>(size));
    state[4 * threadIdx.x] = 0;  // candidate count
  }
  __syncthreads();
  const int tile_h = sizes[kScoreUserTile];

  for (int64_t item0 = chunk_lo; item0 < chunk_hi; item0 += kScoreItemTile) {
    __syncthreads();  // the previous tile's selection is done with scores, bias and excl
    for (int c = threadIdx.x; c < kScoreItemTile; c += kThreads) {
      const int64_t item = item0 + c;
      bias_tile[c] = item < a.rows ? to_float(bias[item]) : 0.0f;
    }
    for (int w = threadIdx.x; w < kScoreUserTile * kExclWords; w += kThreads) excl[w] = 0u;
    __syncthreads();
    if (a.history != nullptr) {
      const int64_t entries = static_cast<int64_t>(kScoreUserTile) * a.history_len;
      for (int64_t e = threadIdx.x; e < entries; e += kThreads) {
        const int64_t u = e / a.history_len;
        if (user0 + u >= a.batch) break;  // entries are user-major: the rest are past B too
        const int64_t id = a.history[(user0 + u) * a.history_len + e % a.history_len];
        if (id >= item0 && id < item0 + kScoreItemTile) {
          const int c = static_cast<int>(id - item0);
          atomicOr(&excl[u * kExclWords + c / 32], 1u << (c % 32));
        }
      }
    }
    score_tile<T>(a, user0, item0, tile_h, sizes, smem, lay, scores);
    __syncthreads();

    for (int t = 0; t < kUsersPerWarp; ++t) {
      const int u = warp * kUsersPerWarp + t;
      if (user0 + u >= a.batch) break;  // warp-uniform
      WarpTopK top{top_vals + u * k, top_ids + u * k, k, state[4 * u], 0.0f, 0, 0};
      if (top.count == k) {
        top.worst_pos = state[4 * u + 1];
        top.worst_id = state[4 * u + 2];
        top.worst_score = __int_as_float(state[4 * u + 3]);
      }
      for (int j = 0; j < kExclWords; ++j) {
        const int c = lane + 32 * j;
        const int64_t item = item0 + c;
        const bool excluded = (excl[u * kExclWords + j] >> lane) & 1u;
        float s = scores[u * kScoreLd + c] + bias_tile[c];
        if (s != s) s = -__int_as_float(0x7f800000);  // NaN ranks as -inf
        const bool valid = item >= 1 && item < chunk_hi && !excluded;
        top.offer(s, static_cast<int>(valid ? item : 0), valid, lane);
      }
      if (lane == 0) {
        state[4 * u] = top.count;
        state[4 * u + 1] = top.worst_pos;
        state[4 * u + 2] = top.worst_id;
        state[4 * u + 3] = __float_as_int(top.worst_score);
      }
      __syncwarp();
    }
  }

  for (int t = 0; t < kUsersPerWarp; ++t) {
    const int u = warp * kUsersPerWarp + t;
    const int64_t user = user0 + u;
    if (user >= a.batch) break;
    const int count = state[4 * u];
    const int64_t out = (user * num_chunks + chunk) * k;
    for (int p = lane; p < k; p += 32) {
      cand_scores[out + p] = p < count ? top_vals[u * k + p] : -__int_as_float(0x7f800000);
      cand_ids[out + p] = p < count ? top_ids[u * k + p] : -1;
    }
  }
}

__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_kernel(int64_t batch, int k, int64_t per_user, const float* __restrict__ cand_scores,
                 const int* __restrict__ cand_ids, int64_t* __restrict__ out_ids,
                 float* __restrict__ out_scores) {
  __shared__ float vals[kMergeWarps][kScoreTopkMaxK];
  __shared__ int ids[kMergeWarps][kScoreTopkMaxK];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t user = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (user >= batch) return;  // no block-wide barrier below
  WarpTopK top{vals[warp], ids[warp], k, 0, 0.0f, 0, 0};
  const float* scores_in = cand_scores + user * per_user;
  const int* ids_in = cand_ids + user * per_user;
  for (int64_t p0 = 0; p0 < per_user; p0 += 32) {
    const int64_t p = p0 + lane;
    const int id = p < per_user ? ids_in[p] : -1;
    const float s = p < per_user ? scores_in[p] : 0.0f;
    top.offer(s, id, id >= 0, lane);
  }
  __syncwarp();
  // Rank sort: entry i goes to the number of entries that rank before it (ids are unique).
  for (int i = lane; i < k; i += 32) {
    if (i < top.count) {
      const float s = vals[warp][i];
      const int id = ids[warp][i];
      int rank = 0;
      for (int j = 0; j < top.count; ++j) rank += ranks_before(vals[warp][j], ids[warp][j], s, id);
      out_ids[user * k + rank] = id;
      out_scores[user * k + rank] = s;
    } else {
      out_ids[user * k + i] = -1;
      out_scores[user * k + i] = -__int_as_float(0x7f800000);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

template <typename T>
cudaError_t launch_typed(const ScoreTopkArgs& args, int64_t num_chunks, void* workspace,
                         cudaStream_t stream) {
  const int64_t item_tiles = ceil_div(args.rows, kScoreItemTile);
  const int64_t items_per_chunk = ceil_div(item_tiles, num_chunks) * kScoreItemTile;
  const int64_t user_tiles = ceil_div(args.batch, kScoreUserTile);
  const int64_t per_user = num_chunks * args.k;
  float* cand_scores = static_cast<float*>(workspace);
  int* cand_ids = reinterpret_cast<int*>(static_cast<unsigned char*>(workspace) +
                                         align256(sizeof(float) * args.batch * per_user));
  const size_t smem = score_smem_layout<T>(args.k).total;
  cudaError_t err = cudaFuncSetAttribute(score_chunk_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(user_tiles), static_cast<unsigned>(num_chunks));
  score_chunk_kernel<T><<<grid, kThreads, smem, stream>>>(args, items_per_chunk, num_chunks,
                                                          cand_scores, cand_ids);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t merge_blocks = ceil_div(args.batch, kMergeWarps);
  merge_kernel<<<static_cast<unsigned>(merge_blocks), kMergeWarps * 32, 0, stream>>>(
      args.batch, args.k, per_user, cand_scores, cand_ids, args.out_ids, args.out_scores);
  return cudaGetLastError();
}

}  // namespace

int64_t score_topk_num_chunks(int64_t batch, int64_t rows, int k, int num_sms) {
  const int64_t item_tiles = ceil_div(rows > 1 ? rows : 1, kScoreItemTile);
  const int64_t user_tiles = ceil_div(batch > 1 ? batch : 1, kScoreUserTile);
  const int64_t want = ceil_div(4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), user_tiles);
  const int64_t merge_cap = 16384 / (k > 0 ? k : 1);
  int64_t chunks = want;
  if (chunks > item_tiles) chunks = item_tiles;
  if (chunks > merge_cap) chunks = merge_cap;
  if (chunks > 65535) chunks = 65535;
  return chunks < 1 ? 1 : chunks;
}

size_t score_topk_shared_bytes(int k, ScoreDtype dtype) {
  switch (dtype) {
    case ScoreDtype::kFloat16:
      return score_smem_layout<__half>(k).total;
    case ScoreDtype::kBFloat16:
      return score_smem_layout<__nv_bfloat16>(k).total;
    case ScoreDtype::kFloat32:
      break;
  }
  return score_smem_layout<float>(k).total;
}

size_t score_topk_workspace_bytes(int64_t batch, int64_t num_chunks, int k) {
  const size_t n = static_cast<size_t>(batch) * static_cast<size_t>(num_chunks) *
                   static_cast<size_t>(k);
  return align256(sizeof(float) * n) + align256(sizeof(int) * n);
}

cudaError_t score_topk_launch(const ScoreTopkArgs& args, int64_t num_chunks, void* workspace,
                              cudaStream_t stream) {
  if (args.k < 1 || args.k > kScoreTopkMaxK || args.rows < 2 || args.rows > INT32_MAX ||
      args.k > args.rows - 1 || args.batch < 0 || args.H < 0 || args.h_max < 0 ||
      args.H > INT32_MAX || args.history_len < 0 || num_chunks < 1 || num_chunks > 65535 ||
      ceil_div(args.batch, kScoreUserTile) > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0) return cudaSuccess;
  switch (args.dtype) {
    case ScoreDtype::kFloat32:
      return launch_typed<float>(args, num_chunks, workspace, stream);
    case ScoreDtype::kFloat16:
      return launch_typed<__half>(args, num_chunks, workspace, stream);
    case ScoreDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, num_chunks, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace canet
