"""Padding-free execution: move a padded batch onto packed tokens (``cu_seqlens``) and back.

A padded batch (B, T) with an attention mask holds N <= B*T real tokens. The model removes the padding once,
right after the embeddings, runs every layer on the (N, C) packed tokens (token-wise ops do not care about the
layout; attention runs over ``cu_seqlens``), and restores (B, T, C) only at the output, with zeros at padded
positions. Positions and token types are looked up before packing, so they are the padded batch's own.

    indices:    (N,) flat positions (b * T + t) of the real tokens, in row-major order
    cu_seqlens: (B + 1,) int32 offsets of each sequence in the packed tokens, [0, n0, n0 + n1, ..., N]
    max_seqlen: the longest sequence, a Python int (it sizes the attention kernels' grids)

Users who batch by token count can skip padding altogether: :func:`pack` builds ``input_ids`` (N,) +
``cu_seqlens`` + ``max_seqlen`` that ``BertModel(...)`` and the token-level heads take directly.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedSequences:
    """Where each sequence of a packed batch lives: tokens ``cu_seqlens[i]:cu_seqlens[i + 1]`` are sequence i.

    ``indices``, ``batch`` and ``seqlen`` are set when the packing came from a padded (batch, seqlen) layout
    (see :func:`unpad_plan`), so that :func:`pad` can restore it.
    """

    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int
    indices: torch.Tensor | None = None  # (N,) int64 into the flattened (B * T) padded layout
    batch: int = 0
    seqlen: int = 0


def unpad_plan(key_padding_mask: torch.Tensor) -> PackedSequences | None:
    """How to pack a (B, T) bool mask's real tokens, or None when packing would not pay or would change results.

    None when there is no padding, or when a non-empty sequence does not start with a real token (the pooler reads
    position 0, which on the packed path holds no computed state). One host sync on a GPU: the lengths and the
    kept-token indices are data dependent.
    """
    return plan_unpadding(key_padding_mask)[0]


def plan_unpadding(key_padding_mask: torch.Tensor, pack: bool = True) -> tuple[PackedSequences | None, bool]:
    """(:func:`unpad_plan`'s answer, whether the mask has any padding at all), from the same single host sync: a
    mask without padding can be dropped (every key is real), which spares each layer its masking work. With
    ``pack=False`` only the second answer is wanted (the plan is None)."""
    batch, seqlen = key_padding_mask.shape
    if batch == 0 or seqlen == 0:
        return None, False
    lengths = key_padding_mask.sum(dim=1, dtype=torch.int32)  # (B,)
    starts_real = key_padding_mask[:, 0] | (lengths == 0)
    summary = torch.stack([lengths.sum(), lengths.max(), (~starts_real).sum().to(torch.int32)]).tolist()
    total, longest, bad_starts = summary
    if total == batch * seqlen:
        return None, False
    if bad_starts or not pack:
        return None, True
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=key_padding_mask.device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    indices = key_padding_mask.reshape(-1).nonzero().squeeze(1)
    return PackedSequences(cu_seqlens, int(longest), indices, batch, seqlen), True


def sequence_starts(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, T) bool: where a new sequence starts in rows of sequences packed back to back, read from their
    ``position_ids`` (B, T) or (1, T) as transformers reads them: wherever a position is not the previous one plus 1
    (``DataCollatorWithFlattening``'s 0, 1, 2, 0, 1, ...), and at each row's first token."""
    positions = position_ids.expand(batch, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    return starts


def plan_segments(position_ids: torch.Tensor, batch: int) -> PackedSequences | None:
    """The packing of rows that hold several sequences (see :func:`sequence_starts`), over the flattened (B * T)
    tokens, or None when every row is one sequence. Host syncs on a GPU: the sequence count and lengths are data
    dependent."""
    starts = sequence_starts(position_ids, batch).reshape(-1)
    offsets = starts.nonzero().squeeze(1)
    if offsets.shape[0] == batch:
        return None
    total = starts.shape[0]
    cu_seqlens = torch.cat([offsets, offsets.new_full((1,), total)]).to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSequences(cu_seqlens, longest)


@dataclass(frozen=True)
class SegmentIds:
    """Rows of sequences packed back to back, in the padded (B, T) layout: ``ids`` (B, T) numbers the sequences
    within each row, and a token attends to the tokens of its own sequence only. The static-shape path (torch.compile,
    torch.jit.trace, ``output_attentions=True``) for what eager inference runs as :func:`plan_segments` packing."""

    ids: torch.Tensor  # (B, T) int64

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor, batch: int) -> SegmentIds:
        return cls(sequence_starts(position_ids, batch).cumsum(dim=1))

    def attend(self, q, k, v, scale: float, dropout: torch.nn.Module, output_attentions: bool):
        """softmax(q k^T * scale) v within each sequence, q, k, v (B, T, H, D) -> ((B, T, H, D), probs (B, H, T, T)
        or None). Plain torch ops (every token sees at least itself, so no row is empty)."""
        same = (self.ids[:, :, None] == self.ids[:, None, :])[:, None]  # (B, 1, T, T)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if not output_attentions:
            p = dropout.p if dropout.training else 0.0
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=same, dropout_p=p, scale=scale)
            return out.transpose(1, 2), None
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~same, float("-inf")), dim=-1)
        return torch.matmul(dropout(probs), v).transpose(1, 2), probs


