"""Drop-in fidelity in training (issue 15, items 6, 8, 9): MLM logits shape, labels checks, gradient checkpointing.

Same weights in transformers (eager) and fastbert, dropout off so that training-mode outputs are deterministic;
fp32 values to 1e-5 as in test_model_vs_transformers.py.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from transformers.modeling_layers import GradientCheckpointingLayer

import fastbert

ATOL = 1e-5
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def load_pair(path, class_name, seed=0, **kwargs):
    """(transformers, fastbert) ``class_name`` from the MiniLM checkpoint; transformers draws the missing head
    weights with ``seed`` and fastbert gets a copy of the whole state dict."""
    torch.manual_seed(seed)
    hf = getattr(transformers, class_name).from_pretrained(path, attn_implementation="eager", **kwargs)
    fb = getattr(fastbert, class_name).from_pretrained(path, **kwargs)
    fb.load_state_dict(hf.state_dict(), strict=True)
    return hf, fb


def mlm_labels(batch, every=3):
    """MLM targets: the input id at every ``every``-th real token (from 1), -100 elsewhere."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pick = (torch.arange(ids.shape[1])[None, :] % every == 1) & mask.bool()
    return torch.where(pick, ids, torch.full_like(ids, -100))


# ---------------------------------------------------------------------------------------------------------------
# 6. MLM logits shape in training mode


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
def test_mlm_training_logits_shape_and_loss(minilm_path, minilm_batch, name):
    hf, fb = load_pair(minilm_path, name, **NO_DROPOUT)
    labels = mlm_labels(minilm_batch)
    kwargs = {"labels": labels}
    if name == "BertForPreTraining":
        kwargs["next_sentence_label"] = torch.tensor([0, 1, 1, 0])
    hf.train()
    fb.train()
    hf_out = hf(**minilm_batch, **kwargs)
    fb_out = fb(**minilm_batch, **kwargs)
    field = "prediction_logits" if name == "BertForPreTraining" else "logits"
    batch_size, seqlen = minilm_batch["input_ids"].shape
    assert hf_out[field].shape == (batch_size, seqlen, hf.config.vocab_size)
    assert fb_out[field].shape == hf_out[field].shape, f"default {field} shape {tuple(fb_out[field].shape)}"
    real = minilm_batch["attention_mask"].bool()
    err = (fb_out[field] - hf_out[field]).detach()[real].abs().max().item()
    bound = ATOL * max(1.0, hf_out[field].detach()[real].abs().max().item())  # tests/ops' FP32_TIGHT scaling
    assert err <= bound, f"{field} at real tokens: {err:.3g} > {bound:.3g}"
    assert abs(fb_out.loss.item() - hf_out.loss.item()) <= ATOL, f"loss {fb_out.loss.item()} != {hf_out.loss.item()}"

    # opt-in: the labelled positions only, same loss
    fb.config.sparse_mlm_logits = True
    sparse = fb(**minilm_batch, **kwargs)
    labelled = labels != -100
    assert sparse[field].shape == (int(labelled.sum()), hf.config.vocab_size)
    err = (sparse[field] - hf_out[field][labelled]).detach().abs().max().item()
    assert err <= bound, f"sparse {field}: {err:.3g} > {bound:.3g}"
    assert abs(sparse.loss.item() - hf_out.loss.item()) <= ATOL


# ---------------------------------------------------------------------------------------------------------------
# 8. labels out of range or of the wrong shape: ValueError naming the argument and the valid range


def _assert_labels_error(excinfo, argument, num_classes):
    msg = str(excinfo.value)
    assert argument in msg, f"the message must name {argument!r}: {msg}"
    # the valid range: [0, n) or 0..n-1 (a number not preceded by a minus sign or digit)
    assert re.search(rf"(?<![\d-])({num_classes}|{num_classes - 1})(?!\d)", msg), f"no valid range in: {msg}"


@pytest.fixture
def label_config(make_config):
    return make_config(vocab_size=30522, num_labels=2, **NO_DROPOUT)


