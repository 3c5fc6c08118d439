"""cpp and cuda backends of softmax: csrc/cpu/softmax.cpp and csrc/cuda/softmax.cu
(``torch.ops.fastbert_ext.softmax_fwd`` / ``softmax_bwd``, CPU and CUDA dispatch keys).

Importing this module builds (first use, cached) and loads the cpp extension, registers the shape-only fakes of the
``fastbert_ext`` ops and the ``cpp`` and ``cuda`` implementations of ``softmax_fwd`` / ``_bwd``: fp32 inside, row
max subtracted, padded keys exactly 0, rows without a real key all zeros; outputs in the scores' dtype. The
``cuda`` ones run once the CUDA library is loaded; rows of more than 2^30 keys fall back to the torch implementation.
"""

from __future__ import annotations

import torch

from fastbert import _ext
from fastbert.ops import _backend
from fastbert.ops._native import rows_unsupported
from fastbert.ops.softmax import _softmax_bwd_torch, _softmax_fwd_torch

_ext.load("cpp")


@torch.library.register_fake("fastbert_ext::softmax_fwd")
def _(scores, key_padding_mask, scale):
    return scores.new_empty(scores.shape)


@torch.library.register_fake("fastbert_ext::softmax_bwd")
def _(dprobs, probs, scale):
    return probs.new_empty(probs.shape)


def _softmax_fwd_cpp(scores, key_padding_mask, scale):
    return torch.ops.fastbert_ext.softmax_fwd(scores, key_padding_mask, scale)


def _softmax_bwd_cpp(dprobs, probs, scale):
    return torch.ops.fastbert_ext.softmax_bwd(dprobs, probs, scale)


_backend.register_impl("softmax_fwd", "cpp", _softmax_fwd_cpp)
_backend.register_impl("softmax_bwd", "cpp", _softmax_bwd_cpp)


def _softmax_fwd_cuda(scores, key_padding_mask, scale):
    if rows_unsupported(scores) is not None:
        return _softmax_fwd_torch(scores, key_padding_mask, scale)
    return torch.ops.fastbert_ext.softmax_fwd(scores, key_padding_mask, scale)


def _softmax_bwd_cuda(dprobs, probs, scale):
    if rows_unsupported(probs) is not None:
        return _softmax_bwd_torch(dprobs, probs, scale)
    return torch.ops.fastbert_ext.softmax_bwd(dprobs, probs, scale)


_backend.register_impl("softmax_fwd", "cuda", _softmax_fwd_cuda)
_backend.register_impl("softmax_bwd", "cuda", _softmax_bwd_cuda)