def unpad(x: torch.Tensor, plan: PackedSequences) -> torch.Tensor:
    """(B, T, ...) -> (N, ...): the real tokens, packed."""
    return x.reshape(plan.batch * plan.seqlen, *x.shape[2:]).index_select(0, plan.indices)


def pad(x: torch.Tensor, plan: PackedSequences) -> torch.Tensor:
    """(N, ...) -> (B, T, ...): the packed tokens back in place, zeros at padded positions."""
    out = x.new_zeros((plan.batch * plan.seqlen, *x.shape[1:]))
    out = out.index_put((plan.indices,), x)  # out of place, so autograd routes the gradient back to x
    return out.reshape(plan.batch, plan.seqlen, *x.shape[1:])


def first_tokens(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(N, C) packed tokens -> (B, C): each sequence's first token ([CLS]); zeros for an empty sequence."""
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])  # row N is the zero row empty sequences read
    return padded.index_select(0, torch.where(ends > starts, starts, torch.full_like(starts, x.shape[0])))


def positions_in_sequence(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(N,) int64 position of each packed token within its sequence (0, 1, ..., len - 1 per sequence)."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    offsets = torch.repeat_interleave(starts, lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - offsets


def check_packed_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                        output_attentions, cu_seqlens, max_seqlen):
    """Validate ``BertModel.forward``'s packed inputs; returns (input_ids, token_type_ids, position_ids, packing)."""
    from fastbert.ops.varlen_attention import check_cu_seqlens

    if attention_mask is not None:
        raise ValueError(
            "packed input (cu_seqlens given) has no padding: drop attention_mask, or pass padded (batch, seq_len) "
            "input_ids with attention_mask and no cu_seqlens"
        )
    if output_attentions:
        raise ValueError("output_attentions=True needs the padded layout: pass padded input_ids + attention_mask")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer torch.Tensor, got {getattr(input_ids, 'dtype', input_ids)}")
        if input_ids.dim() != 1:
            raise ValueError(
                f"with cu_seqlens, input_ids must be the packed (total_tokens,) ids, got shape {tuple(input_ids.shape)}"
                " (fastbert.pack(input_ids, attention_mask) builds packed inputs from a padded batch)"
            )
        total, device = input_ids.shape[0], input_ids.device
    else:
        if inputs_embeds.dim() != 2 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"with cu_seqlens, inputs_embeds must be (total_tokens, hidden_size={config.hidden_size}), got "
                f"{tuple(inputs_embeds.shape)}"
            )
        total, device = inputs_embeds.shape[0], inputs_embeds.device
    for name, ids in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if ids is None:
            continue
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer torch.Tensor, got {getattr(ids, 'dtype', ids)}")
        if tuple(ids.shape) != (total,):
            raise ValueError(f"{name} has shape {tuple(ids.shape)}; packed input needs ({total},), one per token")
        if ids.device != device:
            raise ValueError(f"{name} is on {ids.device} but the input is on {device}")
    cu_seqlens, max_seqlen = check_cu_seqlens(cu_seqlens, total, max_seqlen, device, allow_empty=False)
    from fastbert.validation import check_embedding_ids

    check_embedding_ids(config, input_ids, token_type_ids, position_ids)
    if position_ids is None and max_seqlen > config.max_position_embeddings:
        raise ValueError(
            f"max_seqlen={max_seqlen} exceeds max_position_embeddings={config.max_position_embeddings}: a packed "
            "sequence is longer than the position table (truncate it), or max_seqlen is larger than the longest "
            "sequence in cu_seqlens (pass that length, or max_seqlen=None to compute it)"
        )
    return input_ids, token_type_ids, position_ids, PackedSequences(cu_seqlens, max_seqlen)


