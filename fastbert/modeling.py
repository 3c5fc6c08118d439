"""BERT encoder modules, drop-in compatible with ``transformers``' BERT: same module tree and parameter names (so
checkpoints load with no remapping), same forward arguments and output types.

The hot path calls only :mod:`fastbert.ops`: fused attention on the projections' (B, T, H, D) layout,
residual-add + dropout + LayerNorm, bias + GELU, and the head's bias + GELU + LayerNorm. Matmuls stay
``torch.nn.functional.linear`` (cuBLAS / oneDNN are already at the roofline for them).

Task heads live in :mod:`fastbert.modeling_heads`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
from transformers.utils import logging

from fastbert import ops
from fastbert.ops._utils import autocast_dtype
from fastbert.padding import (
    PackedSequences,
    SegmentIds,
    check_packed_inputs,
    first_tokens,
    pad,
    plan_segments,
    plan_unpadding,
    positions_in_sequence,
    unpad,
)
from fastbert.validation import check_model_inputs

# hidden_act values that map onto fastbert's fused GELU; anything else runs the activation from transformers.
_GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def gelu_approximation(hidden_act) -> str | None:
    """'none' / 'tanh' when ``hidden_act`` is a GELU fastbert fuses, else None."""
    return _GELU_APPROXIMATION.get(hidden_act) if isinstance(hidden_act, str) else None


def _activation(hidden_act):
    return ACT2FN[hidden_act] if isinstance(hidden_act, str) else hidden_act


def _check_config(config) -> None:
    # Sizes are checked here, at construction: a zero intermediate_size would otherwise build a layer that only fails
    # at the first forward, with a shape error far from the cause.
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
                 "type_vocab_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
    if isinstance(config.num_hidden_layers, bool) or not isinstance(config.num_hidden_layers, int) or \
            config.num_hidden_layers < 0:
        raise ValueError(f"config.num_hidden_layers must be an integer >= 0, got {config.num_hidden_layers!r}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"config.{name} must be a probability in [0, 1], got {value!r}")
    if config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
            f"({config.num_attention_heads})"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(
            "fastbert implements the bidirectional BERT encoder; set is_decoder=False and add_cross_attention=False "
            "(use transformers.BertLMHeadModel for a causal decoder)"
        )
    position_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise ValueError(f"position_embedding_type={position_type!r} is not supported; fastbert supports 'absolute'")


class BertEmbeddings(nn.Module):
    """word + position + token type embeddings, LayerNorm, dropout."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        """Padded (B, T) ids / (B, T, C) embeddings, or packed (N,) / (N, C) ones with their position_ids."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, T, C) or packed (N, C)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None, :]
        if token_type_ids is None:
            embeddings = inputs_embeds + self.token_type_embeddings.weight[0]
        else:
            embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        embeddings = ops.layer_norm(embeddings, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)
        return self.dropout(embeddings)


class InferenceContext:
    """The no-grad fast paths of one forward, decided once by :meth:`BertEncoder.inference_context` and passed down.

    With a context the layers may (1) run the query/key/value projections as one matmul over their weights' shared
    buffer, (2) write that matmul and the FFN's up-projection into ``workspace``, one flat buffer reused by every layer
    (each output is dead once the next matmul has read it), and (3) apply GELU in place. None of this is visible to
    user code: a context exists only when nothing can observe the intermediate tensors (no autograd, no module hooks,
    no compilation or tracing, no autocast), so hooks and ``hidden_states`` only ever receive tensors nothing writes
    to afterwards.
    """

    __slots__ = ("workspace",)

    def __init__(self, workspace: torch.Tensor):
        self.workspace = workspace  # flat, tokens * max(intermediate_size, 3 * hidden_size) elements

    def view(self, rows: int, width: int) -> torch.Tensor:
        """A contiguous (rows, width) view of the start of the workspace."""
        return self.workspace[: rows * width].view(rows, width)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook (global, or on ``module`` or any of its submodules) could see intermediate tensors."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    stack = [module]  # a walk over _modules: a third of the cost of module.modules() (~200 modules in bert-base)
    while stack:
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        stack.extend(child for child in m._modules.values() if child is not None)
    return False


