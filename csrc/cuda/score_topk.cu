// Thin torch binding of the canet::score_topk CUDA kernels (the kernels are in
// score_topk_kernel.cu).
#include "../score_topk.h"
#include "score_topk_kernel.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace canet {
namespace {

ScoreTopkResult score_topk_cuda(const at::Tensor& hidden, const at::Tensor& hidden_sizes,
                                const at::Tensor& weight, const at::Tensor& bias,
                                const std::optional<at::Tensor>& history_opt, int64_t k) {
  const at::Tensor history = history_opt.has_value() ? *history_opt : at::Tensor();
  check_score_topk_inputs(hidden, hidden_sizes, weight, bias, history, k);
  TORCH_CHECK(hidden.is_cuda(), "canet::score_topk (CUDA kernel): expected CUDA tensors, got ",
              hidden.device());
  cuda::ScoreDtype dtype = cuda::ScoreDtype::kFloat32;
  switch (hidden.scalar_type()) {
    case at::kFloat: dtype = cuda::ScoreDtype::kFloat32; break;
    case at::kHalf: dtype = cuda::ScoreDtype::kFloat16; break;
    case at::kBFloat16: dtype = cuda::ScoreDtype::kBFloat16; break;
    default:
      TORCH_CHECK(false, "canet::score_topk (CUDA kernel): expected float32, float16 or "
                  "bfloat16, got ", hidden.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(hidden.device());
  const ScoreTopkOperands in = score_topk_operands(hidden, hidden_sizes, weight, bias, history);
  const at::Tensor& hid = in.hidden;
  const at::Tensor& w = in.weight;
  const int64_t B = hid.size(0);
  at::Tensor ids = at::empty({B, k}, hid.options().dtype(at::kLong));
  at::Tensor scores = at::empty({B, k}, hid.options().dtype(at::kFloat));
  if (B == 0) return {ids, scores};

  // Cached device attributes: no sync. (ATen's CUDAContext.h would pull in cuSPARSE headers.)
  const int device = hidden.device().index();
  int num_sms = 0;
  if (cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    num_sms = 1;
    (void)cudaGetLastError();  // do not leave the failure to the next launch check
  }
  int shared_optin = 0;
  if (cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
      cudaSuccess) {
    const size_t needed = cuda::score_topk_shared_bytes(static_cast<int>(k), dtype);
    if (needed > static_cast<size_t>(shared_optin)) {
      int64_t fits = k;
      while (fits > 0 && cuda::score_topk_shared_bytes(static_cast<int>(fits), dtype) >
                             static_cast<size_t>(shared_optin)) {
        --fits;
      }
      TORCH_CHECK(false, "canet::score_topk (CUDA kernel): k = ", k, " needs ", needed,
                  " bytes of shared memory per block and this GPU (cuda:", device,
                  ") allows ", shared_optin, "; ",
                  fits > 0 ? "use k <= " + std::to_string(fits) + " here, or the CPU op"
                           : std::string("no k fits here: use the CPU op"));
    }
  } else {
    (void)cudaGetLastError();  // unknown limit: the launch reports it if k does not fit
  }
  const int64_t chunks = cuda::score_topk_num_chunks(B, w.size(0), static_cast<int>(k), num_sms);
  // From the caching allocator on the current stream: no sync, and safe under graph capture.
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda::score_topk_workspace_bytes(B, chunks, static_cast<int>(k)))},
      hid.options().dtype(at::kByte));

  cuda::ScoreTopkArgs args{};
  args.hidden = hid.data_ptr();
  args.hidden_sizes = in.hidden_sizes.data_ptr<int64_t>();
  args.weight = w.data_ptr();
  args.bias = in.bias.data_ptr();
  args.history = in.history_ptr();
  args.batch = B;
  args.h_max = hid.size(1);
  args.hidden_stride = hid.stride(0);
  args.rows = w.size(0);
  args.H = w.size(1);
  args.weight_stride = w.stride(0);
  args.history_len = in.history_len();
  args.k = static_cast<int>(k);
  args.dtype = dtype;
  args.out_ids = ids.data_ptr<int64_t>();
  args.out_scores = scores.data_ptr<float>();
  const cudaError_t err = cuda::score_topk_launch(args, chunks, workspace.data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "canet::score_topk (CUDA kernel): launch failed: ",
              cudaGetErrorString(err));
  return {ids, scores};
}

}  // namespace
}  // namespace canet

TORCH_LIBRARY_IMPL(canet, CUDA, m) { m.impl("score_topk", &canet::score_topk_cuda); }
