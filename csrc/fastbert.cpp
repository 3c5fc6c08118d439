// fastbert's compiled extension: op schemas (torch.ops.fastbert_ext.*, every op, including the CUDA-only attention
// ops bound in fastbert_cuda_attention.cpp) and their CPU bindings.
//
// The only translation unit that includes the Tensor and dispatcher headers (the kernels include only ATen's
// Parallel and vec headers): it checks arguments, makes inputs contiguous, upcasts the per-feature parameters to
// fp32, allocates outputs and calls the pointer-and-size kernels of csrc/cpu. The schemas mirror the Python custom
// ops fastbert::<op> one for one (same arguments, same outputs, empty (numel 0) gradients for absent optional
// inputs); fastbert/ops/<op>/native.py registers them as the cpp backend and holds their fake (shape-only)
// implementations.
//
// Only the per-operator ATen headers are included: with torch/extension.h this file takes 23 s to compile instead
// of 6 s (measured with g++ 12), and this is the one file every fresh install compiles first.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/kernels.h"

namespace {

using at::Tensor;
using fastbert::cpu::Dtype;
using OptTensor = std::optional<Tensor>;

Dtype kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kHalf:
      return Dtype::kFloat16;
    default:
      TORCH_CHECK(false, "fastbert_ext: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// A contiguous CPU tensor of `dtype` with `like`'s shape (converted when the caller passed another float dtype).
Tensor activation(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "fastbert_ext: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == like.sizes(), "fastbert_ext: ", name, " has shape ", t.sizes(), ", expected ",
              like.sizes());
  kernel_dtype(t, name);
  return t.to(like.scalar_type()).contiguous();
}

// Per-feature parameter as a contiguous fp32 (n,) tensor; zeros when absent (kernels never see nullptr).
Tensor param_fp32(const OptTensor& p, int64_t n, const Tensor& x, const char* name) {
  if (!p.has_value()) return at::zeros({n}, x.options().dtype(at::kFloat));
  TORCH_CHECK(p->device().is_cpu(), "fastbert_ext: ", name, " must be a CPU tensor, got ", p->device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, "fastbert_ext: ", name, " must have shape (", n, ",), got ",
              p->sizes());
  kernel_dtype(*p, name);
  return p->to(at::kFloat).contiguous();
}

int64_t hidden_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "fastbert_ext: x must have at least one dimension (the features)");
  return x.size(-1);
}

int64_t rows_of(const Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

// fp32 statistics of shape x.shape[:-1].
Tensor new_stats(const Tensor& x) { return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat)); }

Tensor saved_stats(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows_of(x), "fastbert_ext: ", name,
              " must be the forward's fp32 statistics of shape x.shape[:-1]");
  return t.contiguous();
}

uint64_t dropout_seed(const OptTensor& seed, double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastbert_ext: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->numel() >= 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
              "fastbert_ext: dropout_p > 0 needs a seed: an int64 CPU tensor of one element");
  return static_cast<uint64_t>(seed->contiguous().data_ptr<int64_t>()[0]);
}