def _plain_linear(module, like: torch.Tensor) -> bool:
    """Whether ``module`` is an nn.Linear with a bias, in ``like``'s dtype and device: one whose output an addmm on its
    weight reproduces. Anything else (a LoRA or quantized wrapper) runs as a module."""
    return (
        type(module) is nn.Linear
        and module.bias is not None
        and module.weight.dtype == like.dtype
        and module.weight.device == like.device
    )


def _back_to_back(tensors) -> bool:
    """Whether equally shaped contiguous ``tensors`` lie one after another in the first one's storage, so that one
    strided view over that storage reads all of them (their live values: no copy is involved)."""
    first = tensors[0]
    if first.device.type == "meta" or not first.is_contiguous():
        return False
    step = first.numel() * first.element_size()
    for i, t in enumerate(tensors):
        if t.dtype != first.dtype or t.shape != first.shape or not t.is_contiguous():
            return False
        if t.data_ptr() != first.data_ptr() + i * step:
            return False
    storage = first.untyped_storage()
    return storage.nbytes() - first.storage_offset() * first.element_size() >= len(tensors) * step


def _stacked(tensors) -> torch.Tensor:
    """(len(tensors) * rows, ...) view over back-to-back ``tensors`` (see :func:`_back_to_back`)."""
    first = tensors[0]
    shape = (len(tensors) * first.shape[0], *first.shape[1:])
    return first.as_strided(shape, first.stride(), first.storage_offset())


