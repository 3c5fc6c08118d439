"""fastbert.BertModel against transformers.BertModel (eager attention) with the same weights, in fp32.

The bar is 1e-5 absolute at real-token positions (for attentions: the rows of real queries). The hidden states of
padding positions are ill-conditioned in fp32 (both libraries are ~1e-4 off the float64 reference there), so they
are not compared. A sequence with no real token is the one documented difference (fastbert: zero attention output,
transformers: uniform attention) and is only checked for finiteness and for not disturbing the other sequences.
"""

from __future__ import annotations

import pytest
import torch

ATOL = 1e-5


def max_diff(actual, expected, mask=None) -> float:
    """max |actual - expected| over the (B, T) positions where mask is true (attentions: the query rows)."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    if mask is not None:
        if diff.dim() == 4:  # (B, H, Tq, Tk) -> (B, Tq, H, Tk)
            diff = diff.transpose(1, 2)
        diff = diff[mask.bool()]
    return diff.max().item()


def assert_close(actual, expected, mask=None, atol=ATOL, what="output"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = max_diff(actual, expected, mask)
    assert err <= atol, f"{what}: max abs diff {err:.3g} > {atol:g}"


def assert_model_outputs_close(fb_out, hf_out, mask, hidden=True, attentions=True):
    assert_close(fb_out.last_hidden_state, hf_out.last_hidden_state, mask, what="last_hidden_state")
    assert_close(fb_out.pooler_output, hf_out.pooler_output, what="pooler_output")
    if hidden:
        assert len(fb_out.hidden_states) == len(hf_out.hidden_states)
        for i, (a, b) in enumerate(zip(fb_out.hidden_states, hf_out.hidden_states, strict=True)):
            assert_close(a, b, mask, what=f"hidden_states[{i}]")
    if attentions:
        assert len(fb_out.attentions) == len(hf_out.attentions)
        for i, (a, b) in enumerate(zip(fb_out.attentions, hf_out.attentions, strict=True)):
            assert_close(a, b, mask, what=f"attentions[{i}]")


@torch.no_grad()
def test_minilm_matches_transformers(hf_minilm, fb_minilm, minilm_batch):
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    hf_out = hf_minilm(**minilm_batch, **kwargs)
    fb_out = fb_minilm(**minilm_batch, **kwargs)
    assert len(fb_out.hidden_states) == hf_minilm.config.num_hidden_layers + 1
    assert_model_outputs_close(fb_out, hf_out, minilm_batch["attention_mask"])
    # padding rows of the attention probabilities: zero weight on padded keys
    pad_keys = minilm_batch["attention_mask"] == 0  # (B, T)
    for probs in fb_out.attentions:
        assert probs.permute(0, 2, 3, 1)[pad_keys[:, None, :].expand(-1, probs.shape[2], -1)].abs().max() == 0


FLAG_CASES = pytest.mark.parametrize(
    "output_hidden_states, output_attentions",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["plain", "hidden", "attentions", "hidden+attentions"],
)


def _layout(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, tuple):
        return ("tuple", [_layout(v) for v in value])
    return (type(value).__name__,)


@FLAG_CASES
@torch.no_grad()
def test_output_fields_match_transformers(hf_minilm, fb_minilm, minilm_batch, output_hidden_states,
                                          output_attentions):
    """Same output class with the same fields set, in the same order."""
    kwargs = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
    hf_out = hf_minilm(**minilm_batch, **kwargs)
    fb_out = fb_minilm(**minilm_batch, **kwargs)
    assert type(fb_out) is type(hf_out)
    assert list(fb_out.keys()) == list(hf_out.keys())
    assert [_layout(v) for v in fb_out.values()] == [_layout(v) for v in hf_out.values()]


@FLAG_CASES
@torch.no_grad()
def test_return_tuple_layout_matches_transformers(hf_minilm, fb_minilm, minilm_batch, output_hidden_states,
                                                  output_attentions):
    """return_dict=False: a tuple with the same elements (count, nesting, shapes, dtypes) as transformers'."""
    kwargs = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
    hf_tuple = hf_minilm(**minilm_batch, **kwargs, return_dict=False)
    fb_tuple = fb_minilm(**minilm_batch, **kwargs, return_dict=False)
    assert type(fb_tuple) is type(hf_tuple) is tuple
    assert _layout(fb_tuple) == _layout(hf_tuple)
    assert_close(fb_tuple[0], hf_tuple[0], minilm_batch["attention_mask"], what="tuple[0]")
    assert_close(fb_tuple[1], hf_tuple[1], what="tuple[1]")