bool tanh_approximation(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "fastbert_ext: approximate must be 'none' (exact erf GELU) or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

// ---------------------------------------------------------------------------------------------------------------
// add_layer_norm

std::tuple<Tensor, Tensor, Tensor> add_layer_norm_fwd(const Tensor& x_in, const OptTensor& residual_in,
                                                      const Tensor& weight, const OptTensor& bias, double eps,
                                                      double dropout_p, const OptTensor& seed) {
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in);
  const OptTensor residual = residual_in ? OptTensor(activation(*residual_in, "residual", x)) : std::nullopt;
  const Tensor w = param_fp32(weight, n, x, "weight"), b = param_fp32(bias, n, x, "bias");
  const uint64_t seed_value = dropout_seed(seed, dropout_p);
  Tensor out = at::empty(x.sizes(), x.options()), mean = new_stats(x), rstd = new_stats(x);
  fastbert::cpu::add_layer_norm_fwd(kernel_dtype(x, "x"), x.data_ptr(), residual ? residual->data_ptr() : nullptr,
                                    w.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr(), mean.data_ptr<float>(),
                                    rstd.data_ptr<float>(), rows_of(x), n, static_cast<float>(eps),
                                    static_cast<float>(dropout_p), seed_value);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_bwd(const Tensor& dout_in, const Tensor& x_in,
                                                              const OptTensor& residual_in, const Tensor& weight,
                                                              const OptTensor& bias, const Tensor& mean_in,
                                                              const Tensor& rstd_in, double dropout_p,
                                                              const OptTensor& seed) {
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in), dout = activation(dout_in, "dout", x);
  const OptTensor residual = residual_in ? OptTensor(activation(*residual_in, "residual", x)) : std::nullopt;
  const Tensor w = param_fp32(weight, n, x, "weight");
  const Tensor mean = saved_stats(mean_in, x, "mean"), rstd = saved_stats(rstd_in, x, "rstd");
  const uint64_t seed_value = dropout_seed(seed, dropout_p);
  Tensor dx = at::empty(x.sizes(), x.options());
  // Without dropout the residual's gradient is dx itself: not written twice (the op contract: dresidual empty).
  const bool separate_dresidual = residual.has_value() && dropout_p > 0.0;
  Tensor dresidual = separate_dresidual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor dw = at::empty({n}, x.options().dtype(at::kFloat)), db = at::empty({n}, x.options().dtype(at::kFloat));
  fastbert::cpu::add_layer_norm_bwd(kernel_dtype(x, "x"), dout.data_ptr(), x.data_ptr(),
                                    residual ? residual->data_ptr() : nullptr, w.data_ptr<float>(),
                                    mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                                    separate_dresidual ? dresidual.data_ptr() : nullptr, dw.data_ptr<float>(),
                                    db.data_ptr<float>(), rows_of(x), n, static_cast<float>(dropout_p), seed_value);
  // A residual given in another float dtype was converted to x's; its gradient goes back in its own dtype.
  if (separate_dresidual) dresidual = dresidual.to(residual_in->scalar_type());
  Tensor dbias = bias ? db.to(bias->scalar_type()) : at::empty({0}, weight.options());
  return {dx, dresidual, dw.to(weight.scalar_type()), dbias};
}

// ---------------------------------------------------------------------------------------------------------------
// bias_gelu and bias_gelu_layer_norm

Tensor bias_gelu_fwd(const Tensor& x_in, const OptTensor& bias, c10::string_view approximate) {
  const bool tanh_approx = tanh_approximation(approximate);
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in), b = param_fp32(bias, n, x, "bias");
  Tensor out = at::empty(x.sizes(), x.options());
  fastbert::cpu::bias_gelu_fwd(kernel_dtype(x, "x"), x.data_ptr(), b.data_ptr<float>(), out.data_ptr(), rows_of(x), n,
                               tanh_approx);
  return out;
}

