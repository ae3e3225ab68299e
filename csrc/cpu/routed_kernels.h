// Inner loops of the CPU routed forward: attention for one user, bias+GELU, residual+LayerNorm.
//
// Written as plain loops over contiguous arrays with no calls in their bodies, so that -O3
// vectorizes them: that is why float uses its own polynomial exp and erf (std::exp and std::erf
// are library calls the vectorizer cannot inline). double keeps the exact libm functions, since
// double exists for validation at 1e-10, not for speed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// Every function here is forced inline so that the ISA-specific wrappers in
// routed_forward.cpp (target attributes, chosen at run time) compile the loops for their ISA.
#if defined(__GNUC__)
#define CANET_INLINE inline __attribute__((always_inline))
#else
#define CANET_INLINE inline
#endif

namespace canet {
namespace routed {

CANET_INLINE int32_t float_bits(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

CANET_INLINE float bits_float(int32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// exp(x) for x <= 0 (softmax logits minus their max, and -z^2 in erf), Cephes-style: max
// relative error ~2 ulp. No float comparisons anywhere: under GCC's default -ftrapping-math a
// float compare blocks vectorization, so the clamp at -87 is an integer min of bit patterns
// (for x <= 0 with the sign bit flipped, a larger int32 is a more negative float; GCC 12 only
// vectorizes it written as std::min). Below -87 the true value (< 1.7e-38) is irrelevant next
// to the terms it is added to.
CANET_INLINE float exp_nonpositive(float x) {
  constexpr int32_t kSign = static_cast<int32_t>(0x80000000u);
  const int32_t limit = float_bits(-87.0f) ^ kSign;
  const int32_t key = float_bits(x) ^ kSign;  // +0 -> INT_MIN; grows as x gets more negative
  x = bits_float(std::min(key, limit) ^ kSign);
  // Round to nearest by the 1.5 * 2^23 trick: exact for |t| < 2^22 and branch free.
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_float((static_cast<int32_t>(n) + 127) << 23);
}

// GELU with the exact-erf definition; erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7), the
// same approximation ATen's vectorized float erf uses. The sign is copied with bit operations
// (see exp_nonpositive for why no comparisons).
CANET_INLINE float gelu_erf(float x) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float erf_abs = 1.0f - p * t * exp_nonpositive(-z * z);
  const int32_t sign = float_bits(x) & static_cast<int32_t>(0x80000000u);
  return 0.5f * x * (1.0f + bits_float(float_bits(erf_abs) ^ sign));
}

CANET_INLINE double exp_nonpositive(double x) { return std::exp(x); }

CANET_INLINE double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752)); }

// rows x cols block (leading dimension ld): u = GELU(u + bias).
template <typename T>
CANET_INLINE void bias_gelu(T* u, int64_t rows, int64_t cols, int64_t ld, const T* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict row = u + r * ld;
    for (int64_t c = 0; c < cols; ++c) row[c] = gelu_erf(row[c] + bias[c]);
  }
}

// Independent partial sums: a float sum is a serial dependency chain the compiler may not
// reorder, so the lanes give it SIMD-width work (and 8 lanes of 16 terms each are no less
// accurate than one chain of 128).
constexpr int64_t kLanes = 8;

