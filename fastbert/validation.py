"""Argument checks at the model's public boundary: every bad input gets a Python exception that names the argument
and the fix, before any kernel runs (never an IndexError from deep inside an embedding, a device-side assert or a
crash).

Two kinds of checks:

- metadata (type, rank, shape, dtype, device): free, always on;
- values (token, token type and position ids within their embedding tables): one reduction per tensor and, on a
  GPU, one device-to-host copy per forward (a sync). On by default everywhere; latency-critical serving with
  trusted inputs can switch them off with ``fastbert.set_input_checks(False)`` or ``FASTBERT_CHECK_INPUTS=0``.
  They are skipped while ``torch.compile`` traces (a data-dependent check would break the graph) and while a CUDA
  graph is being captured (a device-to-host copy is illegal there; ``fastbert.cuda_graphs`` checks eagerly first).

Empty inputs: a batch of 0 sequences is valid and gives empty outputs (transformers raises a reshape error there);
sequences of length 0 are refused on both layouts (BERT needs at least the [CLS] token: the pooler reads it): padded
input of shape (batch, 0), packed input whose cu_seqlens holds a zero-length sequence, and ``fastbert.pack`` of an
empty sequence. A fully padded row of a padded batch (attention_mask all 0) is padding, not a sequence: it is
accepted, as in transformers, and gives zero hidden states.
"""

from __future__ import annotations

import os

import torch

_ENV_VAR = "FASTBERT_CHECK_INPUTS"
_FALSE_VALUES = ("0", "false", "no", "off")
_ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding accepts
_EMBED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_override: bool | None = None


def set_input_checks(enabled: bool | None) -> None:
    """Switch the data-dependent input checks (id ranges, cu_seqlens) on or off for this process.

    ``None`` goes back to ``$FASTBERT_CHECK_INPUTS`` (default on). Switching them off saves a GPU sync per forward;
    an out-of-range id then fails inside the embedding (on CUDA: a device-side assert), so do it only for inputs
    that come from the model's own tokenizer.
    """
    global _override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_input_checks takes True, False or None, got {enabled!r}")
    _override = enabled


def input_checks_enabled() -> bool:
    """Whether the data-dependent input checks run: :func:`set_input_checks`, else ``$FASTBERT_CHECK_INPUTS``."""
    if _override is not None:
        return _override
    return os.environ.get(_ENV_VAR, "1").strip().lower() not in _FALSE_VALUES


