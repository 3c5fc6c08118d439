"""fastbert.from_hf: converting live transformers BERT modules (alone or inside a user's module) to fastbert."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import fastbert

ALL_CLASSES = [
    "BertModel",
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForNextSentencePrediction",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMultipleChoice",
]


def _inputs(name, config, make_batch):
    if name == "BertForMultipleChoice":
        return make_batch(config, batch=2, seqlen=7, num_choices=2)
    return make_batch(config)


def _assert_close_outputs(fb_out, hf_out, mask, atol=1e-5):
    """Per-token outputs ((B, T, ...) with mask's (B, T)) are compared at real tokens: padded positions hold 0 in
    fastbert (documented). QA's loss reads padded positions too: it is checked in test_model_heads.py."""
    assert type(fb_out) is type(hf_out) and list(fb_out.keys()) == list(hf_out.keys())
    for key in hf_out.keys():
        fb_value, hf_value = fb_out[key], hf_out[key]
        if key == "loss" and "start_logits" in hf_out:
            continue
        if fb_value.dim() >= 2 and fb_value.shape[:2] == mask.shape:
            fb_value, hf_value = fb_value[mask.bool()], hf_value[mask.bool()]
        torch.testing.assert_close(fb_value, hf_value, rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name", ALL_CLASSES)
@torch.no_grad()
def test_from_hf_each_class(name, make_config, make_pair, make_batch):
    config = make_config(num_labels=2 if name == "BertForQuestionAnswering" else 3)
    hf, _ = make_pair(name, config, seed=6)
    fb = fastbert.from_hf(hf)
    assert type(fb) is getattr(fastbert, name)
    assert type(hf) is getattr(transformers, name), "the original must be left as it was"
    assert fb.config is not hf.config and fb.config.to_dict() == hf.config.to_dict()
    fb_state, hf_state = fb.state_dict(), hf.state_dict()
    assert fb_state.keys() == hf_state.keys()
    assert all(torch.equal(fb_state[k], hf_state[k]) for k in hf_state)
    assert not any(p.is_meta for p in fb.parameters())
    batch = _inputs(name, config, make_batch)
    _assert_close_outputs(fb(**batch), hf(**batch), batch["attention_mask"])
    hf(**batch)  # the original still runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_from_hf_preserves_dtype_device_and_mode(dtype, training, make_config):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(make_config()).to(dtype).train(training)
    fb = fastbert.from_hf(hf)
    assert {p.dtype for p in fb.parameters()} == {dtype}
    assert {p.device for p in fb.parameters()} == {next(hf.parameters()).device}
    assert fb.training is training and all(m.training is training for m in fb.modules())
    assert fb.cls.predictions.decoder.weight is fb.bert.embeddings.word_embeddings.weight
    ids = torch.randint(1, 100, (2, 5))
    with torch.no_grad():
        assert fb.eval()(ids).logits.dtype == dtype


def test_from_hf_keeps_frozen_parameters_frozen(make_config):
    """requires_grad=False on the transformers model (a frozen embedding layer) carries over to fastbert."""
    hf = transformers.BertForSequenceClassification(make_config())
    hf.bert.embeddings.requires_grad_(False)
    fb = fastbert.from_hf(hf)
    hf_flags = {n: p.requires_grad for n, p in hf.named_parameters()}
    fb_flags = {n: p.requires_grad for n, p in fb.named_parameters()}
    assert fb_flags == hf_flags


@torch.no_grad()
def test_from_hf_bert_model_without_pooler(make_config, make_batch):
    config = make_config()
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    fb = fastbert.from_hf(hf)
    assert fb.pooler is None
    batch = make_batch(config)
    _assert_close_outputs(fb(**batch), hf(**batch), batch["attention_mask"])


class _Classifier(nn.Module):
    """A user's module holding a transformers BertModel (e.g. a custom pooling head, a dual encoder)."""

    def __init__(self, config):
        super().__init__()
        self.encoder = transformers.BertModel(config)
        self.towers = nn.ModuleList([transformers.BertModel(config, add_pooling_layer=False)])
        self.head = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask):
        first = self.encoder(input_ids, attention_mask=attention_mask).pooler_output
        second = self.towers[0](input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return self.head(first + second)


@torch.no_grad()
def test_from_hf_wrapper_module(make_config, make_batch):
    config = make_config()
    torch.manual_seed(0)
    wrapper = _Classifier(config).eval()
    batch = make_batch(config)
    before = wrapper(batch["input_ids"], batch["attention_mask"])
    head = wrapper.head
    result = fastbert.from_hf(wrapper)
    assert result is wrapper and wrapper.head is head
    assert type(wrapper.encoder) is fastbert.BertModel and type(wrapper.towers[0]) is fastbert.BertModel
    assert wrapper.towers[0].pooler is None and not wrapper.encoder.training
    torch.testing.assert_close(wrapper(batch["input_ids"], batch["attention_mask"]), before, rtol=0, atol=1e-5)


def test_from_hf_sentence_transformers(minilm_path, sentences):
    st_module = pytest.importorskip("sentence_transformers")
    try:
        model = st_module.SentenceTransformer(str(minilm_path), device="cpu")
    except OSError as exc:  # would need the network (e.g. a missing file fetched from the hub)
        pytest.skip(f"SentenceTransformer could not load the local MiniLM directory: {exc}")
    model.eval()
    with torch.no_grad():
        before = model.encode(sentences, convert_to_tensor=True)
    assert fastbert.from_hf(model) is model
    converted = [m for m in model.modules() if isinstance(m, fastbert.BertModel)]
    assert len(converted) == 1
    assert not any(isinstance(m, transformers.BertModel) for m in model.modules())
    calls, forward = [], converted[0].forward

    def counting_forward(*args, **kwargs):  # sentence-transformers calls model.forward directly (no hooks)
        calls.append(1)
        return forward(*args, **kwargs)

    converted[0].forward = counting_forward
    with torch.no_grad():
        after = model.encode(sentences, convert_to_tensor=True)
    assert calls, "SentenceTransformer.encode did not run the fastbert model"
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_from_hf_rejects_non_bert(make_config):
    with pytest.raises(ValueError, match="no transformers BERT"):
        fastbert.from_hf(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20))
    with pytest.raises(ValueError):
        fastbert.from_hf(roberta)
    decoder = transformers.BertLMHeadModel(make_config(is_decoder=True))  # a causal BERT: no fastbert twin
    with pytest.raises(ValueError):
        fastbert.from_hf(decoder)
    with pytest.raises(TypeError, match="nn.Module"):
        fastbert.from_hf("bert-base-uncased")