def _label_case(name, config, batch):
    """(model inputs without labels, {argument: (bad values..., number of classes)}, -100 allowed)."""
    b, t = batch["input_ids"].shape[:2]
    if name == "BertForSequenceClassification":
        return batch, {"labels": ([5, -1], 2)}, False, (b,)
    if name == "BertForTokenClassification":
        return batch, {"labels": ([2, -1], 2)}, True, (b, t)
    if name == "BertForMaskedLM":
        return batch, {"labels": ([30522, 40000, -1], 30522)}, True, (b, t)
    if name == "BertForPreTraining":
        return batch, {"labels": ([30522, -1], 30522), "next_sentence_label": ([2, -1], 2)}, True, (b, t)
    if name == "BertForNextSentencePrediction":
        return batch, {"labels": ([2, -1], 2)}, False, (b,)
    if name == "BertForMultipleChoice":
        return batch, {"labels": ([2, -1], 2)}, False, (b,)
    raise AssertionError(name)


LABELLED_HEADS = ["BertForSequenceClassification", "BertForTokenClassification", "BertForMaskedLM",
                  "BertForPreTraining", "BertForNextSentencePrediction", "BertForMultipleChoice"]


def _valid_labels(name, shape, b, mask):
    gen = torch.Generator().manual_seed(0)
    labels = {"labels": torch.randint(0, 2, shape, generator=gen)}
    if len(shape) == 2:  # token targets: -100 at padding, as tokenizers' label alignment and the collators give
        labels["labels"].masked_fill_(mask == 0, -100)
    if name == "BertForPreTraining":
        labels["next_sentence_label"] = torch.randint(0, 2, (b,), generator=gen)
    return labels


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", LABELLED_HEADS)
def test_labels_out_of_range_raise_value_error(make_pair, make_batch, label_config, name, mode):
    hf, fb = make_pair(name, label_config)
    fb.train(mode == "train")
    num_choices = 2 if name == "BertForMultipleChoice" else None
    batch = make_batch(label_config, batch=3, seqlen=7, num_choices=num_choices)
    inputs, bad, allows_ignore, shape = _label_case(name, label_config, batch)
    b = inputs["input_ids"].shape[0]
    for argument, (values, num_classes) in bad.items():
        for value in values:
            labels = _valid_labels(name, shape, b, inputs["attention_mask"])
            labels[argument] = labels[argument].clone()
            labels[argument].view(-1)[-1] = value
            with pytest.raises(ValueError) as excinfo:
                fb(**inputs, **labels)
            _assert_labels_error(excinfo, argument, num_classes)
        # wrong shape: one target too many
        labels = _valid_labels(name, shape, b, inputs["attention_mask"])
        wrong = labels[argument]
        labels[argument] = torch.cat([wrong.view(-1), wrong.view(-1)[:1]])
        with pytest.raises(ValueError) as excinfo:
            fb(**inputs, **labels)
        assert argument in str(excinfo.value), str(excinfo.value)
    if allows_ignore:  # -100 is "ignore this token", as in transformers
        labels = _valid_labels(name, shape, b, inputs["attention_mask"])
        labels["labels"][0, :2] = -100
        hf.train(fb.training)
        with torch.no_grad():
            fb_loss, hf_loss = fb(**inputs, **labels).loss, hf(**inputs, **labels).loss
        assert abs(fb_loss.item() - hf_loss.item()) <= ATOL, f"loss with -100: {fb_loss.item()} != {hf_loss.item()}"


# ---------------------------------------------------------------------------------------------------------------
# 9. gradient checkpointing as transformers 5 does it

GC_HEADS = ["BertModel", "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
            "BertForMaskedLM", "BertForPreTraining", "BertForNextSentencePrediction", "BertForMultipleChoice"]


