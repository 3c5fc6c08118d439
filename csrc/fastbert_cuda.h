// Helpers shared by the two files of the CUDA binding (fastbert_cuda.cpp, fastbert_cuda_attention.cpp): dtype
// mapping, device and launch checks, the current stream, the dropout seed, scratch and mask conversion.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/launchers.h"

namespace fastbert_cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline FastbertDType kernel_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return FASTBERT_FLOAT32;
    case at::kBFloat16:
      return FASTBERT_BFLOAT16;
    case at::kHalf:
      return FASTBERT_FLOAT16;
    default:
      TORCH_CHECK(false, "fastbert_ext (cuda): ", name, " must be float32, bfloat16 or float16, got ", t);
  }
}

inline void check_device(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "fastbert_ext (cuda): ", name, " must be on ",
              like.device(), " like the input, got ", t.device());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastbert_ext (cuda): ", op, " failed: ", cudaGetErrorString(err));
}

inline cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// The seed is a CPU int64 tensor (reading it never synchronizes the GPU); one on the GPU is copied back.
inline uint64_t dropout_seed(const OptTensor& seed, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastbert_ext (cuda): dropout_p must be in [0, 1), got ",
              dropout_p);
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->numel() >= 1 && seed->scalar_type() == at::kLong,
              "fastbert_ext (cuda): dropout_p > 0 needs a seed: an int64 tensor of one element");
  return static_cast<uint64_t>(seed->to(at::kCPU).contiguous().data_ptr<int64_t>()[0]);
}

inline Tensor workspace(size_t bytes, const Tensor& like) {
  // The caching allocator hands out 512-byte aligned blocks: the launchers need 16.
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

inline Tensor bool_mask(const Tensor& mask, int64_t batch, int64_t seqlen, const Tensor& like) {
  check_device(mask, "key_padding_mask", like);
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == seqlen,
              "fastbert_ext (cuda): key_padding_mask must be (batch, seqlen_k) = (", batch, ", ", seqlen, "), got ",
              mask.sizes());
  return mask.to(at::kBool).contiguous();  // one byte per key, 0 or 1: the kernels' uint8 mask
}

inline const uint8_t* mask_ptr(const Tensor& mask) {
  return mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
}

}  // namespace fastbert_cuda
