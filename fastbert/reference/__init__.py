"""Float64 NumPy ground truth: every op's forward and backward, and the whole BERT model from a state dict.

Pure NumPy (this package never imports torch itself), used by the tests to judge every backend.
"""

from fastbert.ops.attention.reference import attention_bwd_ref, attention_fwd_ref, attention_probs_ref
from fastbert.ops.bias_gelu.reference import (
    bias_gelu_bwd_ref,
    bias_gelu_fwd_ref,
    bias_gelu_layer_norm_bwd_ref,
    bias_gelu_layer_norm_fwd_ref,
    gelu_grad_ref,
    gelu_ref,
)
from fastbert.ops.layer_norm.reference import layer_norm_bwd_ref, layer_norm_fwd_ref
from fastbert.ops.softmax.reference import softmax_bwd_ref, softmax_fwd_ref
from fastbert.reference.model import BertReference, cross_entropy_ref, state_dict_to_numpy

__all__ = [
    "BertReference",
    "attention_bwd_ref",
    "attention_fwd_ref",
    "attention_probs_ref",
    "bias_gelu_bwd_ref",
    "bias_gelu_fwd_ref",
    "bias_gelu_layer_norm_bwd_ref",
    "bias_gelu_layer_norm_fwd_ref",
    "cross_entropy_ref",
    "gelu_grad_ref",
    "gelu_ref",
    "layer_norm_bwd_ref",
    "layer_norm_fwd_ref",
    "softmax_bwd_ref",
    "softmax_fwd_ref",
    "state_dict_to_numpy",
]
