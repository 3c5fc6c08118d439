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
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from fastbert import ops
from fastbert.padding import (
    PackedSequences,
    check_packed_inputs,
    first_tokens,
    pad,
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


def _workspace_view(workspace: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """A contiguous (rows, width) view of the start of the encoder's flat inference buffer."""
    return workspace[: rows * width].view(rows, width)


def _plain_linear(module, like: torch.Tensor) -> bool:
    """Whether ``module`` is an unhooked nn.Linear with a bias, in ``like``'s dtype and device: one whose output an
    addmm on its weight reproduces. Anything else (a LoRA or quantized wrapper, forward hooks) runs as a module."""
    return (
        type(module) is nn.Linear
        and module.bias is not None
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        and module.weight.dtype == like.dtype
        and module.weight.device == like.device
    )


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
        self._fused_qkv = None  # inference cache: see _qkv

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_fused_qkv": None}  # a cache: pickles and deep copies rebuild it

    def _apply(self, *args, **kwargs):
        self._fused_qkv = None  # .to(), .half(), .cuda() replace the weights: drop the copy made from the old ones
        return super()._apply(*args, **kwargs)

    def _qkv(self, hidden_states, heads_shape, workspace=None):
        """q, k, v (..., H, D). Without autograd, one matmul against the three projections' weights concatenated
        (cached, rebuilt when a weight changes): one (tokens, 3 * C) GEMM instead of three (tokens, C) ones. At
        bert-base 8 x 128 on the 2-core CPU that is 3.2 -> 1.6 ms per layer in bf16 and the same time in fp32. q, k, v
        are strided views of its output, which the attention kernels read as they are. Autograd, compilation and
        non-plain or hooked projections (LoRA, quantized wrappers) take the three modules as they are.
        workspace: the encoder's reused inference buffer (see BertEncoder.forward), at least tokens * 3 * C
        elements; the matmul writes into it instead of a fresh (tokens, 3 * C) tensor."""
        fused = self._fused_weights(hidden_states)
        if fused is None:
            return tuple(proj(hidden_states).view(heads_shape) for proj in (self.query, self.key, self.value))
        weight, bias = fused
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        if workspace is None:
            qkv = torch.addmm(bias, rows, weight.t())
        else:
            qkv = torch.addmm(bias, rows, weight.t(), out=_workspace_view(workspace, rows.shape[0], weight.shape[0]))
        return qkv.view(*heads_shape[:-2], 3, *heads_shape[-2:]).unbind(-3)

    def _fused_weights(self, hidden_states):
        """(weight (3 * C, C), bias (3 * C,)) for the fused no-grad projection, or None where it does not apply."""
        projections = (self.query, self.key, self.value)
        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or not all(_plain_linear(p, hidden_states) for p in projections)
        ):
            return None
        if hidden_states.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A captured graph must read the parameters themselves: a replay after an in-place weight update would
            # otherwise use the stale cached copy, or its memory once the cache is rebuilt and the copy freed.
            return None
        params = [t for p in projections for t in (p.weight, p.bias)]
        key = tuple((t.data_ptr(), t._version) for t in params)
        cache = self._fused_qkv
        if cache is not None and cache[0] == key:
            return cache[1]
        fused = (torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections]))
        # The detached params keep the old storages alive, so no new weight can reuse their addresses in the key.
        self._fused_qkv = (key, fused, [t.detach() for t in params])
        return fused

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, workspace=None):
        """hidden_states: (B, T, C) with attention_mask a (B, T) bool key-padding mask or None, or packed (N, C)
        with attention_mask a PackedSequences. Returns (context shaped like hidden_states, probs or None).
        workspace: see _qkv; q, k and v are dead once the attention has read them, so the buffer is free again."""
        heads_shape = (*hidden_states.shape[:-1], self.num_attention_heads, self.attention_head_size)
        q, k, v = self._qkv(hidden_states, heads_shape, workspace)  # (B, T, H, D): the layout attention kernels read
        dropout_p = self.dropout.p if self.training else 0.0
        if isinstance(attention_mask, PackedSequences):  # (N, H, D) packed tokens: attention within each sequence
            probs = None
            context = ops.varlen_attention(  # offsets checked once per forward (unpad_plan / check_packed_inputs)
                q, k, v, attention_mask.cu_seqlens, attention_mask.max_seqlen, dropout_p=dropout_p,
                scale=self.scaling, check_offsets=False,
            )
        elif output_attentions:
            # The probabilities must be materialized: scores, the masked softmax op, then the weighted sum.
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
            probs = ops.softmax(scores, attention_mask, self.scaling)
            context = torch.einsum("bhqk,bkhd->bqhd", self.dropout(probs), v)
        else:
            probs = None
            context = ops.attention(q, k, v, attention_mask, dropout_p=dropout_p, scale=self.scaling)
        return context.reshape(hidden_states.shape[:-1] + (self.all_head_size,)), probs


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

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, workspace=None):
        context, probs = self.self(hidden_states, attention_mask, output_attentions, workspace)
        return self.output(context, hidden_states), probs