// x = LayerNorm_h(x + scale * (y + y_bias)) row by row; x and y have leading dimensions ldx,
// ldy; tmp holds one row.
template <typename T>
CANET_INLINE void residual_layer_norm(T* x, int64_t ldx, const T* y, int64_t ldy,
                                      const T* y_bias, T scale, const T* gamma, const T* beta,
                                      int64_t rows, int64_t h, T* tmp) {
  const int64_t body = h - h % kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict xr = x + r * ldx;
    const T* __restrict yr = y + r * ldy;
    T* __restrict z = tmp;
    T lane[kLanes] = {};
    for (int64_t c = 0; c < body; c += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        z[c + l] = xr[c + l] + scale * (yr[c + l] + y_bias[c + l]);
        lane[l] += z[c + l];
      }
    }
    for (int64_t c = body; c < h; ++c) {
      z[c] = xr[c] + scale * (yr[c] + y_bias[c]);
      lane[0] += z[c];
    }
    T sum = 0;
    for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
    const T mean = sum / static_cast<T>(h);
    T sq_lane[kLanes] = {};
    for (int64_t c = 0; c < body; c += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const T centred = z[c + l] - mean;
        sq_lane[l] += centred * centred;
      }
    }
    for (int64_t c = body; c < h; ++c) sq_lane[0] += (z[c] - mean) * (z[c] - mean);
    T sq = 0;
    for (int64_t l = 0; l < kLanes; ++l) sq += sq_lane[l];
    const T rstd = static_cast<T>(1.0 / std::sqrt(static_cast<double>(sq) / h + 1e-5));
    for (int64_t c = 0; c < h; ++c) xr[c] = (z[c] - mean) * rstd * gamma[c] + beta[c];
  }
}

// kLanes values as one GCC/Clang vector: the attention products are written on these so that
// the kQueryTile accumulators stay in registers (the auto-vectorizer does not do that).
template <typename T>
struct Lanes {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};

// Out-parameter rather than return value: GCC warns that returning a wide vector from a
// function built without AVX changes the ABI (irrelevant once inlined, but noisy).
template <typename V, typename T>
CANET_INLINE void load(V& v, const T* from) {
  std::memcpy(&v, from, sizeof(v));
}

template <typename V, typename T>
CANET_INLINE void store(T* to, const V& v) {
  std::memcpy(to, &v, sizeof(v));
}

// Queries handled together in attention: each key vector loaded serves this many queries.
constexpr int64_t kQueryTile = 4;

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Scratch (elements of T) attention_user needs for a user of n positions and head dim dh.
inline int64_t attention_scratch(int64_t n, int64_t dh) {
  const int64_t n_pad = round_up(n, kLanes), dh_pad = round_up(dh, kLanes);
  return dh * n_pad + n * dh_pad + kQueryTile * (n_pad + 2 * dh_pad + 1);
}