def _repack_after_load(module, incompatible_keys) -> None:
    module.pack_qkv_()


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.pack_qkv_()
        # load_state_dict(assign=True) and from_hf put fresh tensors behind the parameters: lay them out again.
        self.register_load_state_dict_post_hook(_repack_after_load)

    @torch.no_grad()
    def pack_qkv_(self) -> bool:
        """Lay the query, key and value weights (and biases) out back to back in one buffer each, the parameters
        becoming views of it (same Parameter objects, same values), so that inference can run the three projections
        as one (tokens, 3 * C) matmul that reads the live parameters. Called after construction, ``.to()`` and
        loading; a no-op when already laid out. Returns whether the layout holds (projections that are not plain
        nn.Linear layers with biases, or that share tensors, are left as they are and run one by one)."""
        projections = (self.query, self.key, self.value)
        if not all(type(p) is nn.Linear and p.bias is not None for p in projections):
            return False
        for name in ("weight", "bias"):
            params = [getattr(p, name) for p in projections]
            if _back_to_back(params):
                continue
            if len({id(t) for t in params}) < 3 or len({(t.dtype, t.device, t.shape) for t in params}) != 1:
                return False
            if any(type(t) is not nn.Parameter for t in params):  # DTensor and other subclasses keep their layout
                return False
            rows = params[0].shape[0]
            buffer = params[0].new_empty((3 * rows, *params[0].shape[1:]))
            for i, t in enumerate(params):
                part = buffer[i * rows : (i + 1) * rows]
                part.copy_(t)
                t.data = part  # the Parameter object stays: optimizers and user references keep working
        return True

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        self.pack_qkv_()  # .to(), .half(), .cuda() convert each parameter on its own
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self.pack_qkv_()  # copy.deepcopy and unpickling copy each parameter on its own

    def _qkv(self, hidden_states, heads_shape, context):
        """q, k, v (..., H, D). With an inference context and the three weights laid out back to back (see
        :meth:`pack_qkv_`), one matmul over a view of their shared buffer, written into the context's workspace; q,
        k and v are strided views of its output, which the attention kernels read as they are. Otherwise the three
        modules run as they are (autograd, LoRA or quantized wrappers, weights assigned separately)."""
        projections = (self.query, self.key, self.value)
        if context is not None and all(_plain_linear(p, hidden_states) for p in projections):
            weights = [p.weight for p in projections]
            biases = [p.bias for p in projections]
            if _back_to_back(weights) and _back_to_back(biases):
                rows = hidden_states.reshape(-1, hidden_states.shape[-1])
                out = context.view(rows.shape[0], 3 * self.all_head_size)
                qkv = torch.addmm(_stacked(biases), rows, _stacked(weights).t(), out=out)
                return qkv.view(*heads_shape[:-2], 3, *heads_shape[-2:]).unbind(-3)
        return tuple(proj(hidden_states).view(heads_shape) for proj in projections)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, context=None):
        """hidden_states: (B, T, C) with attention_mask a (B, T) bool key-padding mask, a SegmentIds or None, or
        packed (N, C) with attention_mask a PackedSequences. Returns (context shaped like hidden_states, probs or
        None). context: the forward's InferenceContext or None; q, k and v are dead once attention has read them, so
        its workspace is free again afterwards."""
        heads_shape = (*hidden_states.shape[:-1], self.num_attention_heads, self.attention_head_size)
        q, k, v = self._qkv(hidden_states, heads_shape, context)  # (B, T, H, D): the layout attention kernels read
        dropout_p = self.dropout.p if self.training else 0.0
        probs = None
        if isinstance(attention_mask, PackedSequences):  # (N, H, D) packed tokens: attention within each sequence
            out = ops.varlen_attention(  # offsets checked once per forward (plan_unpadding / check_packed_inputs)
                q, k, v, attention_mask.cu_seqlens, attention_mask.max_seqlen, dropout_p=dropout_p,
                scale=self.scaling, check_offsets=False,
            )
        elif isinstance(attention_mask, SegmentIds):  # sequences packed in rows, where shapes must stay static
            out, probs = attention_mask.attend(q, k, v, self.scaling, self.dropout, output_attentions)
        elif output_attentions:
            # The probabilities must be materialized: scores, the masked softmax op, then the weighted sum. Under
            # autocast a padding mask promotes the scores to the hidden states' dtype, as the additive mask does in
            # transformers' eager attention.
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
            if attention_mask is not None:
                scores = scores.to(torch.promote_types(scores.dtype, hidden_states.dtype))
            probs = ops.softmax(scores, attention_mask, self.scaling)
            out = torch.einsum("bhqk,bkhd->bqhd", self.dropout(probs), v)
        else:
            out = ops.attention(q, k, v, attention_mask, dropout_p=dropout_p, scale=self.scaling)
        return out.reshape(hidden_states.shape[:-1] + (self.all_head_size,)), probs


class BertSelfOutput(nn.Module):
    """dense, then LayerNorm(dropout(.) + residual) in one fused op."""

    def __init__(self, config, in_features=None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        dropout_p = self.dropout.p if self.training else 0.0
        return ops.add_layer_norm(
            self.dense(hidden_states), input_tensor, self.LayerNorm.weight, self.LayerNorm.bias,
            self.LayerNorm.eps, dropout_p=dropout_p,
        )


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, context=None):
        attention, probs = self.self(hidden_states, attention_mask, output_attentions, context)
        return self.output(attention, hidden_states), probs


