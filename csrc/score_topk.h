// Shared declarations for the canet::score_topk operator (CPU and CUDA implementations).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace canet {

// Largest k the kernels accept: the per-user candidate state lives in shared memory on the GPU.
constexpr int64_t kScoreTopkMaxK = 200;

// (ids [B, k] int64, scores [B, k]); see csrc/ops.cpp for the schema and canet/ops.py for the
// contract (tie rule, padding with id -1 / score -inf).
using ScoreTopkResult = std::tuple<at::Tensor, at::Tensor>;

// Checks dtypes, ranks, shapes, k and device agreement (not the values of hidden_sizes or
// history, which would cost a device sync on the GPU); shared by every backend so the messages
// are identical whichever kernel the dispatcher picks.
void check_score_topk_inputs(const at::Tensor& hidden, const at::Tensor& hidden_sizes,
                             const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& history, int64_t k);

// Rows with unit inner stride are read in place (the output layer's weight; a slice of the
// last position's hidden states); anything else is copied once.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

// True when history means "exclude nothing": undefined or without elements.
inline bool score_topk_no_history(const at::Tensor& history) {
  return !history.defined() || history.numel() == 0;
}

// The operands as both kernels read them: weight and hidden with unit inner stride, the rest
// contiguous, and history undefined when nothing is excluded.
struct ScoreTopkOperands {
  at::Tensor hidden, hidden_sizes, weight, bias, history;
  bool has_history() const { return history.defined(); }
  const int64_t* history_ptr() const {
    return has_history() ? history.data_ptr<int64_t>() : nullptr;
  }
  int64_t history_len() const { return has_history() ? history.size(1) : 0; }
};

inline ScoreTopkOperands score_topk_operands(const at::Tensor& hidden,
                                             const at::Tensor& hidden_sizes,
                                             const at::Tensor& weight, const at::Tensor& bias,
                                             const at::Tensor& history) {
  return {rows_unit_stride(hidden), hidden_sizes.contiguous(), rows_unit_stride(weight),
          bias.contiguous(),
          score_topk_no_history(history) ? at::Tensor() : history.contiguous()};
}

}  // namespace canet