def _gc_inputs(name, config, make_batch):
    num_choices = 2 if name == "BertForMultipleChoice" else None
    # QA's loss is a softmax over all T positions, padding included, where fastbert's hidden states are zeros and
    # transformers' are not: compared without padding
    pad = name != "BertForQuestionAnswering"
    batch = make_batch(config, batch=3, seqlen=9, num_choices=num_choices, pad=pad)
    b, t = batch["input_ids"].shape[:2]
    gen = torch.Generator().manual_seed(1)
    if name in ("BertForSequenceClassification", "BertForNextSentencePrediction", "BertForMultipleChoice"):
        batch["labels"] = torch.randint(0, 2, (b,), generator=gen)
    elif name == "BertForTokenClassification":
        labels = torch.randint(0, config.num_labels, (b, t), generator=gen)
        batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
    elif name == "BertForQuestionAnswering":  # answers inside every row's real tokens
        shortest = int(batch["attention_mask"].sum(-1).min())
        batch["start_positions"] = torch.randint(0, shortest, (b,), generator=gen)
        batch["end_positions"] = torch.randint(0, shortest, (b,), generator=gen)
    elif name in ("BertForMaskedLM", "BertForPreTraining"):
        batch["labels"] = mlm_labels(batch, every=2)
        if name == "BertForPreTraining":
            batch["next_sentence_label"] = torch.randint(0, 2, (b,), generator=gen)
    return batch


def _loss(name, out, batch):
    if name == "BertModel":  # real tokens only: padded positions are not compared with transformers
        real = batch["attention_mask"][..., None]
        return (out.last_hidden_state * real).square().mean() + out.pooler_output.sum()
    return out.loss


def _run_counting(model, name, batch):
    """loss, {name: grad}, and how many times layer 0's intermediate ran (twice per step when checkpointed) and
    layer 0's own forward hook ran (once: transformers 5 checkpoints ``forward``, keeping module hooks outside)."""
    inner, outer = [], []
    base = model if name == "BertModel" else model.bert
    handles = [base.encoder.layer[0].intermediate.register_forward_hook(lambda *args: inner.append(1)),
               base.encoder.layer[0].register_forward_hook(lambda *args: outer.append(1))]
    try:
        model.zero_grad(set_to_none=True)
        loss = _loss(name, model(**batch), batch)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, (len(inner), len(outer))


@pytest.mark.parametrize("name", GC_HEADS)
def test_encoder_layers_are_gradient_checkpointing_layers(make_config, name):
    model = getattr(fastbert, name)(make_config())
    base = model if name == "BertModel" else model.bert
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in base.encoder.layer)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("name", GC_HEADS)
def test_gradient_checkpointing_matches_plain_run(make_config, make_pair, make_batch, name, use_reentrant):
    config = make_config(num_labels=2, **NO_DROPOUT)
    hf, fb = make_pair(name, config)
    batch = _gc_inputs(name, config, make_batch)
    hf.train()
    fb.train()
    hf_loss, hf_grads, _ = _run_counting(hf, name, batch)
    plain_loss, plain_grads, plain_calls = _run_counting(fb, name, batch)
    fb.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert fb.is_gradient_checkpointing
    gc_loss, gc_grads, gc_calls = _run_counting(fb, name, batch)
    assert plain_calls == (1, 1)
    assert gc_calls[0] == 2, f"layer 0's intermediate ran {gc_calls[0]} times: not recomputed in backward"
    assert gc_calls[1] == 1, f"layer 0's forward hook ran {gc_calls[1]} times: hooks must stay outside the recompute"
    assert abs(plain_loss.item() - hf_loss.item()) <= ATOL
    assert abs(gc_loss.item() - plain_loss.item()) <= ATOL
    assert gc_grads.keys() == plain_grads.keys() == hf_grads.keys()
    for key, ref in plain_grads.items():
        err = (gc_grads[key] - ref).abs().max().item()
        assert err <= ATOL * max(1.0, ref.abs().max().item()), f"grad {key}: checkpointed vs plain {err:.3g}"
    fb.gradient_checkpointing_disable()
    assert not fb.is_gradient_checkpointing
    assert _run_counting(fb, name, batch)[2] == (1, 1)