// Causal softmax attention of ONE user over its n real positions (padding rows were dropped,
// so every key at or before a query is allowed). Heads are interleaved: channel c of the
// h-wide rows is head c % heads at position c / heads.
//
// q: rows of queries first_query..n-1 (leading dim ldq), before bias and scaling;
// k, v: n rows (leading dim ldkv), before bias; o: output rows for the queries (ldo).
//
// Each head is first copied out head-major (keys transposed, values row-wise, both zero-padded
// to whole lanes) so that the two products below run over full kLanes-wide vectors with
// kQueryTile accumulators kept in registers.
template <typename T>
CANET_INLINE void attention_user(const T* q, int64_t ldq, int64_t first_query, const T* k,
                                 const T* v, int64_t ldkv, const T* bias_q, const T* bias_k,
                                 const T* bias_v, int64_t n, int64_t h, int64_t heads, T scale,
                                 T* o, int64_t ldo, T* scratch) {
  static_assert(kQueryTile == 4, "the products below are unrolled for 4 queries");
  using Vec = typename Lanes<T>::type;
  const int64_t dh = h / heads;
  const int64_t n_pad = round_up(n, kLanes), dh_pad = round_up(dh, kLanes);
  T* __restrict kt = scratch;               // [dh][n_pad]: one key channel along positions
  T* __restrict vh = kt + dh * n_pad;       // [n][dh_pad]
  T* __restrict s = vh + n * dh_pad;        // [kQueryTile][n_pad] logits, then weights
  T* __restrict qh = s + kQueryTile * n_pad;  // [kQueryTile][dh]
  T* __restrict acc = qh + kQueryTile * dh_pad;  // [kQueryTile][dh_pad]
  T* __restrict inv_sum = acc + kQueryTile * dh_pad;

  for (int64_t g = 0; g < heads; ++g) {
    for (int64_t p = 0; p < dh; ++p) {
      const int64_t c = p * heads + g;
      T* kd = kt + p * n_pad;
      for (int64_t j = 0; j < n; ++j) kd[j] = k[j * ldkv + c] + bias_k[c];
      for (int64_t j = n; j < n_pad; ++j) kd[j] = T(0);
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* vr = v + j * ldkv;
      T* vd = vh + j * dh_pad;
      for (int64_t p = 0; p < dh; ++p) vd[p] = vr[p * heads + g] + bias_v[p * heads + g];
      for (int64_t p = dh; p < dh_pad; ++p) vd[p] = T(0);
    }
    for (int64_t i0 = first_query; i0 < n; i0 += kQueryTile) {
      const int64_t tile = std::min(kQueryTile, n - i0);
      const int64_t keys = i0 + tile;  // the tile's last query sees keys 0..keys-1
      for (int64_t t = 0; t < kQueryTile; ++t) {
        // Rows past the tile reuse its last query: the loops stay branch-free and unused.
        const T* qr = q + (i0 + std::min(t, tile - 1) - first_query) * ldq;
        for (int64_t p = 0; p < dh; ++p) {
          qh[t * dh_pad + p] = (qr[p * heads + g] + bias_q[p * heads + g]) * scale;
        }
      }
      const T* q0 = qh;
      const T* q1 = qh + dh_pad;
      const T* q2 = qh + 2 * dh_pad;
      const T* q3 = qh + 3 * dh_pad;
      for (int64_t j0 = 0; j0 < keys; j0 += kLanes) {
        Vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t p = 0; p < dh; ++p) {
          Vec key;
          load(key, kt + p * n_pad + j0);
          a0 += q0[p] * key;
          a1 += q1[p] * key;
          a2 += q2[p] * key;
          a3 += q3[p] * key;
        }
        store(s + j0, a0);
        store(s + n_pad + j0, a1);
        store(s + 2 * n_pad + j0, a2);
        store(s + 3 * n_pad + j0, a3);
      }
      for (int64_t t = 0; t < tile; ++t) {
        T* __restrict st = s + t * n_pad;
        const int64_t count = i0 + t + 1;  // causal: keys 0..i0+t
        T m = st[0];
        for (int64_t j = 1; j < count; ++j) m = std::max(m, st[j]);
        for (int64_t j = 0; j < count; ++j) st[j] = exp_nonpositive(st[j] - m);
        T sum = 0;
        for (int64_t j = 0; j < count; ++j) sum += st[j];
        inv_sum[t] = T(1) / sum;
        // Weight 0 for the keys after the query: the product below then runs over the tile's
        // keys for every query alike.
        for (int64_t j = count; j < keys; ++j) st[j] = T(0);
      }
      for (int64_t t = tile; t < kQueryTile; ++t) {
        for (int64_t j = 0; j < keys; ++j) s[t * n_pad + j] = T(0);
      }
      const T* w0 = s;
      const T* w1 = s + n_pad;
      const T* w2 = s + 2 * n_pad;
      const T* w3 = s + 3 * n_pad;
      for (int64_t p0 = 0; p0 < dh_pad; p0 += kLanes) {
        Vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t j = 0; j < keys; ++j) {
          Vec value;
          load(value, vh + j * dh_pad + p0);
          a0 += w0[j] * value;
          a1 += w1[j] * value;
          a2 += w2[j] * value;
          a3 += w3[j] * value;
        }
        store(acc + p0, a0);
        store(acc + dh_pad + p0, a1);
        store(acc + 2 * dh_pad + p0, a2);
        store(acc + 3 * dh_pad + p0, a3);
      }
      for (int64_t t = 0; t < tile; ++t) {
        T* orow = o + (i0 + t - first_query) * ldo;
        for (int64_t p = 0; p < dh; ++p) orow[p * heads + g] = acc[t * dh_pad + p] * inv_sum[t];
      }
    }
  }
}

}  // namespace routed
}  // namespace canet