@torch.no_grad()
def test_token_type_ids_sentence_pairs(hf_minilm, fb_minilm, tokenizer, sentences):
    pairs = tokenizer(sentences[:2], sentences[2:], padding=True, return_tensors="pt")
    assert (pairs["token_type_ids"] == 1).any()
    hf_out = hf_minilm(**pairs)
    fb_out = fb_minilm(**pairs)
    assert_model_outputs_close(fb_out, hf_out, pairs["attention_mask"], hidden=False, attentions=False)
    # the token types must matter (otherwise the comparison above would not test them)
    no_types = fb_minilm(input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"])
    assert max_diff(no_types.last_hidden_state, fb_out.last_hidden_state, pairs["attention_mask"]) > 1e-3


@pytest.mark.parametrize("layout", ["batch", "broadcast"])
@torch.no_grad()
def test_position_ids(hf_minilm, fb_minilm, minilm_batch, layout):
    batch, seqlen = minilm_batch["input_ids"].shape
    if layout == "batch":  # a different offset per sequence
        position_ids = torch.arange(seqlen)[None, :] + 7 * torch.arange(batch)[:, None]
    else:  # (1, T), broadcast over the batch
        position_ids = torch.arange(seqlen).flip(0)[None, :] + 3
    hf_out = hf_minilm(**minilm_batch, position_ids=position_ids)
    fb_out = fb_minilm(**minilm_batch, position_ids=position_ids)
    assert_model_outputs_close(fb_out, hf_out, minilm_batch["attention_mask"], hidden=False, attentions=False)
    default = fb_minilm(**minilm_batch)
    assert max_diff(default.last_hidden_state, fb_out.last_hidden_state, minilm_batch["attention_mask"]) > 1e-3


@torch.no_grad()
def test_inputs_embeds(hf_minilm, fb_minilm, minilm_batch):
    ids = minilm_batch["input_ids"]
    rest = {k: v for k, v in minilm_batch.items() if k != "input_ids"}
    mask = minilm_batch["attention_mask"]
    gen = torch.Generator().manual_seed(0)
    embeds = fb_minilm.get_input_embeddings()(ids)
    # embeddings of input_ids reproduce the input_ids path
    from_embeds = fb_minilm(inputs_embeds=embeds, **rest)
    assert_close(from_embeds.last_hidden_state, fb_minilm(**minilm_batch).last_hidden_state, mask, what="embeds")
    # arbitrary embeddings (not rows of the table) agree with transformers
    embeds = embeds + 0.05 * torch.randn(embeds.shape, generator=gen)
    hf_out = hf_minilm(inputs_embeds=embeds, **rest, output_hidden_states=True)
    fb_out = fb_minilm(inputs_embeds=embeds, **rest, output_hidden_states=True)
    assert_model_outputs_close(fb_out, hf_out, mask, attentions=False)


@torch.no_grad()
def test_no_attention_mask_no_token_types(hf_minilm, fb_minilm, tokenizer, sentences):
    ids = tokenizer(sentences[:1], return_tensors="pt")["input_ids"].repeat(2, 1)
    assert_model_outputs_close(fb_minilm(ids), hf_minilm(ids), None, hidden=False, attentions=False)


@torch.no_grad()
def test_bert_base_random_matches_transformers(bert_base_pair, bert_base_batch):
    hf, fb = bert_base_pair
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    hf_out = hf(**bert_base_batch, **kwargs)
    fb_out = fb(**bert_base_batch, **kwargs)
    assert len(fb_out.attentions) == 12 and fb_out.last_hidden_state.shape[-1] == 768
    assert_model_outputs_close(fb_out, hf_out, bert_base_batch["attention_mask"])


@torch.no_grad()
def test_fully_padded_sequence(hf_minilm, fb_minilm, minilm_batch):
    """An all-padding sequence gives finite outputs and leaves the other sequences of the batch unchanged."""
    batch = {k: torch.cat([v, torch.zeros_like(v[:1])]) for k, v in minilm_batch.items()}
    batch["input_ids"][-1] = 0  # [PAD] everywhere, attention_mask all 0
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    fb_out = fb_minilm(**batch, **kwargs)
    hf_out = hf_minilm(**minilm_batch, **kwargs)
    real = minilm_batch["attention_mask"]
    for name in ("last_hidden_state", "pooler_output"):
        assert torch.isfinite(fb_out[name]).all(), name
    for i, (a, b) in enumerate(zip(fb_out.attentions, hf_out.attentions, strict=True)):
        assert torch.isfinite(a).all() and a[-1].abs().max() == 0, f"attentions[{i}] of the empty sequence"
        assert_close(a[:-1], b, real, what=f"attentions[{i}]")
    for a in fb_out.hidden_states:
        assert torch.isfinite(a).all()
    assert_close(fb_out.last_hidden_state[:-1], hf_out.last_hidden_state, real, what="last_hidden_state")
    assert_close(fb_out.pooler_output[:-1], hf_out.pooler_output, what="pooler_output")


@torch.no_grad()
def test_config_output_flags(make_pair, make_config, make_batch):
    config = make_config(output_hidden_states=True, output_attentions=True)
    hf, fb = make_pair("BertModel", config)
    batch = make_batch(config)
    hf_out, fb_out = hf(**batch), fb(**batch)
    assert len(fb_out.hidden_states) == config.num_hidden_layers + 1
    assert_model_outputs_close(fb_out, hf_out, batch["attention_mask"])
    # explicit arguments override the config
    fb_off = fb(**batch, output_hidden_states=False, output_attentions=False)
    hf_off = hf(**batch, output_hidden_states=False, output_attentions=False)
    assert fb_off.hidden_states is None and fb_off.attentions is None
    assert list(fb_off.keys()) == list(hf_off.keys())
