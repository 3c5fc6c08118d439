"""fastbert's functional op API: each hot op is a ``torch.library`` custom op in the ``fastbert`` namespace.

Every op has a shape-only fake (``torch.compile(fullgraph=True)`` traces through it) and registered autograd whose
backward is itself a custom op, so each backend (torch, triton, cuda, cpp; see :mod:`fastbert.ops._backend`)
plugs in forward and backward kernels without touching the modeling code.
"""

from fastbert.ops._backend import (
    BackendUnavailableError,
    backends,
    deterministic,
    resolved_backend,
    set_backend,
    set_deterministic,
)
from fastbert.ops.attention import attention
from fastbert.ops.bias_gelu import bias_gelu, bias_gelu_, bias_gelu_layer_norm
from fastbert.ops.layer_norm import add_layer_norm, layer_norm
from fastbert.ops.softmax import softmax
from fastbert.ops.varlen_attention import varlen_attention

__all__ = [
    "BackendUnavailableError",
    "add_layer_norm",
    "attention",
    "backends",
    "bias_gelu",
    "bias_gelu_",
    "bias_gelu_layer_norm",
    "deterministic",
    "layer_norm",
    "resolved_backend",
    "set_backend",
    "set_deterministic",
    "softmax",
    "varlen_attention",
]
