"""Argument checks at the model's public boundary: every bad input gets a Python exception that names the argument
and the fix, before any kernel runs."""

from __future__ import annotations

import torch


def key_padding_mask_from(attention_mask, input_shape, device):
    """transformers' (B, T) 1/0 attention_mask as a (B, T) bool mask (True = real token), or None for no padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
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
        raise ValueError(f"attention_mask is on {attention_mask.device} but the input is on {device}")
    return attention_mask != 0


def check_ids(name, ids, input_shape=None):
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer torch.Tensor (e.g. torch.long), got {getattr(ids, 'dtype', ids)}")
    if input_shape is not None and tuple(ids.shape) != tuple(input_shape):
        raise ValueError(f"{name} has shape {tuple(ids.shape)} but the input is {tuple(input_shape)}; they must match")


def check_model_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
    """Validate ``BertModel.forward``'s padded-batch inputs.

    Returns (input_shape (B, T), device, key_padding_mask (B, T) bool or None).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        check_ids("input_ids", input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        input_shape, device = tuple(input_ids.shape), input_ids.device
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, seq_len, hidden_size={config.hidden_size}), got "
                f"{tuple(inputs_embeds.shape)}"
            )
        input_shape, device = tuple(inputs_embeds.shape[:2]), inputs_embeds.device
    if input_shape[1] > config.max_position_embeddings and position_ids is None:
        raise ValueError(
            f"sequence length {input_shape[1]} exceeds max_position_embeddings={config.max_position_embeddings}; "
            "truncate the input (tokenizer(..., truncation=True))"
        )
    check_ids("token_type_ids", token_type_ids, input_shape)
    check_ids("position_ids", position_ids)
    return input_shape, device, key_padding_mask_from(attention_mask, input_shape, device)