class BertIntermediate(nn.Module):
    """dense + fused GELU; other activations run unfused."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_size = config.intermediate_size
        self.approximate = gelu_approximation(config.hidden_act)
        self.intermediate_act_fn = _activation(config.hidden_act)

    def forward(self, hidden_states, context=None):
        """context: the forward's InferenceContext or None. With one, the up-projection writes into its workspace
        and GELU runs in place there (the returned tensor is that workspace view, read only by BertOutput)."""
        if self.approximate is None:
            return self.intermediate_act_fn(self.dense(hidden_states))
        # The bias rides in the matmul (addmm), which measured faster than a bias-free mm + fused bias-GELU on CPU
        # and costs the same on GPU; ops.bias_gelu then applies GELU alone. With an inference context there are no
        # fresh (tokens, intermediate_size) buffers per layer, which on CPU are mostly page faults.
        if context is None:
            return ops.bias_gelu(self.dense(hidden_states), None, self.approximate)
        if _plain_linear(self.dense, hidden_states):
            rows = hidden_states.reshape(-1, hidden_states.shape[-1])
            hidden = torch.addmm(
                self.dense.bias, rows, self.dense.weight.t(), out=context.view(rows.shape[0], self.intermediate_size)
            ).view(*hidden_states.shape[:-1], self.intermediate_size)
        else:
            hidden = self.dense(hidden_states)  # a LoRA or quantized wrapper: its output is a temporary all the same
        return ops.bias_gelu_(hidden, None, self.approximate)


class BertOutput(BertSelfOutput):
    def __init__(self, config):
        super().__init__(config, in_features=config.intermediate_size)


class BertLayer(GradientCheckpointingLayer):
    """One post-LN encoder layer. A transformers GradientCheckpointingLayer: ``gradient_checkpointing_enable()``
    checkpoints its forward (module hooks stay outside the recomputation)."""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, context=None):
        """attention_mask: a (B, T) bool key-padding mask, SegmentIds or None, or PackedSequences for packed (N, C)
        input. context: the forward's InferenceContext or None."""
        attention_output, probs = self.attention(hidden_states, attention_mask, output_attentions, context)
        layer_output = self.output(self.intermediate(attention_output, context), attention_output)
        return layer_output, probs


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def inference_context(self, hidden_states) -> InferenceContext | None:
        """The forward's InferenceContext, or None where the fast paths must not run: autograd (each layer keeps its
        own activations for the backward), compilation or tracing (static graphs), autocast (the fused matmuls would
        skip autocast's casts) and module hooks (which must see tensors that are never overwritten)."""
        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or autocast_dtype(hidden_states) is not None
            or _hooked(self)
        ):
            return None
        tokens = hidden_states.numel() // hidden_states.shape[-1]
        width = max(self.config.intermediate_size, 3 * self.config.hidden_size)
        return InferenceContext(hidden_states.new_empty(tokens * width))

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=False, output_attentions=False):
        """hidden_states (B, T, C) with a (B, T) bool key-padding mask, SegmentIds or None, or packed (N, C) tokens
        with a PackedSequences. output_hidden_states: a bool, or the set of hidden-state indices to keep (0 = the
        embeddings). Returns (last hidden state, hidden states tuple or None, attentions tuple or None); unselected
        hidden states are None."""
        keep = _hidden_state_selection(output_hidden_states, len(self.layer))
        all_hidden = None if keep is None else (hidden_states if 0 in keep else None,)
        all_attentions = () if output_attentions else None
        context = self.inference_context(hidden_states)
        for i, layer in enumerate(self.layer):
            hidden_states, probs = layer(hidden_states, attention_mask, output_attentions, context)
            if keep is not None:
                all_hidden = all_hidden + (hidden_states if i + 1 in keep else None,)
            if output_attentions:
                all_attentions = all_attentions + (probs,)
        return hidden_states, all_hidden, all_attentions


def _hidden_state_selection(output_hidden_states, num_layers: int) -> frozenset | None:
    """None for no hidden states, else the indices (0 .. num_layers) to keep: all of them for True, else the int or
    list of ints (negative ones count from the end, out-of-range ones select nothing), as transformers reads it."""
    if output_hidden_states is None or output_hidden_states is False:
        return None
    count = num_layers + 1
    if output_hidden_states is True:
        return frozenset(range(count))
    selected = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in selected):
        raise TypeError(f"output_hidden_states must be a bool, an int or a list of ints, got {output_hidden_states!r}")
    return frozenset(i % count for i in selected if -count <= i < count)


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states, cu_seqlens=None):
        """The [CLS] token: position 0 of (B, T, C), or each sequence's first token of packed (N, C)."""
        first = hidden_states[:, 0] if cu_seqlens is None else first_tokens(hidden_states, cu_seqlens)
        return self.activation(self.dense(first))