class BertIntermediate(nn.Module):
    """dense + fused GELU; other activations run unfused."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_size = config.intermediate_size
        self.approximate = gelu_approximation(config.hidden_act)
        self.intermediate_act_fn = _activation(config.hidden_act)

    def forward(self, hidden_states, workspace=None):
        """workspace: without autograd, an optional (..., intermediate_size) buffer that the encoder reuses across
        layers for this output (see BertEncoder.forward); returned filled."""
        if self.approximate is None:
            return self.intermediate_act_fn(self.dense(hidden_states))
        # The bias rides in the matmul (addmm), which measured faster than a bias-free mm + fused bias-GELU on CPU
        # and costs the same on GPU; ops.bias_gelu then applies GELU alone. Without autograd the GELU overwrites the
        # matmul's output, a dead temporary, and the matmul writes into the encoder's reused workspace: no fresh
        # (tokens, intermediate_size) buffers per layer (bert-base 8 x 128 on CPU: ~10% of the forward, mostly page
        # faults of fresh 12 MB buffers).
        # A LoRA or quantized wrapper, forward hooks or another dtype run through dense(...) as usual.
        if workspace is not None and _plain_linear(self.dense, workspace):
            torch.addmm(
                self.dense.bias, hidden_states.reshape(-1, hidden_states.shape[-1]), self.dense.weight.t(),
                out=workspace.view(-1, workspace.shape[-1]),
            )
            return ops.bias_gelu_(workspace, None, self.approximate)
        hidden = self.dense(hidden_states)
        if torch.is_grad_enabled() and hidden.requires_grad:
            return ops.bias_gelu(hidden, None, self.approximate)
        return ops.bias_gelu_(hidden, None, self.approximate)


class BertOutput(BertSelfOutput):
    def __init__(self, config):
        super().__init__(config, in_features=config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, workspace=None):
        """attention_mask: a (B, T) bool key-padding mask or None, or PackedSequences for packed (N, C) input.
        workspace: without autograd, the encoder's flat inference buffer (see BertEncoder.forward), used in turn by
        the fused query/key/value projection and by the FFN's up-projection."""
        attention_output, probs = self.attention(hidden_states, attention_mask, output_attentions, workspace)
        ffn_workspace = None
        if workspace is not None:
            width = self.intermediate.intermediate_size
            tokens = attention_output.numel() // attention_output.shape[-1]
            ffn_workspace = _workspace_view(workspace, tokens, width).view(*attention_output.shape[:-1], width)
        layer_output = self.output(self.intermediate(attention_output, ffn_workspace), attention_output)
        return layer_output, probs


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=False, output_attentions=False):
        """hidden_states (B, T, C) with a (B, T) bool key-padding mask or None, or packed (N, C) tokens with a
        PackedSequences. Returns (last hidden state, hidden states tuple or None, attentions tuple or None)."""
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        # Without autograd every layer's fused query/key/value projection and FFN up-projection go into one buffer,
        # reused: the projection's output is dead once attention has read it, the up-projection's once the
        # down-projection has. Fresh buffers of that size would be page-faulted in on every layer on CPU (bert-base
        # 8 x 128 bf16: 0.8 ms per layer for the projection's). With autograd each layer keeps its own for the backward.
        workspace = None
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.config.intermediate_size > 0:
            tokens = hidden_states.numel() // hidden_states.shape[-1]
            width = max(self.config.intermediate_size, 3 * self.config.hidden_size)
            workspace = hidden_states.new_empty(tokens * width)
        for layer in self.layer:
            if self.gradient_checkpointing and self.training:
                checkpoint = getattr(self, "_gradient_checkpointing_func", None) or torch.utils.checkpoint.checkpoint
                hidden_states, probs = checkpoint(layer.__call__, hidden_states, attention_mask, output_attentions)
            else:
                hidden_states, probs = layer(hidden_states, attention_mask, output_attentions, workspace)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
            if output_attentions:
                all_attentions = all_attentions + (probs,)
        return hidden_states, all_hidden, all_attentions


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states, cu_seqlens=None):
        """The [CLS] token: position 0 of (B, T, C), or each sequence's first token of packed (N, C)."""
        first = hidden_states[:, 0] if cu_seqlens is None else first_tokens(hidden_states, cu_seqlens)
        return self.activation(self.dense(first))


