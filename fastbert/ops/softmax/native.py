"""cpp backend of softmax: csrc/cpu/softmax.cpp (``torch.ops.fastbert_ext.softmax_fwd`` / ``softmax_bwd``).

Importing this module builds (first use, cached) and loads the extension, registers the shape-only fakes of the
``fastbert_ext`` ops and the ``cpp`` implementations of ``softmax_fwd`` / ``_bwd``: fp32 inside, row max
subtracted, padded keys exactly 0, rows without a real key all zeros; outputs in the scores' dtype.
"""

from __future__ import annotations

import torch

from fastbert import _ext
from fastbert.ops import _backend

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
