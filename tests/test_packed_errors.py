"""Clear errors for packed input, pack / unpack and the config, and dropout probability 1.0 (which transformers runs:
every value dropped)."""

from __future__ import annotations

import pytest
import torch
import transformers

import fastbert
from fastbert import ops


@pytest.fixture
def tiny(make_config, make_pair):
    config = make_config(max_position_embeddings=64)
    return config, make_pair("BertModel", config, seed=20)[1]


@pytest.mark.parametrize("sequences, message", [
    ([["hello", "world"]], r"input_ids\[0\]\[0\] is 'hello' \(str\); token ids must be integers"),
    ([[1, 2], [3, 4.0]], r"input_ids\[1\]\[1\] is 4.0 \(float\)"),  # torch.tensor would truncate it silently
    ([[1, True]], r"input_ids\[0\]\[1\] is True \(bool\)"),
    (["hello world"], r"input_ids\[0\] is a str"),
])
def test_pack_refuses_ids_that_are_not_integers(sequences, message):
    with pytest.raises(TypeError, match=message):
        fastbert.pack(sequences)


def test_pack_names_non_integer_token_types():
    with pytest.raises(TypeError, match=r"token_type_ids\[0\]\[1\] is 'b'"):
        fastbert.pack([[1, 2]], token_type_ids=[[0, "b"]])


def test_pack_takes_integer_tensors_and_numpy_ids():
    import numpy as np

    batch = fastbert.pack([torch.tensor([5, 6]), np.array([7])])
    assert batch["input_ids"].tolist() == [5, 6, 7] and batch["cu_seqlens"].tolist() == [0, 2, 3]


@pytest.mark.parametrize("max_seqlen, error, message", [
    ("seven", TypeError, "max_seqlen must be an int"),
    (6.0, TypeError, "max_seqlen must be an int"),
])
def test_max_seqlen_errors_name_it(max_seqlen, error, message, tiny):
    _, fb = tiny
    with pytest.raises(error, match=message) as info:
        fb(input_ids=torch.ones(10, dtype=torch.long), cu_seqlens=torch.tensor([0, 6, 10], dtype=torch.int32),
           max_seqlen=max_seqlen)
    assert "max_position_embeddings" not in str(info.value)


def test_max_seqlen_beyond_the_tokens_is_a_loose_bound(tiny):
    # An upper bound (a grid size, a bucket) may exceed every sequence, even the token count: same output as exact.
    _, fb = tiny
    ids, cu = torch.ones(10, dtype=torch.long), torch.tensor([0, 6, 10], dtype=torch.int32)
    exact = fb(input_ids=ids, cu_seqlens=cu, max_seqlen=6).last_hidden_state
    loose = fb(input_ids=ids, cu_seqlens=cu, max_seqlen=10**12).last_hidden_state
    torch.testing.assert_close(loose, exact, rtol=0, atol=0)


def test_max_seqlen_as_a_zero_dim_tensor_is_accepted(tiny):
    config, fb = tiny
    out = fb(input_ids=torch.ones(10, dtype=torch.long), cu_seqlens=torch.tensor([0, 6, 10], dtype=torch.int32),
             max_seqlen=torch.tensor(6))
    assert out.last_hidden_state.shape == (10, config.hidden_size)