// In place: x <- gelu(x + bias), for an x whose old value nothing needs (inference); the kernel reads each vector
// before writing it back, so input and output may be the same memory.
void bias_gelu_fwd_(const Tensor& x, const OptTensor& bias, c10::string_view approximate) {
  const bool tanh_approx = tanh_approximation(approximate);
  const int64_t n = hidden_of(x);
  TORCH_CHECK(x.device().is_cpu(), "fastbert_ext: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "fastbert_ext: bias_gelu_fwd_ overwrites x in place, so x must be contiguous");
  const Tensor b = param_fp32(bias, n, x, "bias");
  fastbert::cpu::bias_gelu_fwd(kernel_dtype(x, "x"), x.data_ptr(), b.data_ptr<float>(), x.data_ptr(), rows_of(x), n,
                               tanh_approx);
}

// The gradient of a GELU bias: fp32 column sums from the kernel, in the bias's dtype; empty (numel 0) unless
// requested (need_dbias, and there is a bias).
bool wants_dbias(const OptTensor& bias, bool need_dbias) { return need_dbias && bias.has_value(); }

Tensor dbias_out(const Tensor& acc, const OptTensor& bias, const Tensor& like) {
  return acc.defined() ? acc.to(bias->scalar_type()) : at::empty({0}, like.options());
}

std::tuple<Tensor, Tensor> bias_gelu_bwd(const Tensor& dout_in, const Tensor& x_in, const OptTensor& bias,
                                         c10::string_view approximate, bool need_dbias) {
  const bool tanh_approx = tanh_approximation(approximate);
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in), dout = activation(dout_in, "dout", x);
  const Tensor b = param_fp32(bias, n, x, "bias");
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor db = wants_dbias(bias, need_dbias) ? at::empty({n}, x.options().dtype(at::kFloat)) : Tensor();
  fastbert::cpu::bias_gelu_bwd(kernel_dtype(x, "x"), dout.data_ptr(), x.data_ptr(), b.data_ptr<float>(), dx.data_ptr(),
                               db.defined() ? db.data_ptr<float>() : nullptr, rows_of(x), n, tanh_approx);
  return {dx, dbias_out(db, bias, x)};
}

std::tuple<Tensor, Tensor, Tensor> bias_gelu_layer_norm_fwd(const Tensor& x_in, const OptTensor& bias,
                                                            const Tensor& weight, const OptTensor& ln_bias,
                                                            double eps, c10::string_view approximate) {
  const bool tanh_approx = tanh_approximation(approximate);
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in);
  const Tensor b = param_fp32(bias, n, x, "bias"), w = param_fp32(weight, n, x, "weight");
  const Tensor lnb = param_fp32(ln_bias, n, x, "ln_bias");
  Tensor out = at::empty(x.sizes(), x.options()), mean = new_stats(x), rstd = new_stats(x);
  fastbert::cpu::bias_gelu_layer_norm_fwd(kernel_dtype(x, "x"), x.data_ptr(), b.data_ptr<float>(), w.data_ptr<float>(),
                                          lnb.data_ptr<float>(), out.data_ptr(), mean.data_ptr<float>(),
                                          rstd.data_ptr<float>(), rows_of(x), n, static_cast<float>(eps), tanh_approx);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bias_gelu_layer_norm_bwd(const Tensor& dout_in, const Tensor& x_in,
                                                                    const OptTensor& bias, const Tensor& weight,
                                                                    const OptTensor& ln_bias, const Tensor& mean_in,
                                                                    const Tensor& rstd_in, c10::string_view approximate,
                                                                    bool need_dbias) {
  const bool tanh_approx = tanh_approximation(approximate);
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in), dout = activation(dout_in, "dout", x);
  const Tensor b = param_fp32(bias, n, x, "bias"), w = param_fp32(weight, n, x, "weight");
  const Tensor mean = saved_stats(mean_in, x, "mean"), rstd = saved_stats(rstd_in, x, "rstd");
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dw = at::empty({n}, x.options().dtype(at::kFloat)), dlnb = at::empty({n}, x.options().dtype(at::kFloat));
  Tensor db = wants_dbias(bias, need_dbias) ? at::empty({n}, x.options().dtype(at::kFloat)) : Tensor();
  fastbert::cpu::bias_gelu_layer_norm_bwd(kernel_dtype(x, "x"), dout.data_ptr(), x.data_ptr(), b.data_ptr<float>(),
                                          w.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                          dx.data_ptr(), dw.data_ptr<float>(), dlnb.data_ptr<float>(),
                                          db.defined() ? db.data_ptr<float>() : nullptr, rows_of(x), n, tanh_approx);
  Tensor dln_bias = ln_bias ? dlnb.to(ln_bias->scalar_type()) : at::empty({0}, weight.options());
  return {dx, dbias_out(db, bias, x), dw.to(weight.scalar_type()), dln_bias};
}

// ---------------------------------------------------------------------------------------------------------------
// softmax

