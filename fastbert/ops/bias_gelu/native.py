"""cpp and cuda backends of bias_gelu and bias_gelu_layer_norm: csrc/cpu/bias_gelu.cpp and csrc/cuda/bias_gelu.cu,
bound to the same ``torch.ops.fastbert_ext`` ops (CPU and CUDA dispatch keys).

Importing this module builds (first use, cached) and loads the cpp extension, registers the shape-only fakes of the
``fastbert_ext`` ops and the ``cpp`` and ``cuda`` implementations of ``bias_gelu_fwd`` / ``_bwd`` and
``bias_gelu_layer_norm_fwd`` / ``_bwd``, with the torch implementations' arguments and outputs (dln_bias empty when
ln_bias is None, dbias empty unless asked for). The cpp backwards sum dbias in the same pass that writes dx; the
cuda binding takes bias_gelu's dbias as torch's column sum of dx (bias_gelu_layer_norm's is the kernel's).
x + bias and gelu(x + bias) stay in fp32 inside the kernels (never rounded to x's dtype). The ``cuda``
implementations run once the CUDA library is loaded (the backend's probe builds it); rows wider than 2^30
fall back to the torch implementations.
"""

from __future__ import annotations

import torch

from fastbert import _ext
from fastbert.ops import _backend
from fastbert.ops._native import rows_unsupported
from fastbert.ops.bias_gelu import (
    _bias_gelu_bwd_fake,
    _bias_gelu_bwd_torch,
    _bias_gelu_fwd_inplace_torch,
    _bias_gelu_fwd_torch,
    _bias_gelu_layer_norm_bwd_fake,
    _bias_gelu_layer_norm_bwd_torch,
    _bias_gelu_layer_norm_fwd_torch,
)

_ext.load("cpp")


@torch.library.register_fake("fastbert_ext::bias_gelu_fwd")
def _(x, bias, approximate):
    return x.new_empty(x.shape)


@torch.library.register_fake("fastbert_ext::bias_gelu_fwd_")
def _(x, bias, approximate):
    return None


@torch.library.register_fake("fastbert_ext::bias_gelu_layer_norm_fwd")
def _(x, bias, weight, ln_bias, eps, approximate):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


torch.library.register_fake("fastbert_ext::bias_gelu_bwd")(_bias_gelu_bwd_fake)
torch.library.register_fake("fastbert_ext::bias_gelu_layer_norm_bwd")(_bias_gelu_layer_norm_bwd_fake)


def _bias_gelu_fwd_cpp(x, bias, approximate):
    return torch.ops.fastbert_ext.bias_gelu_fwd(x, bias, approximate)


def _bias_gelu_fwd_inplace_cpp(x, bias, approximate):
    torch.ops.fastbert_ext.bias_gelu_fwd_(x, bias, approximate)


def _bias_gelu_bwd_cpp(dout, x, bias, approximate, need_dbias):
    return torch.ops.fastbert_ext.bias_gelu_bwd(dout, x, bias, approximate, need_dbias)


def _bias_gelu_layer_norm_fwd_cpp(x, bias, weight, ln_bias, eps, approximate):
    return torch.ops.fastbert_ext.bias_gelu_layer_norm_fwd(x, bias, weight, ln_bias, eps, approximate)


def _bias_gelu_layer_norm_bwd_cpp(dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias):
    args = (dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias)
    return torch.ops.fastbert_ext.bias_gelu_layer_norm_bwd(*args)


_backend.register_impl("bias_gelu_fwd", "cpp", _bias_gelu_fwd_cpp)
_backend.register_impl("bias_gelu_fwd_", "cpp", _bias_gelu_fwd_inplace_cpp)
_backend.register_impl("bias_gelu_bwd", "cpp", _bias_gelu_bwd_cpp)
_backend.register_impl("bias_gelu_layer_norm_fwd", "cpp", _bias_gelu_layer_norm_fwd_cpp)
_backend.register_impl("bias_gelu_layer_norm_bwd", "cpp", _bias_gelu_layer_norm_bwd_cpp)


def _bias_gelu_fwd_cuda(x, bias, approximate):
    if rows_unsupported(x) is not None:
        return _bias_gelu_fwd_torch(x, bias, approximate)
    return torch.ops.fastbert_ext.bias_gelu_fwd(x, bias, approximate)


def _bias_gelu_fwd_inplace_cuda(x, bias, approximate):
    if rows_unsupported(x) is not None:
        return _bias_gelu_fwd_inplace_torch(x, bias, approximate)
    torch.ops.fastbert_ext.bias_gelu_fwd_(x, bias, approximate)


def _bias_gelu_bwd_cuda(dout, x, bias, approximate, need_dbias):
    if rows_unsupported(x) is not None:
        return _bias_gelu_bwd_torch(dout, x, bias, approximate, need_dbias)
    return torch.ops.fastbert_ext.bias_gelu_bwd(dout, x, bias, approximate, need_dbias)


def _bias_gelu_layer_norm_fwd_cuda(x, bias, weight, ln_bias, eps, approximate):
    if rows_unsupported(x) is not None:
        return _bias_gelu_layer_norm_fwd_torch(x, bias, weight, ln_bias, eps, approximate)
    return torch.ops.fastbert_ext.bias_gelu_layer_norm_fwd(x, bias, weight, ln_bias, eps, approximate)


def _bias_gelu_layer_norm_bwd_cuda(dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias):
    args = (dout, x, bias, weight, ln_bias, mean, rstd, approximate, need_dbias)
    if rows_unsupported(x) is not None:
        return _bias_gelu_layer_norm_bwd_torch(*args)
    return torch.ops.fastbert_ext.bias_gelu_layer_norm_bwd(*args)


_backend.register_impl("bias_gelu_fwd", "cuda", _bias_gelu_fwd_cuda)
_backend.register_impl("bias_gelu_fwd_", "cuda", _bias_gelu_fwd_inplace_cuda)
_backend.register_impl("bias_gelu_bwd", "cuda", _bias_gelu_bwd_cuda)
_backend.register_impl("bias_gelu_layer_norm_fwd", "cuda", _bias_gelu_layer_norm_fwd_cuda)
_backend.register_impl("bias_gelu_layer_norm_bwd", "cuda", _bias_gelu_layer_norm_bwd_cuda)
