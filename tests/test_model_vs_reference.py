"""fastbert.BertModel against the float64 NumPy reference (fastbert.reference.BertReference).

The reference is built from the checkpoint's own tensors (read with safetensors, not through either library), and
shares fastbert's documented choice for a sequence with no real token (zero attention output), so such a sequence
is compared too. Elsewhere the comparison is at real-token positions (attention rows of real queries): the hidden
states of padding positions are ill-conditioned in fp32 (transformers itself is ~1e-4 off the reference there).
fp32 must be within 1e-5; bf16 must be within twice transformers-in-bf16's own error against the same reference
(plus a small absolute slack).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

ATOL = 1e-5


def to_np(batch):
    return {k: v.numpy() for k, v in batch.items()}


def ref_forward(reference, batch):
    b = to_np(batch)
    return reference.forward(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))


def max_err(actual, expected, mask=None) -> float:
    """max |actual - expected| over the (B, T) positions where mask is true (attentions: the query rows)."""
    diff = np.abs(actual.detach().double().numpy() - expected)
    if mask is not None:
        if diff.ndim == 4:  # (B, H, Tq, Tk) -> (B, Tq, H, Tk)
            diff = diff.transpose(0, 2, 1, 3)
        diff = diff[mask.bool().numpy()]
    return float(diff.max())


def assert_matches_reference(out, ref, mask=None, atol=ATOL):
    assert out.last_hidden_state.shape == ref["last_hidden_state"].shape
    assert (err := max_err(out.last_hidden_state, ref["last_hidden_state"], mask)) <= atol, f"last_hidden {err:.3g}"
    assert (err := max_err(out.pooler_output, ref["pooler_output"])) <= atol, f"pooler_output {err:.3g}"
    if out.hidden_states is not None:
        assert len(out.hidden_states) == len(ref["hidden_states"])
        for i, (a, b) in enumerate(zip(out.hidden_states, ref["hidden_states"], strict=True)):
            assert (err := max_err(a, b, mask)) <= atol, f"hidden_states[{i}]: {err:.3g}"
    if out.attentions is not None:
        assert len(out.attentions) == len(ref["attentions"])
        for i, (a, b) in enumerate(zip(out.attentions, ref["attentions"], strict=True)):
            assert a.shape == b.shape
            assert (err := max_err(a, b, mask)) <= atol, f"attentions[{i}]: {err:.3g}"


@torch.no_grad()
def test_minilm_matches_reference(fb_minilm, minilm_reference, minilm_batch):
    out = fb_minilm(**minilm_batch, output_hidden_states=True, output_attentions=True)
    assert_matches_reference(out, ref_forward(minilm_reference, minilm_batch), minilm_batch["attention_mask"])


@torch.no_grad()
def test_bert_base_random_matches_reference(bert_base_pair, bert_base_batch):
    hf, fb = bert_base_pair
    from fastbert.reference import BertReference

    reference = BertReference(hf.config, hf.state_dict())
    out = fb(**bert_base_batch, output_hidden_states=True, output_attentions=True)
    assert_matches_reference(out, ref_forward(reference, bert_base_batch), bert_base_batch["attention_mask"])


@torch.no_grad()
def test_fully_padded_sequence_matches_reference(fb_minilm, minilm_reference, minilm_batch):
    batch = {k: torch.cat([v[:2], torch.zeros_like(v[:1]), v[2:]]) for k, v in minilm_batch.items()}
    assert (batch["attention_mask"][2] == 0).all()
    out = fb_minilm(**batch, output_hidden_states=True, output_attentions=True)
    for name, value in out.items():
        values = value if isinstance(value, tuple) else (value,)
        assert all(torch.isfinite(v).all() for v in values), name
    compared = batch["attention_mask"].clone()
    compared[2] = 1  # every position of the empty sequence, plus the real tokens of the others
    assert_matches_reference(out, ref_forward(minilm_reference, batch), compared)
    for probs in out.attentions:
        assert probs[2].abs().max() == 0


@torch.no_grad()
def test_sentence_alone_equals_sentence_in_padded_batch(fb_minilm, tokenizer, sentences, minilm_batch):
    batched = fb_minilm(**minilm_batch)
    lengths = minilm_batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()
    for i, sentence in enumerate(sentences):
        alone = fb_minilm(**tokenizer([sentence], return_tensors="pt"))
        n = int(lengths[i])
        assert alone.last_hidden_state.shape[1] == n
        err = (alone.last_hidden_state[0] - batched.last_hidden_state[i, :n]).abs().max().item()
        assert err <= ATOL, f"sentence {i}: {err:.3g}"
        err = (alone.pooler_output[0] - batched.pooler_output[i]).abs().max().item()
        assert err <= ATOL, f"sentence {i} pooler: {err:.3g}"


@torch.no_grad()
def test_extra_padding_does_not_change_real_positions(fb_minilm, tokenizer, sentences, minilm_batch):
    long = dict(tokenizer(sentences, padding="max_length", max_length=61, return_tensors="pt"))
    short_out = fb_minilm(**minilm_batch)
    long_out = fb_minilm(**long)
    seqlen = minilm_batch["input_ids"].shape[1]
    mask = minilm_batch["attention_mask"].bool()
    err = (long_out.last_hidden_state[:, :seqlen] - short_out.last_hidden_state)[mask].abs().max().item()
    assert err <= ATOL, err
    assert (long_out.pooler_output - short_out.pooler_output).abs().max().item() <= ATOL


@pytest.fixture(scope="module")
def bf16_minilm(hf_minilm, fb_minilm):
    return copy.deepcopy(hf_minilm).to(torch.bfloat16), copy.deepcopy(fb_minilm).to(torch.bfloat16)


@torch.no_grad()
def test_bf16_error_within_twice_transformers(bf16_minilm, minilm_reference, minilm_batch):
    """max|fastbert_bf16 - ref| <= 2 * max|transformers_bf16 - ref| + atol, for every output."""
    hf16, fb16 = bf16_minilm
    atol = 1e-3
    ref = ref_forward(minilm_reference, minilm_batch)
    mask = minilm_batch["attention_mask"]
    hf_out = hf16(**minilm_batch, output_hidden_states=True)
    fb_out = fb16(**minilm_batch, output_hidden_states=True)
    assert fb_out.last_hidden_state.dtype == torch.bfloat16 and fb_out.pooler_output.dtype == torch.bfloat16
    checks = [("last_hidden_state", fb_out.last_hidden_state, hf_out.last_hidden_state, ref["last_hidden_state"], mask),
              ("pooler_output", fb_out.pooler_output, hf_out.pooler_output, ref["pooler_output"], None)]
    triples = zip(fb_out.hidden_states, hf_out.hidden_states, ref["hidden_states"], strict=True)
    checks += [(f"hidden_states[{i}]", a, b, r, mask) for i, (a, b, r) in enumerate(triples)]
    for name, fb_value, hf_value, ref_value, m in checks:
        fb_err, hf_err = max_err(fb_value, ref_value, m), max_err(hf_value, ref_value, m)
        assert fb_err <= 2 * hf_err + atol, f"{name}: fastbert bf16 error {fb_err:.3g}, transformers {hf_err:.3g}"