Tensor softmax_fwd(const Tensor& scores_in, const OptTensor& key_padding_mask, double scale) {
  TORCH_CHECK(scores_in.dim() == 4, "fastbert_ext: scores must be (batch, nheads, seqlen_q, seqlen_k), got shape ",
              scores_in.sizes());
  const Tensor scores = activation(scores_in, "scores", scores_in);
  const int64_t batch = scores.size(0), n = scores.size(3);
  OptTensor mask;
  if (key_padding_mask) {
    TORCH_CHECK(key_padding_mask->device().is_cpu() && key_padding_mask->dim() == 2 &&
                    key_padding_mask->size(0) == batch && key_padding_mask->size(1) == n,
                "fastbert_ext: key_padding_mask must be a (batch, seqlen_k) = (", batch, ", ", n,
                ") CPU tensor, got ", key_padding_mask->sizes());
    mask = key_padding_mask->to(at::kBool).contiguous();  // bool is one byte, 0 or 1
  }
  Tensor probs = at::empty(scores.sizes(), scores.options());
  fastbert::cpu::softmax_fwd(kernel_dtype(scores, "scores"), scores.data_ptr(),
                             mask ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr,
                             probs.data_ptr(), batch, scores.size(1) * scores.size(2), n, static_cast<float>(scale));
  return probs;
}

Tensor softmax_bwd(const Tensor& dprobs_in, const Tensor& probs_in, double scale) {
  TORCH_CHECK(probs_in.dim() >= 1, "fastbert_ext: probs must have at least one dimension");
  const Tensor probs = activation(probs_in, "probs", probs_in), dprobs = activation(dprobs_in, "dprobs", probs);
  const int64_t n = probs.size(-1);
  Tensor dscores = at::empty(probs.sizes(), probs.options());
  fastbert::cpu::softmax_bwd(kernel_dtype(probs, "probs"), dprobs.data_ptr(), probs.data_ptr(), dscores.data_ptr(),
                             rows_of(probs), n, static_cast<float>(scale));
  return dscores;
}

}  // namespace

TORCH_LIBRARY(fastbert_ext, m) {
  m.def(
      "add_layer_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, float dropout_p, "
      "Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm_bwd(Tensor dout, Tensor x, Tensor? residual, Tensor weight, Tensor? bias, Tensor mean, "
      "Tensor rstd, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def("bias_gelu_fwd_(Tensor(a!) x, Tensor? bias, str approximate) -> ()");
  m.def("bias_gelu_bwd(Tensor dout, Tensor x, Tensor? bias, str approximate, bool need_dbias) -> (Tensor, Tensor)");
  m.def(
      "bias_gelu_layer_norm_fwd(Tensor x, Tensor? bias, Tensor weight, Tensor? ln_bias, float eps, str approximate) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "bias_gelu_layer_norm_bwd(Tensor dout, Tensor x, Tensor? bias, Tensor weight, Tensor? ln_bias, Tensor mean, "
      "Tensor rstd, str approximate, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("softmax_fwd(Tensor scores, Tensor? key_padding_mask, float scale) -> Tensor");
  m.def("softmax_bwd(Tensor dprobs, Tensor probs, float scale) -> Tensor");
  // Attention has CUDA kernels only (csrc/fastbert_cuda_attention.cpp); on CPU the torch backend runs PyTorch's flash
  // kernel. Defined here so that every schema lives in one place and the CUDA library only adds kernels.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float dropout_p, float scale, "
      "Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
      "float dropout_p, float scale, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float dropout_p, "
      "float scale, Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "varlen_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, "
      "int max_seqlen, float dropout_p, float scale, Tensor? seed) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastbert_ext, CPU, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd);
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_fwd_", &bias_gelu_fwd_);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
  m.impl("bias_gelu_layer_norm_fwd", &bias_gelu_layer_norm_fwd);
  m.impl("bias_gelu_layer_norm_bwd", &bias_gelu_layer_norm_bwd);
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}
