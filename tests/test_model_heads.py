"""Every task head against its transformers twin (same weights) and against the float64 NumPy reference.

Logits, losses, hidden_states / attentions pass-through, output classes and field names, and the return_dict=False
tuple layout. Small random configs (every parameter re-drawn with a seed), plus the MiniLM weights for the masked-LM
and sequence-classification heads (head randomly initialized by transformers, then copied into fastbert).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastbert.reference import BertReference, cross_entropy_ref

ATOL = 1e-5
HEADS = [
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertForNextSentencePrediction",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMultipleChoice",
]
# head -> (reference method, output fields it returns, in order)
REFERENCE = {
    "BertForPreTraining": ("pretraining_logits", ("prediction_logits", "seq_relationship_logits")),
    "BertForMaskedLM": ("masked_lm_logits", ("logits",)),
    "BertForNextSentencePrediction": ("next_sentence_logits", ("logits",)),
    "BertForSequenceClassification": ("sequence_classification_logits", ("logits",)),
    "BertForTokenClassification": ("token_classification_logits", ("logits",)),
    "BertForQuestionAnswering": ("question_answering_logits", ("start_logits", "end_logits")),
    "BertForMultipleChoice": ("multiple_choice_logits", ("logits",)),
}


def compare(fb_value, hf_value, mask, what, atol=ATOL):
    """Recursive comparison; tensors whose leading dims are mask's (B, T) (attentions: batch and query) are compared
    at the real positions only."""
    if isinstance(hf_value, tuple):
        assert isinstance(fb_value, tuple) and len(fb_value) == len(hf_value), what
        for i, (a, b) in enumerate(zip(fb_value, hf_value, strict=True)):
            compare(a, b, mask, f"{what}[{i}]", atol)
        return
    assert isinstance(fb_value, torch.Tensor), f"{what}: {type(fb_value)}"
    assert fb_value.shape == hf_value.shape and fb_value.dtype == hf_value.dtype, what
    diff = (fb_value.detach().double() - hf_value.detach().double()).abs()
    if diff.dim() == 4:
        diff = diff.transpose(1, 2)
    if diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
        diff = diff[mask.bool()]
    assert diff.max().item() <= atol, f"{what}: max abs diff {diff.max().item():.3g} > {atol:g}"


def head_config(name, make_config):
    return make_config(num_labels=2 if name == "BertForQuestionAnswering" else 3)  # QA: start and end


def head_inputs(name, config, make_batch, seed=0):
    """(model inputs incl. labels, (B, T) real-token mask of the encoder's rows)."""
    gen = torch.Generator().manual_seed(seed + 1)
    if name == "BertForMultipleChoice":
        batch = make_batch(config, batch=2, seqlen=9, seed=seed, num_choices=3)
        batch["labels"] = torch.tensor([2, 0])
        return batch, batch["attention_mask"].reshape(-1, 9)
    batch = make_batch(config, seed=seed)
    mask = batch["attention_mask"]
    n, seqlen = mask.shape
    token_labels = torch.randint(0, config.vocab_size, (n, seqlen), generator=gen).masked_fill(mask == 0, -100)
    token_labels[0, ::2] = -100
    if name == "BertForPreTraining":
        batch.update(labels=token_labels, next_sentence_label=torch.tensor([0, 1, 1]))
    elif name == "BertForMaskedLM":
        batch["labels"] = token_labels
    elif name == "BertForNextSentencePrediction":
        batch["labels"] = torch.tensor([1, 0, 1])
    elif name == "BertForSequenceClassification":
        batch["labels"] = torch.tensor([2, 0, 1])
    elif name == "BertForTokenClassification":
        batch["labels"] = (token_labels % config.num_labels).masked_fill(token_labels == -100, -100)
    elif name == "BertForQuestionAnswering":  # the last pair is out of range: clamped and ignored by the loss
        batch.update(start_positions=torch.tensor([1, 4, seqlen + 5]), end_positions=torch.tensor([3, 4, seqlen + 9]))
    return batch, mask


def reference_loss(name, logits, batch):
    """The loss from the reference logits (tuple in REFERENCE's field order), as transformers defines it."""
    if name == "BertForPreTraining":
        return (cross_entropy_ref(logits[0], batch["labels"].numpy())
                + cross_entropy_ref(logits[1], batch["next_sentence_label"].numpy()))
    if name == "BertForQuestionAnswering":
        seqlen = logits[0].shape[1]
        start = batch["start_positions"].clamp(0, seqlen).numpy()
        end = batch["end_positions"].clamp(0, seqlen).numpy()
        return (cross_entropy_ref(logits[0], start, seqlen) + cross_entropy_ref(logits[1], end, seqlen)) / 2
    return cross_entropy_ref(logits[0], batch["labels"].numpy())


@pytest.mark.parametrize("name", HEADS)
@torch.no_grad()
def test_head_matches_transformers(name, make_config, make_pair, make_batch):
    config = head_config(name, make_config)
    hf, fb = make_pair(name, config, seed=3)
    batch, mask = head_inputs(name, config, make_batch)
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    hf_out, fb_out = hf(**batch, **kwargs), fb(**batch, **kwargs)
    assert type(fb_out) is type(hf_out)
    assert list(fb_out.keys()) == list(hf_out.keys())
    assert fb_out.loss is not None and fb_out.loss.dim() == 0
    # QA's loss is a softmax over every position, padding included, and padded positions hold 0 in fastbert
    # (documented): its loss is checked against the reference, and against transformers on an unpadded batch below.
    padded_loss_differs = name == "BertForQuestionAnswering"
    for key in hf_out.keys():
        if not (key == "loss" and padded_loss_differs):
            compare(fb_out[key], hf_out[key], mask, f"{name}.{key}")
    # return_dict=False: same tuple (loss first), and without labels: no loss
    fb_tuple, hf_tuple = fb(**batch, return_dict=False), hf(**batch, return_dict=False)
    if padded_loss_differs:
        fb_tuple, hf_tuple = fb_tuple[1:], hf_tuple[1:]
        unpadded = {k: v[:, :5] if v.dim() == 2 else v for k, v in batch.items()}
        assert bool(unpadded["attention_mask"].all())
        compare(fb(**unpadded).loss, hf(**unpadded).loss, mask, f"{name}.loss without padding")
    compare(fb_tuple, hf_tuple, mask, f"{name} tuple")
    no_labels = {k: v for k, v in batch.items() if "label" not in k and "positions" not in k}
    fb_plain, hf_plain = fb(**no_labels), hf(**no_labels)
    assert fb_plain.loss is None and list(fb_plain.keys()) == list(hf_plain.keys())


@pytest.mark.parametrize("name", HEADS)
@torch.no_grad()
def test_head_matches_reference(name, make_config, make_pair, make_batch):
    config = head_config(name, make_config)
    hf, fb = make_pair(name, config, seed=4)
    batch, mask = head_inputs(name, config, make_batch, seed=1)
    method, fields = REFERENCE[name]
    reference = BertReference(config, hf.state_dict())
    ref_inputs = {k: batch[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
    ref_logits = getattr(reference, method)(**ref_inputs)
    ref_logits = ref_logits if isinstance(ref_logits, tuple) else (ref_logits,)
    out = fb(**batch)
    for field, expected in zip(fields, ref_logits, strict=True):
        compare(out[field], torch.from_numpy(expected).float(), mask, f"{name}.{field} vs reference")
    ref_loss = reference_loss(name, ref_logits, batch)
    assert abs(out.loss.item() - ref_loss) <= ATOL, (out.loss.item(), ref_loss)


@pytest.mark.parametrize(
    "problem_type, num_labels, label_kind",
    [
        (None, 3, "class"),
        (None, 1, "regression"),
        (None, 3, "multi_label"),
        ("regression", 3, "multi_regression"),
        ("multi_label_classification", 2, "multi_label"),
    ],
)
@torch.no_grad()
def test_sequence_classification_problem_types(problem_type, num_labels, label_kind, make_config, make_pair,
                                               make_batch):
    config = make_config(num_labels=num_labels, problem_type=problem_type)
    hf, fb = make_pair("BertForSequenceClassification", config, seed=5)
    batch = make_batch(config)
    gen = torch.Generator().manual_seed(0)
    labels = {
        "class": lambda: torch.tensor([2, 0, 1]),
        "regression": lambda: torch.randn(3, generator=gen),
        "multi_label": lambda: torch.randint(0, 2, (3, num_labels), generator=gen).float(),
        "multi_regression": lambda: torch.randn(3, num_labels, generator=gen),
    }[label_kind]()
    hf_out, fb_out = hf(**batch, labels=labels), fb(**batch, labels=labels)
    assert fb.config.problem_type == hf.config.problem_type is not None
    compare(fb_out.logits, hf_out.logits, batch["attention_mask"], "logits")
    assert abs(fb_out.loss.item() - hf_out.loss.item()) <= ATOL
    logits = BertReference(config, hf.state_dict()).sequence_classification_logits(
        **{k: v.numpy() for k, v in batch.items()}
    )
    y = labels.numpy().astype(np.float64)
    if hf.config.problem_type == "regression":
        expected = float(((logits.reshape(y.shape) - y) ** 2).mean())
    elif hf.config.problem_type == "multi_label_classification":
        expected = float((np.logaddexp(0, logits) - y * logits).mean())
    else:
        expected = cross_entropy_ref(logits, labels.numpy())
    assert abs(fb_out.loss.item() - expected) <= ATOL, (fb_out.loss.item(), expected)


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForSequenceClassification"])
@torch.no_grad()
def test_minilm_heads(name, minilm_heads, minilm_batch, tokenizer):
    hf, fb = minilm_heads[name]
    batch = dict(minilm_batch)
    mask = batch["attention_mask"]
    if name == "BertForMaskedLM":
        masked = torch.zeros_like(mask, dtype=torch.bool)
        masked[:, 2] = masked[2, 5:9] = True
        batch["labels"] = batch["input_ids"].masked_fill(~masked, -100)
        batch["input_ids"] = batch["input_ids"].masked_fill(masked, tokenizer.mask_token_id)
        field, method = "logits", "masked_lm_logits"
    else:
        batch["labels"] = torch.tensor([0, 2, 1, 1])
        field, method = "logits", "sequence_classification_logits"
    hf_out, fb_out = hf(**batch), fb(**batch)
    assert type(fb_out) is type(hf_out) and list(fb_out.keys()) == list(hf_out.keys())
    compare(fb_out[field], hf_out[field], mask, f"{name}.{field}")
    assert abs(fb_out.loss.item() - hf_out.loss.item()) <= ATOL
    reference = BertReference(hf.config, hf.state_dict())
    ref_logits = getattr(reference, method)(**{k: v.numpy() for k, v in batch.items() if k != "labels"})
    compare(fb_out[field], torch.from_numpy(ref_logits).float(), mask, f"{name}.{field} vs reference")
    assert abs(fb_out.loss.item() - cross_entropy_ref(ref_logits, batch["labels"].numpy())) <= ATOL
