// The torch binding of the CUDA kernels: CUDA implementations of the torch.ops.fastbert_ext.* ops.
//
// The schemas are defined once, in fastbert.cpp (the cpp library, which fastbert/_ext.py loads first); this library
// only adds a kernel per op for the CUDA dispatch key. Each wrapper checks its arguments (device, dtype, shape and
// what the kernel supports, with a message naming the argument), makes the inputs the kernels read densely
// contiguous where they need it, allocates the outputs through torch's caching allocator, and calls the plain
// launcher of csrc/cuda/launchers.h on the current stream of the tensors' device. The .cu files never see a torch
// header: this file, fastbert_cuda_attention.cpp (the attention ops) and their helpers in fastbert_cuda.h are the
// only parts of the CUDA library that do.
//
// Per-feature parameters (LayerNorm weight/bias, GELU bias) go to the kernels either in the activation dtype or,
// when any of them has another float dtype (fp32 LayerNorm weights under bf16 autocast), all in fp32: the kernels
// take one parameter dtype per call. Their gradients come back in each parameter's own dtype, as in the cpp backend.
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>

#include <initializer_list>
#include <tuple>

#include "fastbert_cuda.h"

namespace {

using namespace fastbert_cuda;

// A contiguous tensor on like's device, of like's shape and dtype (another float dtype is converted).
Tensor activation(const Tensor& t, const char* name, const Tensor& like) {
  check_device(t, name, like);
  TORCH_CHECK(t.sizes() == like.sizes(), "fastbert_ext (cuda): ", name, " has shape ", t.sizes(), ", expected ",
              like.sizes());
  kernel_dtype(t.scalar_type(), name);
  return t.to(like.scalar_type()).contiguous();
}

// The parameter dtype of a call: x's when every present parameter has it (no copy), else fp32.
at::ScalarType param_type(const Tensor& x, std::initializer_list<const Tensor*> params) {
  for (const Tensor* p : params) {
    if (p != nullptr && p->scalar_type() != x.scalar_type()) return at::kFloat;
  }
  return x.scalar_type();
}

const Tensor* opt(const OptTensor& t) { return t.has_value() ? &*t : nullptr; }

// A (n,) parameter as a contiguous tensor of dtype tw; undefined when absent (the kernel gets nullptr).
Tensor param(const Tensor* p, int64_t n, const Tensor& x, at::ScalarType tw, const char* name) {
  if (p == nullptr) return Tensor();
  check_device(*p, name, x);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, "fastbert_ext (cuda): ", name, " must have shape (", n, ",), got ",
              p->sizes());
  kernel_dtype(p->scalar_type(), name);
  return p->to(tw).contiguous();
}

const void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mut_ptr(Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

int64_t hidden_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "fastbert_ext (cuda): x must have at least one dimension (the features)");
  TORCH_CHECK(x.size(-1) >= 1 && x.size(-1) <= (int64_t{1} << 30), "fastbert_ext (cuda): the feature dimension must "
              "be in [1, 2^30], got ", x.size(-1));
  return x.size(-1);
}

int64_t rows_of(const Tensor& x) { return x.dim() == 0 ? 1 : x.numel() / x.size(-1); }

Tensor new_stats(const Tensor& x) { return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat)); }

Tensor saved_stats(const Tensor& t, const Tensor& x, const char* name) {
  check_device(t, name, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows_of(x), "fastbert_ext (cuda): ", name,
              " must be the forward's fp32 statistics of shape x.shape[:-1]");
  return t.contiguous();
}

FastbertGelu gelu_kind(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "fastbert_ext (cuda): approximate must be 'none' (exact erf GELU) or 'tanh', got '", approximate, "'");
  return approximate == "tanh" ? FASTBERT_GELU_TANH : FASTBERT_GELU_ERF;
}

// A per-feature gradient in its parameter's dtype; empty (numel 0) when the parameter was None.
Tensor grad_as(const Tensor& g, const Tensor* p, const Tensor& fallback) {
  return p != nullptr ? g.to(p->scalar_type()) : at::empty({0}, fallback.options());
}

// ---------------------------------------------------------------------------------------------------------------
// add_layer_norm

