"""cpp backend of add_layer_norm: the compiled kernels of csrc/cpu/layer_norm.cpp (``torch.ops.fastbert_ext``).

Importing this module builds (first use, cached) and loads the extension, registers the shape-only fakes of the
``fastbert_ext`` ops and the ``cpp`` implementations of ``add_layer_norm_fwd`` / ``_bwd``. The kernels take the
torch implementations' arguments and give their outputs: out in x's dtype, fp32 mean/rstd of shape x.shape[:-1],
gradients in their inputs' dtypes, empty (numel 0) dresidual / dbias when residual / bias is None.

Dropout is fused too, with the cpp backend's own mask: a counter-based hash of (seed, row, column) that the
backward regenerates (csrc/cpu/dropout.h). It is not torch.Generator's stream, so for the same seed the cpp and
torch backends drop different (identically distributed) elements.
"""

from __future__ import annotations

import torch

from fastbert import _ext
from fastbert.ops import _backend

_ext.load("cpp")


@torch.library.register_fake("fastbert_ext::add_layer_norm_fwd")
def _(x, residual, weight, bias, eps, dropout_p, seed):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


@torch.library.register_fake("fastbert_ext::add_layer_norm_bwd")
def _(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed):
    return (
        x.new_empty(x.shape),
        x.new_empty(0) if residual is None else residual.new_empty(residual.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(0) if bias is None else bias.new_empty(bias.shape),
    )


def _add_layer_norm_fwd_cpp(x, residual, weight, bias, eps, dropout_p, seed):
    return torch.ops.fastbert_ext.add_layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, seed)


def _add_layer_norm_bwd_cpp(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed):
    return torch.ops.fastbert_ext.add_layer_norm_bwd(dout, x, residual, weight, bias, mean, rstd, dropout_p, seed)


_backend.register_impl("add_layer_norm_fwd", "cpp", _add_layer_norm_fwd_cpp)
_backend.register_impl("add_layer_norm_bwd", "cpp", _add_layer_norm_bwd_cpp)
