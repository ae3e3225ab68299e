// Float GEMM on weights packed once into column panels, for the small row counts of a routed
// group (one user = its ~L rows; a last block = one row per user).
//
// Why: at::mm (MKL) re-packs the weight operand on every call, and a group of a few users
// multiplies each weight with only tens of rows, so packing and the per-call dispatch cost
// about as much as the arithmetic (perf at B = 1: a third of the GEMM time in MKL's copy
// routine). ONNX Runtime packs its constant weights once at session creation; this does the
// same, for every prefix slice at once.
//
// Layout (pack_panels): rows [row0, row0 + n_max) of a row-major [*, k_max] weight W as
// ceil(n_max / 16) panels of [k_max][16]: panel p, row kk, lane j holds W[row0 + 16p + j][kk]
// (0 past n_max). A config's prefix slice W[row0 : row0 + n, :k] is then the first
// ceil(n / 16) panels, the first k rows of each: one packed copy serves every config.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define CANET_HAVE_PACKED_GEMM 1
#endif

namespace canet {
namespace routed {

constexpr int64_t kPanel = 16;  // output columns per panel: two AVX2 vectors
constexpr int64_t kPanelRows = 6;  // rows per micro-kernel call: 12 accumulators
// The k loop runs in chunks whose sums are added to the output: a chain of at most 128
// roundings per chunk instead of k (the FFN's second GEMM has k = 4h = 512), and a panel chunk
// (128 x 16 floats, 8 KB) stays in L1 across the row blocks.
constexpr int64_t kChunk = 128;

inline int64_t panel_count(int64_t n) { return (n + kPanel - 1) / kPanel; }

// Pack rows [row0, row0 + n_max) of w (row-major, leading dimension ld, k_max columns used).
inline void pack_panels(const float* w, int64_t ld, int64_t row0, int64_t n_max, int64_t k_max,
                        float* out) {
  const int64_t panels = panel_count(n_max);
  std::memset(out, 0, sizeof(float) * panels * k_max * kPanel);
  for (int64_t r = 0; r < n_max; ++r) {
    const float* src = w + (row0 + r) * ld;
    float* dst = out + (r / kPanel) * k_max * kPanel + (r % kPanel);
    for (int64_t kk = 0; kk < k_max; ++kk) dst[kk * kPanel] = src[kk];
  }
}

#ifdef CANET_HAVE_PACKED_GEMM
// c[rows, :cols] (+)= a[rows, :k] @ panel[:k, :cols] for rows = MR (<= 6) and cols <= 16
// (added to c when `add`, else stored). The
// twelve accumulators are named variables, not an array: GCC keeps an indexed array of vectors
// on the stack and stores every accumulator back each step (measured: 0.6x MKL's speed).
#define CANET_ROW(r)                                                       \
  if constexpr (MR > r) {                                                  \
    const __m256 ar = _mm256_broadcast_ss(a + r * lda + kk);               \
    c##r##0 = _mm256_fmadd_ps(ar, b0, c##r##0);                            \
    c##r##1 = _mm256_fmadd_ps(ar, b1, c##r##1);                            \
  }
#define CANET_STORE(r)                                                     \
  if constexpr (MR > r) {                                                  \
    float* cr = c + r * ldc;                                               \
    if (cols == kPanel) {                                                  \
      if (add) {                                                           \
        c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(cr));             \
        c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(cr + 8));         \
      }                                                                    \
      _mm256_storeu_ps(cr, c##r##0);                                       \
      _mm256_storeu_ps(cr + 8, c##r##1);                                   \
    } else { /* a last, partial panel: never touch past the columns */     \
      alignas(32) float tile[kPanel];                                      \
      _mm256_store_ps(tile, c##r##0);                                      \
      _mm256_store_ps(tile + 8, c##r##1);                                  \
      for (int64_t j = 0; j < cols; ++j) cr[j] = add ? cr[j] + tile[j] : tile[j]; \
    }                                                                      \
  }
template <int MR>
__attribute__((target("avx2,fma"))) inline void panel_kernel(const float* a, int64_t lda,
                                                             const float* panel, int64_t k,
                                                             float* c, int64_t ldc,
                                                             int64_t cols, bool add) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(panel + kk * kPanel);
    const __m256 b1 = _mm256_loadu_ps(panel + kk * kPanel + 8);
    CANET_ROW(0)
    CANET_ROW(1)
    CANET_ROW(2)
    CANET_ROW(3)
    CANET_ROW(4)
    CANET_ROW(5)
  }
  CANET_STORE(0)
  CANET_STORE(1)
  CANET_STORE(2)
  CANET_STORE(3)
  CANET_STORE(4)
  CANET_STORE(5)
}
#undef CANET_ROW
#undef CANET_STORE

// out[m, :n] = a[m, :k] @ W[row0 : row0 + n, :k]^T, W packed by pack_panels with k_max rows per
// panel (k <= k_max, n <= the packed n_max).
__attribute__((target("avx2,fma"))) inline void gemm_packed(float* out, int64_t ldo,
                                                            const float* a, int64_t lda,
                                                            int64_t m, const float* packed,
                                                            int64_t k_max, int64_t n,
                                                            int64_t k) {
  for (int64_t p = 0; p * kPanel < n; ++p) {
    const int64_t cols = std::min(kPanel, n - p * kPanel);
    float* c = out + p * kPanel;
    for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
      const float* panel = packed + (p * k_max + k0) * kPanel;
      const float* a0 = a + k0;
      const int64_t kc = std::min(kChunk, k - k0);
      const bool add = k0 > 0;
      int64_t r = 0;
      for (; r + kPanelRows <= m; r += kPanelRows) {
        panel_kernel<kPanelRows>(a0 + r * lda, lda, panel, kc, c + r * ldo, ldo, cols, add);
      }
      float* cr = c + r * ldo;
      const float* ar = a0 + r * lda;
      switch (m - r) {
        case 1: panel_kernel<1>(ar, lda, panel, kc, cr, ldo, cols, add); break;
        case 2: panel_kernel<2>(ar, lda, panel, kc, cr, ldo, cols, add); break;
        case 3: panel_kernel<3>(ar, lda, panel, kc, cr, ldo, cols, add); break;
        case 4: panel_kernel<4>(ar, lda, panel, kc, cr, ldo, cols, add); break;
        case 5: panel_kernel<5>(ar, lda, panel, kc, cr, ldo, cols, add); break;
        default: break;
      }
    }
  }
}

inline bool packed_gemm_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
inline bool packed_gemm_supported() { return false; }
#endif

}  // namespace routed
}  // namespace canet