std::tuple<Tensor, Tensor, Tensor> add_layer_norm_fwd(const Tensor& x_in, const OptTensor& residual_in,
                                                      const Tensor& weight, const OptTensor& bias, double eps,
                                                      double dropout_p, const OptTensor& seed) {
  TORCH_CHECK(x_in.is_cuda(), "fastbert_ext (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in);
  const Tensor res = residual_in ? activation(*residual_in, "residual", x) : Tensor();
  const at::ScalarType tw = param_type(x, {&weight, opt(bias)});
  const Tensor w = param(&weight, n, x, tw, "weight"), b = param(opt(bias), n, x, tw, "bias");
  const uint64_t seed_value = dropout_seed(seed, dropout_p);
  Tensor out = at::empty(x.sizes(), x.options()), mean = new_stats(x), rstd = new_stats(x);
  check_launch(fastbert_add_layer_norm_fwd(out.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                           x.data_ptr(), ptr(res), w.data_ptr(), ptr(b), rows_of(x), n,
                                           static_cast<float>(eps), static_cast<float>(dropout_p), seed_value,
                                           kernel_dtype(x.scalar_type(), "x"), kernel_dtype(tw, "weight"),
                                           stream_of(x)),
               "add_layer_norm_fwd");
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_bwd(const Tensor& dout_in, const Tensor& x_in,
                                                              const OptTensor& residual_in, const Tensor& weight,
                                                              const OptTensor& bias, const Tensor& mean_in,
                                                              const Tensor& rstd_in, double dropout_p,
                                                              const OptTensor& seed) {
  TORCH_CHECK(x_in.is_cuda(), "fastbert_ext (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = hidden_of(x_in), rows = rows_of(x_in);
  const Tensor x = activation(x_in, "x", x_in), dout = activation(dout_in, "dout", x);
  const Tensor res = residual_in ? activation(*residual_in, "residual", x) : Tensor();
  const at::ScalarType tw = param_type(x, {&weight, opt(bias)});
  const Tensor w = param(&weight, n, x, tw, "weight");
  const Tensor mean = saved_stats(mean_in, x, "mean"), rstd = saved_stats(rstd_in, x, "rstd");
  const uint64_t seed_value = dropout_seed(seed, dropout_p);
  Tensor dx = at::empty(x.sizes(), x.options());
  // Without dropout the residual's gradient is dx itself: not written twice (the op contract: dresidual empty).
  const bool separate_dresidual = res.defined() && dropout_p > 0.0;
  Tensor dres = separate_dresidual ? at::empty(x.sizes(), x.options()) : Tensor();
  // rows == 0 launches nothing: the parameter gradients are then the empty sums, zeros.
  Tensor dw = at::zeros({n}, x.options().dtype(tw));
  Tensor db = bias ? at::zeros({n}, x.options().dtype(tw)) : Tensor();
  const size_t ws_bytes = fastbert_layer_norm_bwd_workspace_size(rows, n);
  Tensor ws = workspace(ws_bytes, x);
  check_launch(fastbert_add_layer_norm_bwd(dx.data_ptr(), mut_ptr(dres), dw.data_ptr(), mut_ptr(db), dout.data_ptr(),
                                           x.data_ptr(), ptr(res), w.data_ptr(), mean.data_ptr<float>(),
                                           rstd.data_ptr<float>(), rows, n, static_cast<float>(dropout_p), seed_value,
                                           ws.data_ptr(), ws_bytes, kernel_dtype(x.scalar_type(), "x"),
                                           kernel_dtype(tw, "weight"), stream_of(x)),
               "add_layer_norm_bwd");
  // A residual given in another float dtype was converted to x's; its gradient goes back in its own dtype.
  Tensor dresidual = separate_dresidual ? dres.to(residual_in->scalar_type()) : at::empty({0}, x.options());
  return {dx, dresidual, dw.to(weight.scalar_type()), grad_as(db, opt(bias), weight)};
}

// ---------------------------------------------------------------------------------------------------------------
// bias_gelu and bias_gelu_layer_norm

// gelu(x + bias) (dout_in == nullptr) or dout * gelu'(x + bias), into a fresh tensor or, given out, into it (out may
// be x: the kernels are elementwise, each thread reads its elements before writing them; out and x are not
// __restrict__).
Tensor bias_gelu_impl(const Tensor* dout_in, const Tensor& x_in, const OptTensor& bias,
                      c10::string_view approximate, const Tensor* out_in = nullptr) {
  TORCH_CHECK(x_in.is_cuda(), "fastbert_ext (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const FastbertGelu kind = gelu_kind(approximate);
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in);
  const at::ScalarType tw = param_type(x, {opt(bias)});
  const Tensor b = param(opt(bias), n, x, tw, "bias");
  Tensor out = out_in != nullptr ? *out_in : at::empty(x.sizes(), x.options());
  const FastbertDType dt = kernel_dtype(x.scalar_type(), "x"), pt = kernel_dtype(tw, "bias");
  if (dout_in == nullptr) {
    check_launch(fastbert_bias_gelu_fwd(out.data_ptr(), x.data_ptr(), ptr(b), rows_of(x), n, kind, dt, pt,
                                        stream_of(x)),
                 "bias_gelu_fwd");
  } else {
    const Tensor dout = activation(*dout_in, "dout", x);
    check_launch(fastbert_bias_gelu_bwd(out.data_ptr(), dout.data_ptr(), x.data_ptr(), ptr(b), rows_of(x), n, kind,
                                        dt, pt, stream_of(x)),
                 "bias_gelu_bwd");
  }
  return out;
}

Tensor bias_gelu_fwd(const Tensor& x, const OptTensor& bias, c10::string_view approximate) {
  return bias_gelu_impl(nullptr, x, bias, approximate);
}

// In place: x <- gelu(x + bias). x is contiguous, so bias_gelu_impl reads it as it is and writes back into it.
void bias_gelu_fwd_(const Tensor& x, const OptTensor& bias, c10::string_view approximate) {
  TORCH_CHECK(x.is_cuda(), "fastbert_ext (cuda): x must be a CUDA tensor");
  TORCH_CHECK(x.is_contiguous(), "fastbert_ext (cuda): bias_gelu_fwd_ overwrites x in place, so x must be contiguous");
  bias_gelu_impl(nullptr, x, bias, approximate, &x);
}

// dbias, when asked for, is the column sum of dx taken by torch after the kernel (the elementwise CUDA kernel has no
// row reduction); in the bias's dtype, empty (numel 0) otherwise.
std::tuple<Tensor, Tensor> bias_gelu_bwd(const Tensor& dout, const Tensor& x, const OptTensor& bias,
                                         c10::string_view approximate, bool need_dbias) {
  Tensor dx = bias_gelu_impl(&dout, x, bias, approximate);
  if (!(need_dbias && bias.has_value())) return {dx, at::empty({0}, dx.options())};
  const Tensor dbias = at::sum(dx.reshape({-1, dx.size(-1)}), {0}, /*keepdim=*/false, at::kFloat);
  return {dx, dbias.to(bias->scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> bias_gelu_layer_norm_fwd(const Tensor& x_in, const OptTensor& bias,
                                                            const Tensor& weight, const OptTensor& ln_bias,
                                                            double eps, c10::string_view approximate) {
  TORCH_CHECK(x_in.is_cuda(), "fastbert_ext (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const FastbertGelu kind = gelu_kind(approximate);
  const int64_t n = hidden_of(x_in);
  const Tensor x = activation(x_in, "x", x_in);
  const at::ScalarType tw = param_type(x, {opt(bias), &weight, opt(ln_bias)});
  const Tensor b = param(opt(bias), n, x, tw, "bias"), w = param(&weight, n, x, tw, "weight");
  const Tensor lnb = param(opt(ln_bias), n, x, tw, "ln_bias");
  Tensor out = at::empty(x.sizes(), x.options()), mean = new_stats(x), rstd = new_stats(x);
  check_launch(fastbert_bias_gelu_layer_norm_fwd(out.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                                 x.data_ptr(), ptr(b), w.data_ptr(), ptr(lnb), rows_of(x), n,
                                                 static_cast<float>(eps), kind, kernel_dtype(x.scalar_type(), "x"),
                                                 kernel_dtype(tw, "weight"), stream_of(x)),
               "bias_gelu_layer_norm_fwd");
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bias_gelu_layer_norm_bwd(const Tensor& dout_in, const Tensor& x_in,
                                                                    const OptTensor& bias, const Tensor& weight,
                                                                    const OptTensor& ln_bias, const Tensor& mean_in,
                                                                    const Tensor& rstd_in, c10::string_view approximate,
                                                                    bool need_dbias) {
  TORCH_CHECK(x_in.is_cuda(), "fastbert_ext (cuda): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const FastbertGelu kind = gelu_kind(approximate);
  const int64_t n = hidden_of(x_in), rows = rows_of(x_in);
  const Tensor x = activation(x_in, "x", x_in), dout = activation(dout_in, "dout", x);
  const at::ScalarType tw = param_type(x, {opt(bias), &weight, opt(ln_bias)});
  const Tensor b = param(opt(bias), n, x, tw, "bias"), w = param(&weight, n, x, tw, "weight");
  const Tensor mean = saved_stats(mean_in, x, "mean"), rstd = saved_stats(rstd_in, x, "rstd");
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dw = at::zeros({n}, x.options().dtype(tw));
  Tensor dlnb = ln_bias ? at::zeros({n}, x.options().dtype(tw)) : Tensor();
  // The GELU bias's gradient, when asked for, is the kernel's third per-part column sum (beside dweight, dln_bias).
  Tensor db = need_dbias && bias ? at::zeros({n}, x.options().dtype(tw)) : Tensor();
  const size_t ws_bytes = fastbert_layer_norm_bwd_workspace_size(rows, n);
  Tensor ws = workspace(ws_bytes, x);
  check_launch(fastbert_bias_gelu_layer_norm_bwd(dx.data_ptr(), mut_ptr(db), dw.data_ptr(), mut_ptr(dlnb),
                                                 dout.data_ptr(), x.data_ptr(), ptr(b), w.data_ptr(),
                                                 mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n, kind,
                                                 ws.data_ptr(), ws_bytes, kernel_dtype(x.scalar_type(), "x"),
                                                 kernel_dtype(tw, "weight"), stream_of(x)),
               "bias_gelu_layer_norm_bwd");
  return {dx, grad_as(db, db.defined() ? opt(bias) : nullptr, x), dw.to(weight.scalar_type()),
          grad_as(dlnb, opt(ln_bias), weight)};
}

// ---------------------------------------------------------------------------------------------------------------
// softmax

Tensor softmax_fwd(const Tensor& scores_in, const OptTensor& key_padding_mask, double scale) {
  TORCH_CHECK(scores_in.is_cuda(), "fastbert_ext (cuda): scores must be a CUDA tensor");
  TORCH_CHECK(scores_in.dim() == 4, "fastbert_ext (cuda): scores must be (batch, nheads, seqlen_q, seqlen_k), got "
              "shape ", scores_in.sizes());
  TORCH_CHECK(scores_in.size(3) <= (int64_t{1} << 30), "fastbert_ext (cuda): seqlen_k must be <= 2^30");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const Tensor scores = activation(scores_in, "scores", scores_in);
  const int64_t batch = scores.size(0), tk = scores.size(3);
  const Tensor mask = key_padding_mask ? bool_mask(*key_padding_mask, batch, tk, scores) : Tensor();
  Tensor probs = at::empty(scores.sizes(), scores.options());
  check_launch(fastbert_softmax_fwd(probs.data_ptr(), scores.data_ptr(), mask_ptr(mask), tk, batch, scores.size(1),
                                    scores.size(2), tk, static_cast<float>(scale),
                                    kernel_dtype(scores.scalar_type(), "scores"), stream_of(scores)),
               "softmax_fwd");
  return probs;
}

Tensor softmax_bwd(const Tensor& dprobs_in, const Tensor& probs_in, double scale) {
  TORCH_CHECK(probs_in.is_cuda(), "fastbert_ext (cuda): probs must be a CUDA tensor");
  TORCH_CHECK(probs_in.dim() >= 1 && probs_in.size(-1) <= (int64_t{1} << 30),
              "fastbert_ext (cuda): probs must have a last dimension (the keys) of at most 2^30");
  const c10::cuda::CUDAGuard guard(probs_in.device());
  const Tensor probs = activation(probs_in, "probs", probs_in), dprobs = activation(dprobs_in, "dprobs", probs);
  const int64_t tk = probs.size(-1);
  Tensor dscores = at::empty(probs.sizes(), probs.options());
  check_launch(fastbert_softmax_bwd(dscores.data_ptr(), dprobs.data_ptr(), probs.data_ptr(),
                                    tk == 0 ? 0 : probs.numel() / tk, tk, static_cast<float>(scale),
                                    kernel_dtype(probs.scalar_type(), "probs"), stream_of(probs)),
               "softmax_bwd");
  return dscores;
}

}  // namespace

// The attention ops register in their own block, in fastbert_cuda_attention.cpp.
TORCH_LIBRARY_IMPL(fastbert_ext, CUDA, m) {
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
