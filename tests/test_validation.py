"""Bad model input (fastbert.BertModel and the heads): ids outside their embedding tables, wrong dtypes, shapes and
devices, empty sequences. Each raises a TypeError / ValueError naming the argument, before any kernel runs (on a GPU
an out-of-range id would otherwise be a device-side assert). tests/test_model_inputs.py holds the older cases;
docs/ROBUSTNESS.md counts both. Also: the data-dependent checks can be switched off, a batch of zero sequences and a
fully padded sequence give finite outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import fastbert
from fastbert.validation import check_model_inputs, input_checks_enabled

META = torch.device("meta")  # a second device on any machine
CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
              max_position_embeddings=12, type_vocab_size=2, num_labels=2)


@pytest.fixture(scope="module")
def tiny():
    config = transformers.BertConfig(**CONFIG)
    torch.manual_seed(0)
    return {"model": fastbert.BertModel(config).eval(),
            "classifier": fastbert.BertForSequenceClassification(config).eval(),
            "mlm": fastbert.BertForMaskedLM(config).eval(),
            "choice": fastbert.BertForMultipleChoice(config).eval()}


@pytest.fixture(autouse=True)
def _checks_on():
    fastbert.set_input_checks(None)
    yield
    fastbert.set_input_checks(None)


IDS = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 0]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
TYPES = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])

CASES = {
    "input_ids >= vocab_size": (dict(input_ids=IDS + 45), ValueError, "input_ids"),
    "negative input_ids": (dict(input_ids=IDS - 3), ValueError, "input_ids"),
    "uint8 input_ids": (dict(input_ids=IDS.to(torch.uint8)), TypeError, "input_ids"),
    "int16 input_ids": (dict(input_ids=IDS.to(torch.int16)), TypeError, "input_ids"),
    "input_ids of length 0": (dict(input_ids=IDS[:, :0]), ValueError, "input_ids"),
    "token_type_ids >= type_vocab_size": (dict(input_ids=IDS, token_type_ids=TYPES + 1), ValueError,
                                          "token_type_ids"),
    "negative token_type_ids": (dict(input_ids=IDS, token_type_ids=TYPES - 1), ValueError, "token_type_ids"),
    "int8 token_type_ids": (dict(input_ids=IDS, token_type_ids=TYPES.to(torch.int8)), TypeError, "token_type_ids"),
    "token_type_ids on another device": (dict(input_ids=IDS, token_type_ids=TYPES.to(META)), ValueError,
                                         "token_type_ids"),
    "position_ids >= max_position_embeddings": (dict(input_ids=IDS, position_ids=torch.arange(9, 13)[None]),
                                                ValueError, "position_ids"),
    "negative position_ids": (dict(input_ids=IDS, position_ids=torch.arange(-1, 3)[None]), ValueError,
                              "position_ids"),
    "position_ids of another batch": (dict(input_ids=IDS, position_ids=torch.arange(4)[None].expand(3, 4)),
                                      ValueError, "position_ids"),
    "position_ids of another length": (dict(input_ids=IDS, position_ids=torch.arange(5)[None]), ValueError,
                                       "position_ids"),
    "3-D position_ids": (dict(input_ids=IDS, position_ids=torch.arange(4)[None, None]), ValueError, "position_ids"),
    "position_ids on another device": (dict(input_ids=IDS, position_ids=torch.arange(4).to(META)), ValueError,
                                       "position_ids"),
    "long input with position_ids out of range": (
        dict(input_ids=torch.ones(1, 13, dtype=torch.long), position_ids=torch.arange(13)), ValueError,
        "position_ids"),
    "attention_mask on another device": (dict(input_ids=IDS, attention_mask=MASK.to(META)), ValueError,
                                         "attention_mask"),
    "complex attention_mask": (dict(input_ids=IDS, attention_mask=MASK.to(torch.complex64)), TypeError,
                               "attention_mask"),
    "inputs_embeds of length 0": (dict(inputs_embeds=torch.randn(2, 0, 16)), ValueError, "inputs_embeds"),
    "float64 inputs_embeds": (dict(inputs_embeds=torch.randn(2, 4, 16, dtype=torch.float64)), TypeError,
                              "inputs_embeds"),
    "int inputs_embeds": (dict(inputs_embeds=torch.ones(2, 4, 16, dtype=torch.long)), TypeError, "inputs_embeds"),
    "inputs_embeds as a list": (dict(inputs_embeds=torch.randn(2, 4, 16).tolist()), TypeError, "inputs_embeds"),
    "2-D inputs_embeds": (dict(inputs_embeds=torch.randn(4, 16)), ValueError, "inputs_embeds"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bert_model_refuses_bad_input_naming_it(tiny, case):
    kwargs, error, argument = CASES[case]
    with pytest.raises(error) as info:
        tiny["model"](**kwargs)
    assert argument in str(info.value), f"the message does not name {argument!r}: {info.value}"


HEAD_CASES = {
    "classifier, input_ids >= vocab_size": ("classifier", dict(input_ids=IDS + 45, labels=torch.tensor([0, 1])),
                                            ValueError, "input_ids"),
    "masked LM, token_type_ids >= type_vocab_size": ("mlm", dict(input_ids=IDS, token_type_ids=TYPES + 1),
                                                     ValueError, "token_type_ids"),
    "multiple choice, negative input_ids": ("choice", dict(input_ids=(IDS - 9)[None]), ValueError, "input_ids"),
}


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_heads_refuse_bad_input_naming_it(tiny, case):
    head, kwargs, error, argument = HEAD_CASES[case]
    with pytest.raises(error, match=argument):
        tiny[head](**kwargs)


# The model's own device and dtype: check_model_inputs(..., embeddings_weight=word embedding matrix).
WEIGHT = torch.zeros(50, 16, dtype=torch.bfloat16)
DIRECT_CASES = {
    "input_ids on another device than the model": (dict(input_ids=IDS.to(META)), ValueError, "input_ids"),
    "inputs_embeds on another device than the model": (dict(inputs_embeds=torch.randn(2, 4, 16, device=META)
                                                            .bfloat16()), ValueError, "inputs_embeds"),
    "float32 inputs_embeds into a bfloat16 model": (dict(inputs_embeds=torch.randn(2, 4, 16)), TypeError,
                                                    "inputs_embeds"),
    "float16 inputs_embeds into a bfloat16 model": (dict(inputs_embeds=torch.randn(2, 4, 16).half()), TypeError,
                                                    "inputs_embeds"),
}


def _check(embeddings_weight=WEIGHT, **kwargs):
    args = dict(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None)
    return check_model_inputs(transformers.BertConfig(**CONFIG), **(args | kwargs), embeddings_weight=embeddings_weight)


@pytest.mark.parametrize("case", list(DIRECT_CASES))
def test_inputs_must_match_the_models_device_and_dtype(case):
    kwargs, error, argument = DIRECT_CASES[case]
    with pytest.raises(error) as info:
        _check(**kwargs)
    assert argument in str(info.value) and "model" in str(info.value), str(info.value)


@pytest.mark.parametrize("case", list(DIRECT_CASES))
def test_the_model_passes_its_weights_to_the_check(tiny, case):
    # BertModel.forward hands its word-embedding matrix to check_model_inputs: the same cases, through the model.
    kwargs, error, argument = DIRECT_CASES[case]
    model = copy.deepcopy(tiny["model"]).to(torch.bfloat16)
    with pytest.raises(error) as info:
        model(**kwargs)
    assert argument in str(info.value) and "model" in str(info.value), str(info.value)


def test_narrower_inputs_embeds_are_promoted_in_a_float32_model():
    # transformers adds bf16/fp16 embeddings to fp32 position embeddings (fp32 result): accepted, as there.
    for dtype in (torch.bfloat16, torch.float16):
        shape, _, _ = _check(torch.zeros(50, 16), inputs_embeds=torch.randn(2, 4, 16).to(dtype))
        assert shape == (2, 4)


# ----------------------------------------------------------------------------------------------------------------
# the switch for data-dependent checks


def test_set_input_checks_takes_a_bool():
    with pytest.raises(TypeError, match="set_input_checks"):
        fastbert.set_input_checks("no")


@pytest.mark.parametrize("how", ["function", "environment"])
def test_range_checks_can_be_switched_off(tiny, how, monkeypatch):
    assert input_checks_enabled()
    if how == "function":
        fastbert.set_input_checks(False)
    else:
        monkeypatch.setenv("FASTBERT_CHECK_INPUTS", "0")
    assert not input_checks_enabled()
    # Unchecked, the bad id reaches the embedding: on CPU its IndexError (on a GPU, a device-side assert).
    with pytest.raises(IndexError):
        tiny["model"](input_ids=IDS + 45)
    with pytest.raises(ValueError, match="input_ids"):  # metadata checks stay on: they cost nothing
        tiny["model"](input_ids=IDS[0])
    fastbert.set_input_checks(True)  # the function wins over the environment
    with pytest.raises(ValueError, match="input_ids"):
        tiny["model"](input_ids=IDS + 45)


# ----------------------------------------------------------------------------------------------------------------
# valid edge inputs


@pytest.mark.parametrize("with_mask", [False, True], ids=["no mask", "mask"])
def test_a_batch_of_zero_sequences_gives_empty_outputs(tiny, with_mask):
    # transformers raises a reshape error here; fastbert returns outputs with a batch dimension of 0.
    ids = torch.zeros(0, 4, dtype=torch.long)
    kwargs = dict(input_ids=ids, attention_mask=torch.zeros(0, 4, dtype=torch.long) if with_mask else None)
    with torch.no_grad():
        out = tiny["model"](**kwargs)
    assert out.last_hidden_state.shape == (0, 4, 16) and out.pooler_output.shape == (0, 16)


@pytest.mark.parametrize("mask", [[[0, 0, 0, 0], [1, 1, 1, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]],
                         ids=["one sequence fully padded", "every sequence fully padded"])
def test_a_fully_padded_sequence_gives_finite_outputs_and_gradients(tiny, mask):
    model = tiny["classifier"]
    model.train()  # dropout on
    try:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=IDS, attention_mask=torch.tensor(mask), labels=torch.tensor([0, 1]),
                    output_hidden_states=True)
        assert all(torch.isfinite(h).all() for h in out.hidden_states)
        assert torch.isfinite(out.logits).all()
        out.loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    finally:
        model.eval()


def test_valid_position_ids_layouts(tiny):
    with torch.no_grad():
        reference = tiny["model"](input_ids=IDS).last_hidden_state
        for position_ids in (torch.arange(4), torch.arange(4)[None], torch.arange(4)[None].expand(2, 4)):
            out = tiny["model"](input_ids=IDS, position_ids=position_ids).last_hidden_state
            torch.testing.assert_close(out, reference, rtol=0, atol=0)
        # Longer than max_position_embeddings is fine when the positions themselves are in range.
        long_ids = torch.ones(1, 20, dtype=torch.long)
        out = tiny["model"](input_ids=long_ids, position_ids=torch.arange(20) % 12).last_hidden_state
        assert out.shape == (1, 20, 16) and torch.isfinite(out).all()