class BertPreTrainedModel(PreTrainedModel):
    """Base class: transformers' checkpoint machinery (from_pretrained, save_pretrained, Trainer, pipeline)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    # fastbert runs its own attention whatever attn_implementation says; accepting "sdpa" keeps user code working.
    _supports_sdpa = True
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
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
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
    ):
        """Same arguments and outputs as ``transformers.BertModel.forward`` for the encoder.

        input_ids: (B, T) token ids, or inputs_embeds: (B, T, C); attention_mask: (B, T), 1 = real token.
        Returns ``BaseModelOutputWithPoolingAndCrossAttentions`` (or its tuple with ``return_dict=False``).

        Padding-free: when attention_mask has padding, the layers run on the real tokens only (see
        :mod:`fastbert.padding`). Padded positions of ``last_hidden_state`` and of the layers' ``hidden_states``
        hold 0 on every path (transformers fills them with attention over the real tokens, values no loss should
        read); ``hidden_states[0]``, the embeddings, is kept whole. ``config.unpad_inputs = False`` keeps the padded
        layout throughout (as do ``output_attentions=True`` and torch.compile). A sequence with no real token gives
        finite outputs.

        Packed input (batching by token count): input_ids (N,) or inputs_embeds (N, C) holding the sequences back
        to back, ``cu_seqlens`` (B + 1,) int32 offsets and optionally ``max_seqlen``, no attention_mask
        (:func:`fastbert.pack` builds them). position_ids default to 0.. within each sequence; outputs are packed,
        last_hidden_state (N, C), and pooler_output (B, C) reads each sequence's first token.
        """
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
            input_shape, device, key_padding_mask = check_model_inputs(
                config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                embeddings_weight=self.embeddings.word_embeddings.weight,
            )
            embedding_output = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, C)
            plan = None
            if key_padding_mask is not None and not output_attentions and self._unpad_inputs():
                plan, has_padding = plan_unpadding(key_padding_mask)  # plan: None when packing does not apply
                if not has_padding:  # every key is real: the layers need no mask (nor the output its zeroing)
                    key_padding_mask = None
            if plan is None:
                sequence_output, hidden_states, attentions = self.encoder(
                    embedding_output, key_padding_mask, output_hidden_states, output_attentions
                )
                if key_padding_mask is not None:  # padded positions hold 0 whichever path ran (see the docstring)
                    keep = key_padding_mask[..., None]
                    sequence_output = sequence_output.masked_fill(~keep, 0.0)
                    if hidden_states is not None:
                        hidden_states = hidden_states[:1] + tuple(h.masked_fill(~keep, 0.0) for h in hidden_states[1:])
            else:
                sequence_output, hidden_states, attentions = self.encoder(
                    unpad(embedding_output, plan), plan, output_hidden_states, False
                )
                sequence_output = pad(sequence_output, plan)
                if hidden_states is not None:  # the embeddings are computed padded: keep them as they are
                    hidden_states = (embedding_output,) + tuple(pad(h, plan) for h in hidden_states[1:])
            pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
            cross_attentions=() if output_attentions else None,  # transformers' layout: empty for an encoder
        )
        return output if return_dict else output.to_tuple()

    def _unpad_inputs(self) -> bool:
        # Packing has data-dependent shapes: a compiled graph or a CUDA-graph capture keeps the padded layout.
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return False
        return bool(getattr(self.config, "unpad_inputs", True))