_attn_implementation_logged = False


def _log_attn_implementation_once(name) -> None:
    global _attn_implementation_logged
    if not _attn_implementation_logged:
        _attn_implementation_logged = True
        logging.get_logger("fastbert").info(
            f"attn_implementation={name!r}: fastbert runs its own fused attention kernels for every attention "
            "implementation; the setting is recorded in config._attn_implementation and changes nothing else"
        )


class BertPreTrainedModel(PreTrainedModel):
    """Base class: transformers' checkpoint machinery (from_pretrained, save_pretrained, Trainer, pipeline)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    # fastbert runs its own attention kernels whatever attn_implementation says (see
    # _check_and_adjust_attn_implementation); the flags let transformers accept every name it accepts for BERT.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Older checkpoints store the position_ids buffer; fastbert builds positions on the fly.
    _keys_to_ignore_on_load_unexpected = [r"embeddings\.position_ids"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader (safetensors, or pytorch_model.bin through ``torch.load(weights_only=True)``).

        ``weights_only=False`` is refused: a pickled checkpoint could run arbitrary code when loaded. A
        pytorch_model.bin that holds anything but tensors and containers is refused before any of it runs.
        """
        import pickle  # here, not at the top: loading is this method's business only

        if kwargs.get("weights_only", True) is not True:
            raise ValueError(
                "fastbert loads checkpoints only from safetensors or with torch.load(weights_only=True); drop "
                "weights_only=False (convert an old pickle once, in a trusted environment, with save_pretrained)"
            )
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            # torch's own message suggests weights_only=False; fastbert never does that, so say what to do instead.
            detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0].split(". Please")[0]
            raise pickle.UnpicklingError(
                f"fastbert refused to load the checkpoint in {pretrained_model_name_or_path}: its pytorch_model.bin "
                f"is a pickle holding more than tensors ({detail}), and unpickling it could run arbitrary code. "
                "fastbert reads safetensors, or pytorch_model.bin through torch.load(weights_only=True) only. If you "
                "trust the file, convert it once in a separate, trusted environment (load it with transformers and "
                "weights_only=False, then save_pretrained writes model.safetensors)."
            ) from exc
        # The loader may have put fresh tensors behind the parameters: lay the query/key/value weights out again.
        for module in (model[0] if isinstance(model, tuple) else model).modules():
            if isinstance(module, BertSelfAttention):
                module.pack_qkv_()
        return model

    # Names transformers accepts for attn_implementation; fastbert takes any of them and runs its own kernels.
    _ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        """fastbert runs its own attention kernels for every attn_implementation transformers accepts for BERT: the
        request is recorded in ``config._attn_implementation`` (and said once in the log), nothing else changes."""
        requested = "sdpa" if attn_implementation is None else attn_implementation
        if isinstance(requested, str) and requested.startswith("paged|"):
            requested = requested[len("paged|"):]
        if requested not in self._ATTN_IMPLEMENTATIONS:
            try:
                from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

                registered = requested in ALL_ATTENTION_FUNCTIONS.valid_keys()
            except (ImportError, AttributeError):
                registered = False
            if not registered:
                raise ValueError(
                    f"attn_implementation={attn_implementation!r} is not an attention implementation transformers "
                    f"accepts for BERT; use one of {', '.join(self._ATTN_IMPLEMENTATIONS)} (fastbert runs its own "
                    "kernels for all of them)"
                )
        if attn_implementation is not None and requested != "sdpa":
            _log_attn_implementation_once(attn_implementation)
        return attn_implementation if attn_implementation is not None else "sdpa"

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' generic init covers Linear, Embedding (padding row zeroed) and LayerNorm, and skips
        # parameters that were loaded from a checkpoint.
        super()._init_weights(module)
        if hasattr(module, "decoder") and isinstance(getattr(module, "bias", None), nn.Parameter):
            nn.init.zeros_(module.bias)  # the MLM head's output bias


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, ``num_hidden_layers`` post-LN layers, optional pooler."""

    _no_split_modules = ["BertEmbeddings", "BertLayer"]

    def __init__(self, config, add_pooling_layer=True):
        _check_config(config)
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cu_seqlens=None,
        max_seqlen=None,
        **kwargs,
    ):
        """Same arguments and outputs as ``transformers.BertModel.forward`` for the encoder.

        input_ids: (B, T) token ids, or inputs_embeds: (B, T, C); attention_mask: (B, T), 1 = real token.
        output_hidden_states: True, or the index (or list of indices) of the hidden states to return, as in
        transformers (the others are None). Returns ``BaseModelOutputWithPoolingAndCrossAttentions`` (or its tuple
        with ``return_dict=False``).

        Padding-free: when attention_mask has right padding, the layers run on the real tokens only (see
        :mod:`fastbert.padding`), so modules inside the encoder (and their hooks) see packed (tokens, C) tensors;
        ``config.unpad_inputs = False`` keeps the padded layout throughout (as do left padding, ``output_attentions``,
        torch.compile and torch.jit.trace). Padded positions of ``last_hidden_state`` and of the layers'
        ``hidden_states`` hold 0 on every path (transformers fills them with attention over the real tokens, values no
        loss should read); ``hidden_states[0]``, the embeddings, is kept whole, and ``pooler_output`` reads position 0
        as computed, as transformers does (with left padding it is a padded position). A sequence with no real token
        gives finite outputs.

        Rows of sequences packed back to back (no attention_mask, ``position_ids`` restarting where a sequence starts,
        as ``transformers.DataCollatorWithFlattening`` builds them) attend within each sequence, as in transformers.

        Packed input (batching by token count): input_ids (N,) or inputs_embeds (N, C) holding the sequences back
        to back, ``cu_seqlens`` (B + 1,) int32 offsets and optionally ``max_seqlen``, no attention_mask
        (:func:`fastbert.pack` builds them). position_ids default to 0.. within each sequence; outputs are packed,
        last_hidden_state (N, C), and pooler_output (B, C) reads each sequence's first token.
        """
        _check_extra_kwargs(kwargs)
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict

        if cu_seqlens is not None:
            input_ids, token_type_ids, position_ids, packing = check_packed_inputs(
                config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_attentions,
                cu_seqlens, max_seqlen,
            )
            if position_ids is None:
                source = input_ids if input_ids is not None else inputs_embeds
                position_ids = positions_in_sequence(packing.cu_seqlens, source.shape[0])
            embedding_output = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (N, C)
            sequence_output, hidden_states, attentions = self.encoder(
                embedding_output, packing, output_hidden_states, False
            )
            pooled_output = self.pooler(sequence_output, packing.cu_seqlens) if self.pooler is not None else None
        else:
            (batch, seqlen), _, key_padding_mask = check_model_inputs(
                config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                embeddings_weight=self.embeddings.word_embeddings.weight,
            )
            embedding_output = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, C)
            layout = self._plan_layout(key_padding_mask, position_ids, batch, output_attentions)
            if isinstance(layout, PackedSequences):  # padding removed, or rows of sequences flattened
                if layout.indices is None:
                    tokens = embedding_output.reshape(batch * seqlen, -1)

                    def restore(h):
                        return h.view(batch, seqlen, -1)
                else:
                    tokens = unpad(embedding_output, layout)

                    def restore(h):
                        return pad(h, layout)

                sequence_output, hidden_states, attentions = self.encoder(tokens, layout, output_hidden_states, False)
                sequence_output = raw_output = restore(sequence_output)  # position 0 is real in every row
                if hidden_states is not None:  # the embeddings are computed padded: keep them as they are
                    hidden_states = (hidden_states[0] if hidden_states[0] is None else embedding_output,) + tuple(
                        None if h is None else restore(h) for h in hidden_states[1:]
                    )
            else:  # the padded layout, with a (B, T) key-padding mask, SegmentIds or no mask at all
                raw_output, hidden_states, attentions = self.encoder(
                    embedding_output, layout, output_hidden_states, output_attentions
                )
                sequence_output = raw_output
                if isinstance(layout, torch.Tensor):  # padded positions hold 0 whichever path ran (see above)
                    keep = layout[..., None]
                    sequence_output = raw_output.masked_fill(~keep, 0.0)
                    # a sequence without a real token pools a zero state, as on the packed path
                    raw_output = raw_output.masked_fill(~layout.any(dim=1)[:, None, None], 0.0)
                    if hidden_states is not None:
                        hidden_states = hidden_states[:1] + tuple(
                            None if h is None else h.masked_fill(~keep, 0.0) for h in hidden_states[1:]
                        )
            # transformers' pooler reads position 0 as computed, padding or not (left padding puts padding there).
            pooled_output = self.pooler(raw_output) if self.pooler is not None else None
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
            cross_attentions=() if output_attentions else None,  # transformers' layout: empty for an encoder
        )
        return output if return_dict else output.to_tuple()

    def _plan_layout(self, key_padding_mask, position_ids, batch: int, output_attentions: bool):
        """How the encoder runs a padded-layout batch: a PackedSequences (padding removed, or rows of sequences
        flattened), a (B, T) key-padding mask, SegmentIds, or None (every token attends to its whole row).

        Packing has data-dependent shapes, read back with a host sync: a compiled graph, a trace or a CUDA-graph
        capture keeps the padded layout and the mask as given, and rows of sequences become SegmentIds there.
        """
        static = (
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
        )
        unpad_inputs = bool(getattr(self.config, "unpad_inputs", True))
        if key_padding_mask is None:
            if position_ids is None or position_ids.dim() != 2:
                return None
            if static:  # transformers too builds its packed-sequence mask unconditionally while tracing
                return SegmentIds.from_positions(position_ids, batch)
            plan = plan_segments(position_ids, batch)
            if plan is None:
                return None
            return plan if unpad_inputs and not output_attentions else SegmentIds.from_positions(position_ids, batch)
        if static:
            return key_padding_mask
        # plan: None when packing does not apply (left padding) or is not wanted
        plan, has_padding = plan_unpadding(key_padding_mask, pack=unpad_inputs and not output_attentions)
        if not has_padding:  # every key is real: the layers need no mask (nor the output its zeroing)
            return None
        return key_padding_mask if plan is None else plan


# Keyword arguments transformers' BERT forwards accept and fastbert has no use for: loss bookkeeping the BERT heads
# ignore (Trainer passes num_items_in_batch), flash-attention packing kwargs (fastbert reads packing from
# position_ids, as transformers' sdpa path does), and the decoder cache arguments, which must stay unset.
_IGNORED_KWARGS = frozenset(
    {"num_items_in_batch", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
)
_UNSET_KWARGS = frozenset(
    {"encoder_hidden_states", "encoder_attention_mask", "past_key_values", "cache", "use_cache", "cache_position"}
)


def _check_extra_kwargs(kwargs) -> None:
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS:
            continue
        if name in _UNSET_KWARGS:
            if value is None or value is False:
                continue
            raise ValueError(
                f"{name} is for BERT as a decoder or with cross-attention, which fastbert does not implement; drop it "
                "(use transformers.BertLMHeadModel for a decoder)"
            )
        raise TypeError(f"BertModel.forward() got an unexpected keyword argument {name!r}")
