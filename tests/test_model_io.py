"""Checkpoint compatibility with transformers: state dicts, save_pretrained / from_pretrained both ways, safetensors
and legacy pytorch_model.bin checkpoints, tied masked-LM decoder weights."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from safetensors import safe_open

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
MLM_CLASSES = ["BertForPreTraining", "BertForMaskedLM"]


def config_for(name, make_config):
    return make_config(num_labels=2 if name == "BertForQuestionAnswering" else 3)  # QA: start and end logits


def inputs_for(name, config, make_batch):
    if name == "BertForMultipleChoice":
        return make_batch(config, batch=2, seqlen=7, num_choices=2)
    return make_batch(config)


def first_output(out):
    return out[0]  # last_hidden_state / logits / prediction_logits / start_logits


def assert_same_outputs(fb, hf, batch):
    with torch.no_grad():
        fb_out, hf_out = first_output(fb(**batch)), first_output(hf(**batch))
    assert fb_out.shape == hf_out.shape
    mask = batch["attention_mask"].reshape(-1, batch["attention_mask"].shape[-1]).bool()
    if fb_out.shape[:2] == mask.shape:  # per-token outputs: compare the real tokens
        fb_out, hf_out = fb_out[mask], hf_out[mask]
    err = (fb_out - hf_out).abs().max().item()
    assert err <= 1e-5, err


def assert_loading_clean(info):
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info


def assert_tied(model):
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert decoder.bias is model.cls.predictions.bias
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("name", ALL_CLASSES)
def test_state_dicts_load_strictly_both_ways(name, make_config, make_pair, make_batch):
    config = config_for(name, make_config)
    hf, fb = make_pair(name, config, seed=1)  # fb got hf's weights through load_state_dict(strict=True)
    hf_buffers = {n for n, _ in hf.named_buffers()}
    hf_state = {k: v for k, v in hf.state_dict().items() if k not in hf_buffers}
    assert set(hf_state) == set(fb.state_dict())
    fresh_fb = getattr(fastbert, name)(config)
    result = fresh_fb.load_state_dict(hf_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_outputs(fresh_fb.eval(), hf, inputs_for(name, config, make_batch))
    torch.manual_seed(99)
    fresh_hf = getattr(transformers, name)(config)
    result = fresh_hf.load_state_dict(fb.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_outputs(fb, fresh_hf.eval(), inputs_for(name, config, make_batch))


def test_minilm_from_pretrained_loading_info(minilm_path):
    _, info = fastbert.BertModel.from_pretrained(minilm_path, output_loading_info=True)
    assert_loading_clean(info)


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForSequenceClassification", "BertForQuestionAnswering"])
def test_head_loading_info_matches_transformers(name, minilm_path):
    """Loading a BertModel checkpoint into a head reports the same missing / unexpected keys as transformers."""
    _, hf_info = getattr(transformers, name).from_pretrained(minilm_path, output_loading_info=True)
    _, fb_info = getattr(fastbert, name).from_pretrained(minilm_path, output_loading_info=True)
    assert hf_info["missing_keys"]  # the head is new
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert set(fb_info[key]) == set(hf_info[key]), key


def test_fastbert_save_pretrained_loads_in_transformers(fb_minilm, hf_minilm, minilm_batch, tmp_path):
    fb_minilm.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors"} <= files and "pytorch_model.bin" not in files
    loaded, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True,
                                                          attn_implementation="eager")
    assert_loading_clean(info)
    assert type(loaded) is transformers.BertModel
    assert_same_outputs(fb_minilm, loaded.eval(), minilm_batch)
    assert_same_outputs(loaded, hf_minilm, minilm_batch)
    reloaded, info = fastbert.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert_loading_clean(info)
    assert_same_outputs(reloaded.eval(), hf_minilm, minilm_batch)


@pytest.mark.parametrize("name", ALL_CLASSES)
def test_save_pretrained_round_trips_both_ways(name, make_config, make_pair, make_batch, tmp_path):
    config = config_for(name, make_config)
    hf, fb = make_pair(name, config, seed=2)
    batch = inputs_for(name, config, make_batch)
    fb.save_pretrained(tmp_path / "fb")
    hf.save_pretrained(tmp_path / "hf")
    tensor_keys = []
    for d in ("fb", "hf"):
        with safe_open(str(tmp_path / d / "model.safetensors"), "pt") as f:
            tensor_keys.append(set(f.keys()))
    assert tensor_keys[0] == tensor_keys[1], "fastbert and transformers write different checkpoint keys"

    hf_loaded, info = getattr(transformers, name).from_pretrained(tmp_path / "fb", output_loading_info=True,
                                                                  attn_implementation="eager")
    assert_loading_clean(info)
    assert_same_outputs(fb, hf_loaded.eval(), batch)
    fb_loaded, info = getattr(fastbert, name).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert_loading_clean(info)
    assert type(fb_loaded) is getattr(fastbert, name)
    assert_same_outputs(fb_loaded.eval(), hf, batch)
    if name in MLM_CLASSES:
        assert_tied(fb_loaded)


@pytest.mark.parametrize("drop_decoder", [False, True], ids=["full", "no-decoder-keys"])
def test_pytorch_model_bin_checkpoint(drop_decoder, make_config, make_pair, make_batch, tmp_path):
    """A torch.save'd state dict + config.json, as older checkpoints ship: legacy position_ids buffer included, and
    (older still) without the decoder keys, which are tied to the embeddings and the output bias."""
    config = make_config()
    hf, _ = make_pair("BertForMaskedLM", config, seed=3)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    if drop_decoder:
        del state["cls.predictions.decoder.weight"], state["cls.predictions.decoder.bias"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    config.save_pretrained(tmp_path)
    fb, info = fastbert.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert_loading_clean(info)
    assert_tied(fb)
    assert_same_outputs(fb.eval(), hf, make_batch(config))


def test_tied_decoder_follows_embedding_updates(make_config, make_pair, make_batch, tmp_path):
    config = make_config()
    hf, fb = make_pair("BertForMaskedLM", config, seed=4)
    fb.save_pretrained(tmp_path)
    fb = fastbert.BertForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for model in (fb, hf):
            model.get_input_embeddings().weight.mul_(1.5)
            model.cls.predictions.bias.add_(0.25)
    assert_same_outputs(fb, hf, make_batch(config))


def test_resize_token_embeddings_keeps_decoder_tied(make_config, make_pair):
    config = make_config()
    hf, fb = make_pair("BertForMaskedLM", config, seed=5)
    new_size = config.vocab_size + 7
    for model in (hf, fb):
        model.resize_token_embeddings(new_size)
        assert model.config.vocab_size == new_size
        assert model.get_output_embeddings().weight.shape == (new_size, config.hidden_size)
        assert model.cls.predictions.bias.shape == (new_size,)
    assert_tied(fb)
    assert set(fb.state_dict()) == set(hf.state_dict())
    ids = torch.tensor([[1, new_size - 1, 3]])
    with torch.no_grad():
        assert fb(ids).logits.shape == (1, 3, new_size)


def test_from_pretrained_dtype(minilm_path, minilm_batch):
    fb = fastbert.BertModel.from_pretrained(minilm_path, dtype=torch.bfloat16).eval()
    hf = transformers.BertModel.from_pretrained(minilm_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in fb.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = fb(**minilm_batch).last_hidden_state
        ref = hf(**minilm_batch).last_hidden_state
    assert out.dtype == torch.bfloat16
    mask = minilm_batch["attention_mask"].bool()
    assert (out - ref)[mask].abs().max().item() <= 0.25  # a loose sanity bar; bf16 accuracy is judged elsewhere