def test_empty_packed_sequence_is_refused_like_the_padded_path(tiny, make_batch):
    """Decision: a sequence needs at least its [CLS] token on both layouts (see fastbert/validation.py)."""
    config, fb = tiny
    with pytest.raises(ValueError, match="sequences of length 0"):  # the padded path
        fb(input_ids=torch.ones(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cu_seqlens holds an empty sequence \(sequence 1 has length 0"):
        fb(input_ids=torch.ones(10, dtype=torch.long), cu_seqlens=torch.tensor([0, 6, 6, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="sequence 1 has no token"):
        fastbert.pack([[1, 2], []])
    padded = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="sequence 0 has no token"):
        fastbert.pack(padded, torch.tensor([[0, 0, 0], [1, 1, 0]]))
    # A fully padded row of a padded batch is padding, not a sequence: still accepted (as in transformers).
    batch = make_batch(config, batch=2, seqlen=5)
    batch["attention_mask"][1] = 0
    assert torch.isfinite(fb(**batch).last_hidden_state).all()


@pytest.mark.parametrize("cu_seqlens, seqlen, message", [
    ([0, 2, 4], None, "x has 5 packed tokens, which cu_seqlens does not describe"),
    ([0, 3, 2, 5], None, "without decreasing"),
    ([1, 2, 5], None, "cu_seqlens must rise from 0"),
    ([0, 2, 5], 2, r"seqlen=2 must be an int >= the longest sequence in cu_seqlens \(3\)"),
])
def test_unpack_with_wrong_offsets_names_cu_seqlens(cu_seqlens, seqlen, message):
    with pytest.raises(ValueError, match=message):
        fastbert.unpack(torch.zeros(5, 3), torch.tensor(cu_seqlens, dtype=torch.int32), seqlen)


def test_unpack_still_restores_the_padded_layout():
    out = fastbert.unpack(torch.arange(5.0), torch.tensor([0, 2, 5], dtype=torch.int32), 4)
    assert out.tolist() == [[0.0, 1.0, 0.0, 0.0], [2.0, 3.0, 4.0, 0.0]]


@pytest.mark.parametrize("override, message", [
    (dict(intermediate_size=0), "config.intermediate_size must be a positive integer, got 0"),
    (dict(num_attention_heads=0), "config.num_attention_heads must be a positive integer"),
    (dict(hidden_dropout_prob=1.5), r"config.hidden_dropout_prob must be a probability in \[0, 1\]"),
    (dict(attention_probs_dropout_prob=-0.1), "config.attention_probs_dropout_prob"),
])
def test_bad_config_is_refused_at_construction(override, message, make_config):
    with pytest.raises(ValueError, match=message):
        fastbert.BertModel(make_config(**override))


def test_dropout_one_in_training_matches_transformers(make_config, make_pair, make_batch):
    """Decision: dropout probability 1.0 is accepted, as transformers' nn.Dropout(p=1.0) is: every value is dropped.
    Nothing is random then, so the train-mode outputs and gradients must equal transformers'."""
    config = make_config(hidden_dropout_prob=1.0, attention_probs_dropout_prob=1.0)
    hf, fb = make_pair("BertForSequenceClassification", config, seed=21)
    hf.train(), fb.train()
    batch = make_batch(config, batch=3, seqlen=9)
    labels = torch.tensor([0, 2, 1])
    hf_out, fb_out = hf(**batch, labels=labels), fb(**batch, labels=labels)
    assert torch.isfinite(fb_out.logits).all()
    torch.testing.assert_close(fb_out.logits, hf_out.logits, rtol=1e-5, atol=1e-5)
    hf_out.loss.backward()
    fb_out.loss.backward()
    fb_params = dict(fb.named_parameters())
    for name, param in hf.named_parameters():
        if param.grad is None:
            continue
        assert fb_params[name].grad is not None, name
        torch.testing.assert_close(fb_params[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Packed input runs the varlen attention op with the same probability.
    packed = fastbert.pack(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    torch.testing.assert_close(fb(**packed).logits, fb_out.logits, rtol=1e-5, atol=1e-5)


def test_dropout_one_ops_drop_everything():
    q, k, v = (torch.randn(2, 5, 2, 4, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, dropout_p=1.0)
    assert out.shape == (2, 5, 2, 4) and out.abs().max() == 0
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().max() == 0 for t in (q, k, v))
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    weight, bias = torch.rand(8) + 0.5, torch.randn(8)
    expected = torch.nn.functional.layer_norm(residual, (8,), weight, bias, 1e-12)
    torch.testing.assert_close(ops.add_layer_norm(x, residual, weight, bias, 1e-12, dropout_p=1.0), expected)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        ops.attention(q, k, v, dropout_p=1.5)


def test_transformers_config_with_dropout_one_builds_in_both():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                     vocab_size=50, hidden_dropout_prob=1.0)
    assert isinstance(fastbert.BertModel(config), fastbert.BertModel)
