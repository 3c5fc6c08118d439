"""Padding-free execution (fastbert.padding): padded batches run on packed tokens, packed inputs run directly.

Checked against transformers at real tokens (1e-5 in fp32), and between fastbert's own paths: the padded layout
(``config.unpad_inputs = False``), the internally unpadded one, and user-packed input (``fastbert.pack``).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import fastbert
from fastbert import modeling, padding

ATOL = 1e-5


@pytest.fixture
def plans(monkeypatch):
    """Records what plan_unpadding decided on each forward (a PackedSequences, or None for the padded path)."""
    seen = []

    def recording(mask, pack=True):
        plan, has_padding = padding.plan_unpadding(mask, pack)
        seen.append(plan)
        return plan, has_padding

    monkeypatch.setattr(modeling, "plan_unpadding", recording)
    return seen


def _ragged_batch(config, lengths, seqlen=None, seed=0):
    seqlen = seqlen or max(lengths)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (len(lengths), seqlen), generator=gen)
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
    token_type_ids = torch.randint(0, config.type_vocab_size, input_ids.shape, generator=gen) * mask
    return {"input_ids": input_ids.masked_fill(mask == 0, 0), "attention_mask": mask, "token_type_ids": token_type_ids}


def _real_close(a, b, mask, what):
    real = mask.bool()
    err = (a[real] - b[real]).abs().max().item()
    assert err <= ATOL, f"{what}: {err:.3g}"


@torch.no_grad()
def test_unpadded_forward_matches_transformers_and_padded_layout(make_config, make_pair, plans):
    config = make_config()
    hf, fb = make_pair("BertModel", config, seed=1)
    batch = _ragged_batch(config, [13, 4, 1, 9, 13])
    out = fb(**batch, output_hidden_states=True)
    plan = plans[-1]
    assert plan is not None and plan.cu_seqlens.tolist() == [0, 13, 17, 18, 27, 40] and plan.max_seqlen == 13
    ref = hf(**batch, output_hidden_states=True)
    mask = batch["attention_mask"]
    _real_close(out.last_hidden_state, ref.last_hidden_state, mask, "last_hidden_state")
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.hidden_states[0], ref.hidden_states[0], rtol=0, atol=ATOL)  # embeddings: whole
    for i, (h, r) in enumerate(zip(out.hidden_states[1:], ref.hidden_states[1:], strict=True)):
        _real_close(h, r, mask, f"hidden_states[{i + 1}]")
        assert h[mask == 0].abs().max() == 0, "padded positions hold 0"
    assert out.last_hidden_state[mask == 0].abs().max() == 0

    fb.config.unpad_inputs = False
    try:
        dense = fb(**batch, output_hidden_states=True)
    finally:
        del fb.config.unpad_inputs
    assert plans[-1] is None, "unpad_inputs=False must not plan a packing"
    torch.testing.assert_close(dense.last_hidden_state, out.last_hidden_state, rtol=0, atol=ATOL)
    torch.testing.assert_close(dense.pooler_output, out.pooler_output, rtol=0, atol=ATOL)


@torch.no_grad()
def test_paths_that_keep_the_padded_layout(make_config, make_pair, plans):
    config = make_config()
    hf, fb = make_pair("BertModel", config, seed=2)
    unpadded = _ragged_batch(config, [7, 7, 7])
    fb(**unpadded)
    assert plans[-1] is None, "no padding: nothing to pack"
    left = _ragged_batch(config, [7, 3, 5])
    left = {k: v.flip(1) for k, v in left.items()}  # left padding: position 0 (read by the pooler) is padding
    out = fb(**left)
    assert plans[-1] is None
    ref = hf(**left)
    _real_close(out.last_hidden_state, ref.last_hidden_state, left["attention_mask"], "left padded")
    # output_attentions needs (B, H, T, T) probabilities: never packed
    fb(**_ragged_batch(config, [7, 3]), output_attentions=True)
    assert plans[-1] is None


def test_mask_without_padding_is_dropped(make_config, make_pair, monkeypatch):
    # An all-ones attention_mask says every key is real: the layers get no mask (no per-layer masking work), with
    # the same outputs as the call without one and as transformers with the mask; left padding keeps its mask.
    config = make_config()
    hf, fb = make_pair("BertModel", config, seed=2)
    masks_seen = []
    attention = modeling.ops.attention

    def recording(q, k, v, key_padding_mask=None, **kwargs):
        masks_seen.append(key_padding_mask)
        return attention(q, k, v, key_padding_mask, **kwargs)

    monkeypatch.setattr(modeling.ops, "attention", recording)
    batch = _ragged_batch(config, [7, 7, 7])
    out = fb(**batch)
    assert masks_seen and all(m is None for m in masks_seen)
    no_mask = fb(**{k: v for k, v in batch.items() if k != "attention_mask"})
    torch.testing.assert_close(out.last_hidden_state, no_mask.last_hidden_state, rtol=0, atol=0)
    _real_close(out.last_hidden_state, hf(**batch).last_hidden_state, batch["attention_mask"], "no padding")
    masks_seen.clear()
    left = {k: v.flip(1) for k, v in _ragged_batch(config, [7, 3, 5]).items()}
    fb(**left)
    assert masks_seen and all(m is not None for m in masks_seen)


@torch.no_grad()
def test_fully_padded_sequence_is_finite_and_zero(make_config, make_pair):
    config = make_config()
    _, fb = make_pair("BertModel", config, seed=3)
    batch = _ragged_batch(config, [6, 0, 4])
    out = fb(**batch)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert out.last_hidden_state[1].abs().max() == 0
    # the pooler of an empty sequence reads a zero [CLS] state on every path
    torch.testing.assert_close(out.pooler_output[1], torch.tanh(fb.pooler.dense.bias), rtol=0, atol=1e-6)
    dense = fb(**batch, output_attentions=True)
    torch.testing.assert_close(dense.pooler_output, out.pooler_output, rtol=0, atol=ATOL)


@torch.no_grad()
def test_packed_input_matches_padded(make_config, make_pair):
    config = make_config()
    hf, fb = make_pair("BertModel", config, seed=4)
    batch = _ragged_batch(config, [5, 11, 1, 8])
    packed = fastbert.pack(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["max_seqlen"] == 11
    out = fb(**packed, output_hidden_states=True)
    ref = hf(**batch)
    real = batch["attention_mask"].bool()
    assert out.last_hidden_state.shape == (int(real.sum()), config.hidden_size)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=ATOL)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    restored = fastbert.unpack(out.last_hidden_state, packed["cu_seqlens"])
    assert restored.shape == (4, 11, config.hidden_size)
    torch.testing.assert_close(restored[real], ref.last_hidden_state[real], rtol=0, atol=ATOL)
    assert restored[~real].abs().max() == 0
    # a list of sequences packs the same way; max_seqlen may be omitted (computed from cu_seqlens)
    lists = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    from_lists = fastbert.pack(lists)
    assert torch.equal(from_lists["input_ids"], packed["input_ids"])
    assert torch.equal(from_lists["cu_seqlens"], packed["cu_seqlens"])
    no_max = fb(input_ids=packed["input_ids"], token_type_ids=packed["token_type_ids"],
                cu_seqlens=packed["cu_seqlens"])
    torch.testing.assert_close(no_max.last_hidden_state, out.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "BertForTokenClassification", "BertForMaskedLM",
                                  "BertForPreTraining", "BertForNextSentencePrediction"])
@torch.no_grad()
def test_heads_take_packed_input(name, make_config, make_pair):
    config = make_config(num_labels=3)
    hf, fb = make_pair(name, config, seed=5)
    batch = _ragged_batch(config, [6, 2, 9])
    real = batch["attention_mask"].bool()
    gen = torch.Generator().manual_seed(0)
    if name in ("BertForTokenClassification", "BertForMaskedLM", "BertForPreTraining"):
        high = config.num_labels if name == "BertForTokenClassification" else config.vocab_size
        labels = torch.randint(0, high, real.shape, generator=gen).masked_fill(~real, -100)
    else:
        labels = torch.tensor([0, 2, 1]) % (2 if name == "BertForNextSentencePrediction" else 3)
    extra = {"next_sentence_label": torch.tensor([0, 1, 1])} if name == "BertForPreTraining" else {}
    ref = hf(**batch, labels=labels, **extra)
    packed = fastbert.pack(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=labels)
    out = fb(**packed, **extra)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=ATOL)
    ref_logits = ref[1]  # logits / prediction_logits
    expected = ref_logits[real] if ref_logits.dim() == 3 else ref_logits
    torch.testing.assert_close(out[1], expected, rtol=0, atol=ATOL)


def test_padded_training_through_packed_path_matches_transformers(make_config, make_pair, plans):
    """Backward through unpad -> packed layers (varlen attention) -> pad, with dropout on in train mode at p=0."""
    config = make_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf, fb = make_pair("BertForTokenClassification", config, seed=6)
    hf.train(), fb.train()
    batch = _ragged_batch(config, [10, 3, 7])
    labels = (torch.arange(30).view(3, 10) % config.num_labels).masked_fill(batch["attention_mask"] == 0, -100)
    for model in (hf, fb):
        model.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
    assert plans[-1] is not None
    hf_params = dict(hf.named_parameters())
    scale = max(p.grad.abs().max().item() for p in hf_params.values())
    for name, p in fb.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def test_sparse_mlm_logits_in_training(make_config, make_pair):
    config = make_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf, fb = make_pair("BertForMaskedLM", config, seed=7)
    batch = _ragged_batch(config, [9, 4])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, ::2] = -100
    n_labelled = int((labels != -100).sum())
    fb.train()
    full = fb(**batch, labels=labels)  # the default: transformers' (batch, seq, vocab) logits
    full.loss.backward()
    full_grads = {n: p.grad.clone() for n, p in fb.named_parameters()}
    fb.zero_grad(set_to_none=True)
    fb.config.sparse_mlm_logits = True  # opt-in: only labelled positions are projected
    try:
        out = fb(**batch, labels=labels)
        out.loss.backward()
        assert out.logits.shape == (n_labelled, config.vocab_size)
        with torch.no_grad():
            fb.eval()
            assert fb(**batch, labels=labels).logits.shape == (2, 9, config.vocab_size)  # eval: transformers' layout
            fb.train()
    finally:
        del fb.config.sparse_mlm_logits
    assert full.logits.shape == (2, 9, config.vocab_size)
    torch.testing.assert_close(out.loss, full.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits, full.logits[labels != -100], rtol=0, atol=1e-5)
    for name, p in fb.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[name], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        hf_loss = hf(**batch, labels=labels).loss
    torch.testing.assert_close(out.loss, hf_loss, rtol=0, atol=ATOL)
    fb.eval()
    with torch.no_grad():
        assert fb(**batch, labels=labels).logits.shape == (2, 9, config.vocab_size)  # eval: transformers' layout


def test_activation_memory_follows_real_tokens(make_config, make_pair):
    """Tensors saved for backward: a batch padded to 4x its real length saves what the unpadded batch saves, plus
    only the (B, T) bookkeeping (mask, indices) and the embeddings, which are computed before unpadding."""
    config = make_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _, fb = make_pair("BertModel", config, seed=8)
    fb.train()

    def saved_bytes(batch):
        total = 0

        def pack_hook(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            fb(**batch).last_hidden_state.sum()
        return total

    tight = _ragged_batch(config, [8, 8, 8, 8])
    padded = _ragged_batch(config, [8, 8, 8, 8], seqlen=32)
    tight_bytes, padded_bytes = saved_bytes(tight), saved_bytes(padded)
    assert padded_bytes < 1.15 * tight_bytes, (tight_bytes, padded_bytes)  # 3x more padding than tokens
    fb.config.unpad_inputs = False
    try:
        dense_bytes = saved_bytes(padded)
    finally:
        del fb.config.unpad_inputs
    assert dense_bytes > 2.5 * tight_bytes, (tight_bytes, dense_bytes)  # the padded layout pays for padding


def test_gradient_checkpointing_on_packed_path(make_config, make_pair):
    config = make_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _, fb = make_pair("BertForSequenceClassification", config, seed=9)
    fb.train()
    batch = _ragged_batch(config, [9, 5, 2])
    labels = torch.tensor([0, 1, 2])

    def grads():
        fb.zero_grad(set_to_none=True)
        fb(**batch, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in fb.named_parameters()}

    plain = grads()
    fb.gradient_checkpointing_enable()
    checkpointed = grads()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(attention_mask=torch.ones(10, dtype=torch.long)), ValueError, "attention_mask"),
        (dict(output_attentions=True), ValueError, "output_attentions"),
        (dict(input_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError, "input_ids"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "cu_seqlens"),
        (dict(max_seqlen=3), ValueError, "max_seqlen"),
        (dict(token_type_ids=torch.zeros(9, dtype=torch.long)), ValueError, "token_type_ids"),
        (dict(cu_seqlens=torch.tensor([0, 10], dtype=torch.int32), max_seqlen=None,
              input_ids=torch.zeros(10, dtype=torch.long), position_ids=None), None, None),
    ],
)
def test_packed_input_errors(kwargs, error, words, make_config, make_pair):
    config = make_config(max_position_embeddings=64)
    _, fb = make_pair("BertModel", config, seed=10)
    inputs = dict(input_ids=torch.ones(10, dtype=torch.long), cu_seqlens=torch.tensor([0, 6, 10], dtype=torch.int32),
                  max_seqlen=6)
    inputs.update(kwargs)
    if error is None:
        assert fb(**inputs).last_hidden_state.shape == (10, config.hidden_size)
        return
    with pytest.raises(error, match=words):
        fb(**inputs)


def test_packed_sequence_longer_than_positions(make_config, make_pair):
    config = make_config(max_position_embeddings=16)
    _, fb = make_pair("BertModel", config, seed=11)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        fb(input_ids=torch.ones(20, dtype=torch.long), cu_seqlens=torch.tensor([0, 20], dtype=torch.int32))


def test_pack_errors():
    with pytest.raises(ValueError, match="attention_mask"):
        fastbert.pack([[1, 2]], attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="token_type_ids"):
        fastbert.pack([[1, 2], [3]], token_type_ids=[[0, 0], [0, 1]])
    with pytest.raises(ValueError, match="attention_mask"):
        fastbert.pack(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4))


def test_transformers_loads_what_packed_training_saved(make_config, make_pair, tmp_path):
    """A model trained on packed input is an ordinary checkpoint."""
    config = make_config()
    _, fb = make_pair("BertForSequenceClassification", config, seed=12)
    fb.train()
    packed = fastbert.pack([[5, 6, 7], [8, 9]], labels=[1, 0])
    opt = torch.optim.SGD(fb.parameters(), lr=0.1)
    fb(**packed).loss.backward()
    opt.step()
    fb.eval().save_pretrained(tmp_path)
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        batch = _ragged_batch(config, [3, 2])
        torch.testing.assert_close(loaded(**batch).logits, fb(**batch).logits, rtol=0, atol=ATOL)