def pack(input_ids, attention_mask=None, token_type_ids=None, labels=None) -> dict:
    """Packed model inputs from a padded batch or from a list of token-id sequences.

    input_ids: (B, T) tensor with ``attention_mask`` (B, T) (1 = real token), or a list of B lists of ids.
    token_type_ids: same layout as input_ids, or None. labels: (B,) per-sequence labels are kept as they are,
    (B, T) per-token labels (or a list of lists) are packed like the ids.
    Returns a dict for ``model(**batch)``: input_ids (N,), cu_seqlens (B + 1,) int32, max_seqlen, and the packed
    token_type_ids / labels when given. :func:`unpack` brings per-token outputs back to (B, max_seqlen, ...).
    Every sequence needs at least one token (its [CLS]), as on the padded path: an empty list, or a padded row with
    no real token, is refused (drop it from the batch).
    """
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is only for padded tensors; a list of sequences has no padding")
        lengths = [len(seq) for seq in input_ids]
        flat = _integer_ids(input_ids, "input_ids")

        def flatten(values, name):
            if [len(v) for v in values] != lengths:
                raise ValueError(f"{name} must have one entry per token of input_ids (same lengths per sequence)")
            return _integer_ids(values, name)

        device = flat.device
    else:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq_len) tensor or a list of token-id lists")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; it must match input_ids' "
                             f"{tuple(input_ids.shape)}")
        lengths = mask.sum(dim=1).tolist()
        flat = input_ids[mask]

        def flatten(values, name):
            if not isinstance(values, torch.Tensor) or values.shape != input_ids.shape:
                raise ValueError(f"{name} must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
            return values[mask]

        device = input_ids.device
    if 0 in lengths:
        raise ValueError(f"input_ids: sequence {lengths.index(0)} has no token; every packed sequence needs at least "
                         "its [CLS] token (as on the padded path): drop the empty sequences from the batch")
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    batch = {"input_ids": flat, "cu_seqlens": cu_seqlens.to(device), "max_seqlen": max(lengths, default=0)}
    if token_type_ids is not None:
        batch["token_type_ids"] = flatten(token_type_ids, "token_type_ids")
    if labels is not None:
        per_token = isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], (list, tuple))
        per_token = per_token or (isinstance(labels, torch.Tensor) and labels.dim() == 2)
        batch["labels"] = flatten(labels, "labels") if per_token else torch.as_tensor(labels)
    return batch


def _integer_ids(sequences, name: str) -> torch.Tensor:
    """A list of B lists (or 1-D tensors) of integer ids -> (N,) int64, with an error that names the first
    non-integer (a string is a token, not an id; a float id would be silently truncated by torch.tensor)."""
    flat = []
    for i, seq in enumerate(sequences):
        if isinstance(seq, torch.Tensor):
            if seq.is_floating_point() or seq.is_complex() or seq.dim() != 1:
                raise TypeError(f"{name}[{i}] is a {seq.dtype} tensor of shape {tuple(seq.shape)}; pack takes 1-D "
                                "integer token ids")
            seq = seq.tolist()
        elif isinstance(seq, (str, bytes, dict)) or not hasattr(seq, "__len__"):
            raise TypeError(f"{name}[{i}] is a {type(seq).__name__}; pack takes a list of sequences of integer token "
                            "ids")
        for j, token in enumerate(seq):
            if isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise TypeError(f"{name}[{i}][{j}] is {token!r} ({type(token).__name__}); token ids must be integers: "
                                "tokenize the text first, e.g. tokenizer(texts)['input_ids']")
        flat.extend(seq)
    return torch.tensor(flat, dtype=torch.long)


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, seqlen: int | None = None) -> torch.Tensor:
    """(N, ...) packed per-token values -> (B, seqlen, ...), zeros past each sequence's end.

    seqlen defaults to the longest sequence. cu_seqlens must be the offsets x was packed with (checked: a host
    sync on a GPU).
    """
    from fastbert.ops.varlen_attention import check_cu_seqlens

    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a (total_tokens, ...) tensor of packed values, got {getattr(x, 'shape', x)!r}")
    try:
        cu_seqlens, longest = check_cu_seqlens(cu_seqlens, x.shape[0], None, x.device)
    except ValueError as exc:
        raise ValueError(f"unpack: x has {x.shape[0]} packed tokens, which cu_seqlens does not describe: {exc}") \
            from None
    if seqlen is None:
        seqlen = longest
    elif isinstance(seqlen, bool) or not isinstance(seqlen, numbers.Integral) or seqlen < longest:
        raise ValueError(f"unpack: seqlen={seqlen!r} must be an int >= the longest sequence in cu_seqlens ({longest})")
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    mask = torch.arange(seqlen, device=x.device)[None, :] < lengths[:, None]  # (B, seqlen)
    out = x.new_zeros((lengths.shape[0] * seqlen, *x.shape[1:]))
    out = out.index_put((mask.reshape(-1).nonzero().squeeze(1),), x)
    return out.reshape(lengths.shape[0], seqlen, *x.shape[1:])