def key_padding_mask_from(attention_mask, input_shape, device):
    """transformers' (B, T) 1/0 attention_mask as a (B, T) bool mask (True = real token), or None for no padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask has dtype {attention_mask.dtype}; pass 1/0 as bool, int or float")
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be (batch, seq_len) with 1 for real tokens and 0 for padding; got shape "
            f"{tuple(attention_mask.shape)}. fastbert supports key-padding masks, not 3-D/4-D attention masks."
        )
    if tuple(attention_mask.shape) != tuple(input_shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the input is {tuple(input_shape)}; "
            "they must match"
        )
    if attention_mask.device != device:
        raise ValueError(
            f"attention_mask is on {attention_mask.device} but the input is on {device}; move it with .to({device})"
        )
    return attention_mask != 0


def check_ids(name, ids, input_shape=None, device=None):
    """ids: an int32/int64 tensor; of ``input_shape`` and on ``device`` when given."""
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor (e.g. torch.long), got {type(ids).__name__}")
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} has dtype {ids.dtype}; token indices must be torch.long or torch.int32 "
                        f"(use {name}.long())")
    if input_shape is not None and tuple(ids.shape) != tuple(input_shape):
        raise ValueError(f"{name} has shape {tuple(ids.shape)} but the input is {tuple(input_shape)}; they must match")
    if device is not None and ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the input is on {device}; move it with .to({device})")


def _check_position_ids_shape(position_ids, input_shape) -> None:
    # transformers broadcasts position_ids against (batch, seq_len): (seq_len,), (1, seq_len), (batch, seq_len).
    shape = tuple(position_ids.shape)
    try:
        ok = position_ids.dim() <= 2 and tuple(torch.broadcast_shapes(shape, input_shape)) == tuple(input_shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"position_ids has shape {shape}; it must broadcast to the input's (batch, seq_len) = {tuple(input_shape)}:"
            f" pass (seq_len,), (1, seq_len) or (batch, seq_len)"
        )


def check_id_ranges(checks) -> None:
    """Raise a ValueError when ids fall outside their embedding table. ``checks``: (name, ids or None, size, what).

    All minima and maxima come back to the host in one copy: one GPU sync per forward, not one per tensor. Skipped
    when the checks are switched off (:func:`set_input_checks`), while torch.compile or torch.jit.trace traces
    (a check would be recorded as a constant) and during CUDA graph capture.
    """
    checks = [(name, ids, size, what) for name, ids, size, what in checks if ids is not None and ids.numel() > 0]
    if not checks or not input_checks_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if _capturing(checks[0][1]):
        return
    bounds = torch.stack([torch.stack(torch.aminmax(ids)).to(torch.int64) for _, ids, _, _ in checks]).tolist()
    for (name, _, size, what), (low, high) in zip(checks, bounds, strict=True):
        if low < 0 or high >= size:
            raise ValueError(
                f"{name} holds values in [{low}, {high}] but must be in [0, {size}): {what}. (These checks cost a GPU "
                "sync; fastbert.set_input_checks(False) turns them off for trusted inputs.)"
            )


def check_embedding_ids(config, input_ids, token_type_ids, position_ids) -> None:
    """Token, token type and position ids (any of them None) within the embedding tables of ``config``: padded
    (B, T) or packed (N,) layouts alike."""
    check_id_ranges([
        ("input_ids", input_ids, config.vocab_size,
         f"config.vocab_size is {config.vocab_size}; use the model's own tokenizer (or model.resize_token_embeddings)"),
        ("token_type_ids", token_type_ids, config.type_vocab_size,
         f"config.type_vocab_size is {config.type_vocab_size}; segment ids must be below it"),
        ("position_ids", position_ids, config.max_position_embeddings,
         f"config.max_position_embeddings is {config.max_position_embeddings}; truncate the input or renumber"),
    ])


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_inputs_embeds(inputs_embeds, config, embeddings_weight) -> None:
    if not isinstance(inputs_embeds, torch.Tensor):
        raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(
            f"inputs_embeds must be (batch, seq_len, hidden_size={config.hidden_size}), got "
            f"{tuple(inputs_embeds.shape)}"
        )
    if inputs_embeds.dtype not in _EMBED_DTYPES:
        raise TypeError(
            f"inputs_embeds has dtype {inputs_embeds.dtype}; use the model's dtype (float32, float16 or bfloat16), "
            "e.g. inputs_embeds.to(model.dtype)"
        )
    if embeddings_weight is not None and inputs_embeds.device == embeddings_weight.device:  # else: a device error
        model_dtype = embeddings_weight.dtype
        # Narrower embeddings into a float32 model are promoted, as in transformers; anything else would either fail
        # in the first matmul with a dtype error or silently run the model in another precision.
        promoted = model_dtype == torch.float32 and inputs_embeds.dtype in (torch.float16, torch.bfloat16)
        autocast = torch.is_autocast_enabled(inputs_embeds.device.type)
        if inputs_embeds.dtype != model_dtype and not promoted and not autocast:
            raise TypeError(
                f"inputs_embeds has dtype {inputs_embeds.dtype} but the model's parameters are {model_dtype}; "
                f"pass inputs_embeds.to({model_dtype})"
            )


def check_model_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, *,
                       embeddings_weight=None):
    """Validate ``BertModel.forward``'s padded-batch inputs.

    embeddings_weight: the model's word-embedding matrix (optional); with it, the inputs' device and inputs_embeds'
    dtype are checked against the model's.
    Returns (input_shape (B, T), device, key_padding_mask (B, T) bool or None).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        name = "input_ids"
        check_ids(name, input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        input_shape, device = tuple(input_ids.shape), input_ids.device
    else:
        name = "inputs_embeds"
        _check_inputs_embeds(inputs_embeds, config, embeddings_weight)
        input_shape, device = tuple(inputs_embeds.shape[:2]), inputs_embeds.device
    if embeddings_weight is not None and device != embeddings_weight.device:
        raise ValueError(
            f"{name} is on {device} but the model is on {embeddings_weight.device}; move the inputs with "
            f".to({embeddings_weight.device}) (or the model with model.to({device}))"
        )
    if input_shape[1] == 0:
        raise ValueError(
            f"{name} has shape {tuple(input_shape)}: sequences of length 0; every sequence needs at least the [CLS] "
            "token (a batch of 0 sequences is fine)"
        )
    if input_shape[1] > config.max_position_embeddings and position_ids is None:
        raise ValueError(
            f"sequence length {input_shape[1]} exceeds max_position_embeddings={config.max_position_embeddings}; "
            "truncate the input (tokenizer(..., truncation=True))"
        )
    check_ids("token_type_ids", token_type_ids, input_shape, device)
    check_ids("position_ids", position_ids, device=device)
    if position_ids is not None:
        _check_position_ids_shape(position_ids, input_shape)
    key_padding_mask = key_padding_mask_from(attention_mask, input_shape, device)
    check_embedding_ids(config, input_ids, token_type_ids, position_ids)
    return input_shape, device, key_padding_mask
