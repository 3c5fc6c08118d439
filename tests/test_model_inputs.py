"""Bad input at the public boundary: a clear ValueError / TypeError that names the offending argument."""

from __future__ import annotations

import pytest
import torch
import transformers

import fastbert


@pytest.fixture(scope="module")
def tiny():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, max_position_embeddings=12, num_labels=2)
    torch.manual_seed(0)
    return {"model": fastbert.BertModel(config).eval(),
            "classifier": fastbert.BertForSequenceClassification(config).eval(),
            "choice": fastbert.BertForMultipleChoice(config).eval()}


IDS = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
EMBEDS = torch.randn(2, 4, 16)

CASES = {
    "both input_ids and inputs_embeds": (dict(input_ids=IDS, inputs_embeds=EMBEDS), ValueError, "inputs_embeds"),
    "neither input_ids nor inputs_embeds": (dict(attention_mask=MASK), ValueError, "input_ids"),
    "3-D attention_mask": (dict(input_ids=IDS, attention_mask=MASK[:, None, :].expand(2, 4, 4)), ValueError,
                           "attention_mask"),
    "4-D attention_mask": (dict(input_ids=IDS, attention_mask=MASK[:, None, None, :]), ValueError, "attention_mask"),
    "attention_mask of another shape": (dict(input_ids=IDS, attention_mask=MASK[:, :3]), ValueError,
                                        "attention_mask"),
    "attention_mask with another batch": (dict(input_ids=IDS, attention_mask=MASK[:1]), ValueError, "attention_mask"),
    "attention_mask as a list": (dict(input_ids=IDS, attention_mask=MASK.tolist()), TypeError, "attention_mask"),
    "float input_ids": (dict(input_ids=IDS.float()), TypeError, "input_ids"),
    "bool input_ids": (dict(input_ids=IDS > 3), TypeError, "input_ids"),
    "input_ids as a list": (dict(input_ids=IDS.tolist()), TypeError, "input_ids"),
    "1-D input_ids": (dict(input_ids=IDS[0]), ValueError, "input_ids"),
    "float token_type_ids": (dict(input_ids=IDS, token_type_ids=torch.zeros(2, 4)), TypeError, "token_type_ids"),
    "token_type_ids of another shape": (dict(input_ids=IDS, token_type_ids=torch.zeros(2, 3, dtype=torch.long)),
                                        ValueError, "token_type_ids"),
    "float position_ids": (dict(input_ids=IDS, position_ids=torch.arange(4.0)[None]), TypeError, "position_ids"),
    "inputs_embeds of the wrong width": (dict(inputs_embeds=torch.randn(2, 4, 15)), ValueError, "inputs_embeds"),
    "sequence longer than max_position_embeddings": (dict(input_ids=torch.ones(1, 13, dtype=torch.long)), ValueError,
                                                     "max_position_embeddings"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bert_model_rejects_bad_input(tiny, case):
    kwargs, error, argument = CASES[case]
    with pytest.raises(error, match=argument):
        tiny["model"](**kwargs)


@pytest.mark.parametrize("case", ["both input_ids and inputs_embeds", "3-D attention_mask", "float input_ids"])
def test_heads_pass_the_checks_through(tiny, case):
    kwargs, error, argument = CASES[case]
    with pytest.raises(error, match=argument):
        tiny["classifier"](**kwargs)


def test_multiple_choice_needs_three_dims(tiny):
    with pytest.raises(ValueError, match="num_choices"):
        tiny["choice"](input_ids=IDS)
    with pytest.raises(ValueError, match="input_ids"):
        tiny["choice"](attention_mask=MASK[:, None])


def test_good_input_still_runs(tiny):
    """The boundary checks must not reject what transformers accepts: int32 ids, a bool or float 0/1 mask."""
    with torch.no_grad():
        reference = tiny["model"](input_ids=IDS, attention_mask=MASK).last_hidden_state
        for ids, mask in [(IDS.int(), MASK), (IDS, MASK.bool()), (IDS, MASK.float())]:
            out = tiny["model"](input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(out[MASK.bool()], reference[MASK.bool()], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, argument",
    [
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(position_embedding_type="relative_key"), "position_embedding_type"),
        (dict(is_decoder=True), "is_decoder"),
    ],
)
def test_unsupported_config_is_rejected(overrides, argument):
    kwargs = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=argument):
        fastbert.BertModel(transformers.BertConfig(**kwargs))


# intermediate 37 < 3 * hidden: the fused query/key/value output sizes the shared buffer; 200: the FFN's does.
@pytest.mark.parametrize("intermediate_size", [37, 200])
def test_inference_workspace_matches_the_autograd_path(make_config, intermediate_size):
    # Without autograd the encoder reuses one buffer across layers for the fused query/key/value projection and the
    # FFN's up-projection, and GELU runs in place; outputs must equal the grad-mode forward, on the padded and the
    # packed paths and with attention probabilities returned, and a forward hook on the FFN's dense layer still runs
    # (the hooked layer takes the ordinary path).
    torch.manual_seed(0)
    config = make_config(num_hidden_layers=3, initializer_range=0.3, intermediate_size=intermediate_size)
    model = fastbert.BertModel(config).eval()
    ids = torch.randint(1, 101, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    expected_probs = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        dense_only = model(input_ids=ids).last_hidden_state
        got_probs = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    # fp32 tolerances, not bitwise: the matmul library may pick another kernel for addmm(out=) than for linear.
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(dense_only, model(input_ids=ids).last_hidden_state.detach())
    torch.testing.assert_close(got_probs.last_hidden_state, expected_probs.last_hidden_state.detach())
    for got_layer, expected_layer in zip(got_probs.attentions, expected_probs.attentions, strict=True):
        torch.testing.assert_close(got_layer, expected_layer.detach())
    seen = []
    handle = model.encoder.layer[1].intermediate.dense.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            hooked = model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        handle.remove()
    assert seen and seen[0][-1] == intermediate_size
    torch.testing.assert_close(hooked, expected)



def test_inference_fused_qkv_follows_the_weights(make_config, monkeypatch):
    # Without autograd the query/key/value projections run as one matmul over their weights' shared buffer (the
    # parameters are views of it). Every way a weight changes must show in the next forward: in-place updates,
    # .data edits (which bump no version counter), load_state_dict, a new tensor assigned to .data (the layout is gone:
    # the projections run one by one), dtype conversion (laid out again); a hooked projection takes the ordinary path.
    from fastbert import modeling

    torch.manual_seed(0)
    model = fastbert.BertModel(make_config(num_hidden_layers=2, initializer_range=0.3)).eval()
    attn = model.encoder.layer[1].attention.self
    ids = torch.randint(1, 101, (2, 7))
    fused_calls = []
    stacked = modeling._stacked
    monkeypatch.setattr(modeling, "_stacked", lambda tensors: fused_calls.append(1) or stacked(tensors))

    def check(dtype=torch.float32, fused=True):
        del fused_calls[:]
        with torch.no_grad():
            got = model(input_ids=ids).last_hidden_state
        assert bool(fused_calls) == fused, "the no-grad forward did not take the expected projection path"
        expected = model(input_ids=ids).last_hidden_state.detach()  # grad mode: three separate projections
        tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
        torch.testing.assert_close(got, expected, **tol)
        return got

    before = check()
    with torch.no_grad():
        attn.key.weight.mul_(-1.5)  # in place: bumps the version counter
    changed = check()
    assert not torch.allclose(changed, before), "the key weight change did not reach the fused projection"
    attn.value.bias.data.add_(1.0)  # .data: no version bump
    assert not torch.allclose(check(), changed), "a .data edit did not reach the fused projection"
    model.load_state_dict({k: v * 0.5 if k.endswith("value.bias") else v for k, v in model.state_dict().items()})
    check()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    check()  # assign=True puts fresh tensors behind the parameters: laid out again after loading
    attn.query.weight.data = attn.query.weight.data.flip(0).contiguous()  # a new tensor behind the same Parameter
    fused_layers = check(fused=True)  # layer 0 still fused, layer 1 one by one
    model.to(torch.bfloat16)
    check(torch.bfloat16)
    model.float()
    torch.testing.assert_close(check(), fused_layers, atol=2e-2, rtol=2e-2)

    seen = []
    handle = attn.value.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    assert seen, "a forward hook on the value projection did not run"
