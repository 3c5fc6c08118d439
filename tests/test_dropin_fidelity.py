"""Drop-in fidelity (issue 15): code that is correct on transformers gives the same answer on fastbert.

Every test runs the same user code on transformers (eager attention) and on fastbert with the same weights (the
all-MiniLM-L6-v2 checkpoint; seeded random task heads loaded into both) and compares values: fp32 to 1e-5 at real
tokens, as in test_model_vs_transformers.py. Under autocast, the accuracy rule of tests/ops: fastbert's error
against the fp32 result is at most 2 x transformers' error under the same autocast + atol. Training-side items
(labels checks, MLM logits shape, gradient checkpointing) are in test_dropin_training.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import fastbert

ATOL = 1e-5
BF16_ATOL = 1e-3  # the op tests' bf16 atol (tests/ops/_ops_helpers.py)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def real_diff(actual, expected, mask=None) -> float:
    """max |actual - expected| over the (B, T) positions where mask is true (everything without a mask)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.detach().double() - expected.detach().double()).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return diff.max().item()


def assert_real_close(actual, expected, mask=None, atol=ATOL, what="output"):
    """fp32 rule of tests/ops (FP32_TIGHT): max abs diff <= atol at unit scale, atol * max|expected| above it
    (pre-LayerNorm activations and vocabulary logits reach ~10-20)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = real_diff(actual, expected, mask)
    bound = atol * max(1.0, real_diff(expected, torch.zeros_like(expected), mask))
    assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"


def load_pair(path, class_name="BertModel", seed=0, **kwargs):
    """(transformers, fastbert) ``class_name`` from the MiniLM checkpoint, eval mode; transformers draws the missing
    head weights with ``seed`` and fastbert gets a copy of the whole state dict."""
    torch.manual_seed(seed)
    hf = getattr(transformers, class_name).from_pretrained(path, attn_implementation="eager", **kwargs)
    fb = getattr(fastbert, class_name).from_pretrained(path, **kwargs)
    fb.load_state_dict(hf.state_dict(), strict=True)
    return hf.eval(), fb.eval()


@pytest.fixture(scope="module")
def left_tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path, padding_side="left")


@pytest.fixture(scope="module")
def left_batch(left_tokenizer, sentences):
    batch = dict(left_tokenizer(sentences, padding=True, return_tensors="pt"))
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    return batch


@pytest.fixture(scope="module")
def full_batch(tokenizer, sentences):
    """Three sentences truncated to 9 tokens: no padding at all."""
    batch = dict(tokenizer([sentences[i] for i in (0, 2, 3)], truncation=True, max_length=9, padding=True,
                           return_tensors="pt"))
    assert batch["attention_mask"].all()
    return batch


# ---------------------------------------------------------------------------------------------------------------
# 1. weights edited in place show in the next forward


def _edit_data_add(model, gen):
    model.encoder.layer[0].attention.self.query.weight.data.add_(1)


def _edit_prune(model, gen):
    model.encoder.layer[1].attention.self.value.weight.data[:, :] = 0


def _edit_ema(model, gen):
    for p in model.parameters():
        p.data.mul_(0.5)


def _edit_copy_no_grad(model, gen):
    w = model.encoder.layer[2].attention.self.key.weight
    with torch.no_grad():
        w.copy_(0.1 * torch.randn(w.shape, generator=gen))


def _edit_assign_data(model, gen):
    w = model.encoder.layer[3].attention.self.query.weight
    w.data = 0.1 * torch.randn(w.shape, generator=gen)


@pytest.fixture(scope="module")
def pristine_pair(minilm_path):
    """Never run or edited: each weight-edit test works on deep copies."""
    return load_pair(minilm_path)


EDITS = {"data_add_": _edit_data_add, "data_prune": _edit_prune, "ema_mul_": _edit_ema,
         "no_grad_copy_": _edit_copy_no_grad, "assign_data": _edit_assign_data}
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("edit", list(EDITS))
def test_weight_edit_shows_in_next_forward(pristine_pair, minilm_batch, edit, mode):
    hf, fb = (copy.deepcopy(model) for model in pristine_pair)
    mask = minilm_batch["attention_mask"]
    with GRAD_MODES[mode]():
        before = fb(**minilm_batch)  # warms any cache of derived weights
        fb(**minilm_batch)
    for model in (hf, fb):
        EDITS[edit](model, torch.Generator().manual_seed(0))
    with GRAD_MODES[mode]():
        fb_out = fb(**minilm_batch)
        hf_out = hf(**minilm_batch)
    assert real_diff(hf_out.last_hidden_state, before.last_hidden_state, mask) > 1e-3, "the edit must matter"
    assert_real_close(fb_out.last_hidden_state, hf_out.last_hidden_state, mask, what=f"{edit}: last_hidden_state")
    assert_real_close(fb_out.pooler_output, hf_out.pooler_output, what=f"{edit}: pooler_output")


# ---------------------------------------------------------------------------------------------------------------
# 2. tensors handed to user code are never overwritten later

HOOKED = ["intermediate", "output", "attention.self", "attention.output"]


def _capture(model, store):
    """Forward hooks on every layer's HOOKED submodules; keeps the output tensor itself (no copy)."""
    handles = []
    for i, layer in enumerate(model.encoder.layer):
        for name in HOOKED:
            def hook(module, args, output, key=(i, name)):
                store[key] = output[0] if isinstance(output, tuple) else output
            handles.append(layer.get_submodule(name).register_forward_hook(hook))
    return handles


@pytest.fixture(scope="module")
def minilm_pair(minilm_path):
    """A private (transformers, fastbert) BertModel pair: these tests attach hooks and flip config flags."""
    return load_pair(minilm_path)


@pytest.mark.parametrize("layout", ["no_padding", "padded_layout", "packed"])
def test_hooks_capture_matches_transformers(minilm_pair, minilm_batch, full_batch, layout):
    hf, fb = minilm_pair
    batch = full_batch if layout == "no_padding" else minilm_batch
    mask = batch["attention_mask"]
    hf_seen, fb_seen = {}, {}
    handles = _capture(hf, hf_seen) + _capture(fb, fb_seen)
    if layout == "padded_layout":
        fb.config.unpad_inputs = False
    try:
        with torch.no_grad():
            hf(**batch)
            fb(**batch)
    finally:
        for h in handles:
            h.remove()
        if layout == "padded_layout":
            del fb.config.unpad_inputs
    assert fb_seen.keys() == hf_seen.keys()
    for key, ref in hf_seen.items():
        got = fb_seen[key]
        if layout == "packed" and got.dim() == 2:  # documented: packed (tokens, C) inside the encoder with padding
            ref, real = ref[mask.bool()], None
        else:
            real = mask
        assert_real_close(got, ref, real, what=f"layer {key[0]} {key[1]} ({layout})")


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_returned_tensors_not_overwritten_by_later_forwards(minilm_pair, minilm_batch, full_batch, mode):
    hf, fb = minilm_pair
    with GRAD_MODES[mode]():
        fb_first = fb(**minilm_batch, output_hidden_states=True)
        fb_attn = fb(**full_batch, output_attentions=True)
        fb(**full_batch, output_hidden_states=True)  # later forwards must not write into what was returned
        fb(**minilm_batch)
        hf_first = hf(**minilm_batch, output_hidden_states=True)
        hf_attn = hf(**full_batch, output_attentions=True)
    mask = minilm_batch["attention_mask"]
    assert_real_close(fb_first.last_hidden_state, hf_first.last_hidden_state, mask, what="last_hidden_state")
    assert_real_close(fb_first.pooler_output, hf_first.pooler_output, what="pooler_output")
    for i, (a, b) in enumerate(zip(fb_first.hidden_states, hf_first.hidden_states, strict=True)):
        assert_real_close(a, b, mask, what=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(fb_attn.attentions, hf_attn.attentions, strict=True)):
        assert_real_close(a, b, what=f"attentions[{i}]")
    assert_real_close(fb_attn.last_hidden_state, hf_attn.last_hidden_state, what="last_hidden_state (attentions)")


# ---------------------------------------------------------------------------------------------------------------
# 3. left padding


@torch.no_grad()
def test_left_padding_base_model(minilm_pair, left_batch):
    hf, fb = minilm_pair
    hf_out, fb_out = hf(**left_batch), fb(**left_batch)
    mask = left_batch["attention_mask"]
    assert real_diff(hf_out.pooler_output[0], hf_out.pooler_output[1]) > 1e-2, "pooler output depends on the text"
    assert_real_close(fb_out.pooler_output, hf_out.pooler_output, what="pooler_output")
    assert_real_close(fb_out.last_hidden_state, hf_out.last_hidden_state, mask, what="last_hidden_state")


@pytest.fixture(scope="module")
def left_heads(minilm_path):
    pairs = {}
    for name, kwargs in [("BertForSequenceClassification", {"num_labels": 3}), ("BertForNextSentencePrediction", {}),
                         ("BertForMultipleChoice", {}), ("BertForTokenClassification", {"num_labels": 5}),
                         ("BertForQuestionAnswering", {})]:
        pairs[name] = load_pair(minilm_path, name, seed=len(pairs), **kwargs)
    return pairs


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "BertForNextSentencePrediction",
                                  "BertForMultipleChoice", "BertForTokenClassification", "BertForQuestionAnswering"])
@torch.no_grad()
def test_left_padding_heads(left_heads, left_tokenizer, sentences, name):
    hf, fb = left_heads[name]
    if name == "BertForMultipleChoice":  # (batch 2, 2 choices, T): a prompt with each of two endings
        enc = left_tokenizer([sentences[0], sentences[0], sentences[1], sentences[1]],
                             [sentences[2], sentences[3], sentences[3], sentences[2]], padding=True,
                             return_tensors="pt")
        batch = {k: v.view(2, 2, -1) for k, v in enc.items()}
    elif name == "BertForNextSentencePrediction":
        batch = dict(left_tokenizer(sentences[:2], sentences[2:], padding=True, return_tensors="pt"))
    else:
        batch = dict(left_tokenizer(sentences, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"]
    assert (mask[..., 0] == 0).any()
    hf_out, fb_out = hf(**batch), fb(**batch)
    if name == "BertForQuestionAnswering":
        for field in ("start_logits", "end_logits"):
            assert_real_close(fb_out[field], hf_out[field], mask, what=field)
    elif name == "BertForTokenClassification":
        assert_real_close(fb_out.logits, hf_out.logits, mask, what="logits")
    else:
        assert real_diff(hf_out.logits[0], hf_out.logits[1]) > 1e-3, "logits depend on the text"
        assert_real_close(fb_out.logits, hf_out.logits, what="logits")


# ---------------------------------------------------------------------------------------------------------------
# 4. packing by position_ids (DataCollatorWithFlattening's format)


def _flattened(tokenizer, texts, labels=None):
    features = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        feature = {"input_ids": ids}
        if labels is not None:
            feature["labels"] = [(7 * i + j) % labels for j in range(len(ids))]
        features.append(feature)
    return features


def test_transformers_keeps_packed_sequences_apart(minilm_pair, tokenizer, sentences):
    """What fastbert must match: transformers 5 (eager and sdpa) runs position_ids restarts as separate sequences."""
    hf, _ = minilm_pair
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")(_flattened(tokenizer, sentences))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        separate = torch.cat([hf(input_ids=torch.tensor([f["input_ids"]])).last_hidden_state
                              for f in _flattened(tokenizer, sentences)], dim=1)
        for impl in ("eager", "sdpa"):
            hf.set_attn_implementation(impl)
            try:
                packed = hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
            finally:
                hf.set_attn_implementation("eager")
            assert_real_close(packed, separate, what=f"transformers {impl}: packed vs separate")


def _packed_rows(tokenizer, texts, layout):
    """input_ids and position_ids (R, L), no attention_mask, in one of the layouts transformers reads as packed."""
    seqs = [tokenizer(text)["input_ids"] for text in texts]
    if layout == "collator":  # DataCollatorWithFlattening's output: one row, positions restart at 0
        batch = transformers.DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s} for s in seqs])
        return batch["input_ids"], batch["position_ids"]
    if layout == "two_rows":  # two rows of two sequences each, cut to the same length
        rows = [seqs[0] + seqs[1], seqs[2] + seqs[3]]
        pos = [list(range(len(seqs[0]))) + list(range(len(seqs[1]))),
               list(range(len(seqs[2]))) + list(range(len(seqs[3])))]
        length = min(len(r) for r in rows)
        return torch.tensor([r[:length] for r in rows]), torch.tensor([p[:length] for p in pos])
    ids = seqs[0] + seqs[2]
    if layout == "jump":  # transformers starts a new sequence wherever position_ids do not step by exactly 1
        pos = list(range(len(seqs[0]))) + list(range(20, 20 + len(seqs[2])))
    else:  # "offset": one sequence at positions 5, 6, ...: nothing to separate
        pos = list(range(5, 5 + len(ids)))
    return torch.tensor([ids]), torch.tensor([pos])


@pytest.mark.parametrize("layout", ["collator", "two_rows", "jump", "offset"])
@torch.no_grad()
def test_packed_position_ids_match_transformers(minilm_pair, tokenizer, sentences, layout):
    hf, fb = minilm_pair
    input_ids, position_ids = _packed_rows(tokenizer, sentences, layout)
    inputs = {"input_ids": input_ids, "position_ids": position_ids}
    hf_out, fb_out = hf(**inputs, output_hidden_states=True), fb(**inputs, output_hidden_states=True)
    assert_real_close(fb_out.last_hidden_state, hf_out.last_hidden_state, what="last_hidden_state")
    assert_real_close(fb_out.pooler_output, hf_out.pooler_output, what="pooler_output")
    for i, (a, b) in enumerate(zip(fb_out.hidden_states, hf_out.hidden_states, strict=True)):
        assert_real_close(a, b, what=f"hidden_states[{i}]")
    types = torch.randint(0, 2, input_ids.shape, generator=torch.Generator().manual_seed(0))
    hf_out, fb_out = hf(**inputs, token_type_ids=types), fb(**inputs, token_type_ids=types)
    assert_real_close(fb_out.last_hidden_state, hf_out.last_hidden_state, what="last_hidden_state (token types)")


def test_packed_token_classification_loss_and_grads(minilm_path, tokenizer, sentences):
    hf, fb = load_pair(minilm_path, "BertForTokenClassification", num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    batch = transformers.DataCollatorWithFlattening(return_tensors="pt")(_flattened(tokenizer, sentences, labels=3))
    losses, grads = [], []
    for model in (hf, fb):
        model.train()
        out = model(**batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert_real_close(losses[1], losses[0], what="loss")
    for name in ("classifier.weight", "bert.encoder.layer.5.output.dense.weight",
                 "bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.position_embeddings.weight"):
        assert_real_close(grads[1][name], grads[0][name], atol=1e-4 * max(1.0, grads[0][name].abs().max().item()),
                          what=f"grad {name}")


@pytest.mark.slow
def test_trainer_with_flattening_collator(minilm_path, tokenizer, sentences, tmp_path):
    """transformers' Trainer + DataCollatorWithFlattening fine-tunes fastbert's token classifier exactly as it
    fine-tunes transformers' (3 SGD steps, dropout off): same loss at every step, same weights after."""
    texts = sentences * 3
    data = _flattened(tokenizer, texts, labels=3)
    results = []
    for lib in ("hf", "fb"):
        hf, fb = load_pair(minilm_path, "BertForTokenClassification", num_labels=3, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
        model = hf if lib == "hf" else fb
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / lib), max_steps=3, per_device_train_batch_size=4, learning_rate=0.05,
            optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, seed=0,
            save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       data_collator=transformers.DataCollatorWithFlattening())
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        results.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (hf_losses, hf_params), (fb_losses, fb_params) = results
    assert len(hf_losses) == len(fb_losses) == 3
    for step, (a, b) in enumerate(zip(fb_losses, hf_losses, strict=True)):
        assert abs(a - b) <= ATOL * max(1.0, abs(b)), f"step {step}: loss {a} != {b}"
    for name, ref in hf_params.items():
        assert_real_close(fb_params[name], ref, atol=1e-4 * max(1.0, ref.abs().max().item()), what=name)


# ---------------------------------------------------------------------------------------------------------------
# 5. torch.autocast (CPU bf16), inference and training


def _assert_autocast_rule(fb_value, hf_value, ref, mask=None, what="output"):
    """fastbert under autocast vs the fp32 result: at most 2 x transformers' error under autocast + atol."""
    assert fb_value.dtype == hf_value.dtype, f"{what}: dtype {fb_value.dtype} != transformers' {hf_value.dtype}"
    fb_err, hf_err = real_diff(fb_value, ref, mask), real_diff(hf_value, ref, mask)
    atol = BF16_ATOL * max(1.0, ref.abs().max().item())
    assert fb_err <= 2 * hf_err + atol, f"{what}: error {fb_err:.3g} > 2 x transformers' {hf_err:.3g} + {atol:.1g}"


@pytest.fixture(scope="module")
def autocast_models(minilm_path):
    return {name: load_pair(minilm_path, name, **kwargs) for name, kwargs in [
        ("BertModel", {}), ("BertForMaskedLM", {}), ("BertForSequenceClassification", {"num_labels": 3})]}


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
@torch.no_grad()
def test_autocast_inference(autocast_models, minilm_batch, full_batch, name, padded):
    hf, fb = autocast_models[name]
    batch = minilm_batch if padded else full_batch
    mask = batch["attention_mask"]
    ref = hf(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_out = hf(**batch)
        fb_out = fb(**batch)
    if name == "BertModel":
        _assert_autocast_rule(fb_out.last_hidden_state, hf_out.last_hidden_state, ref.last_hidden_state, mask,
                              what="last_hidden_state")
        _assert_autocast_rule(fb_out.pooler_output, hf_out.pooler_output, ref.pooler_output, what="pooler_output")
    else:
        _assert_autocast_rule(fb_out.logits, hf_out.logits, ref.logits, mask if name == "BertForMaskedLM" else None,
                              what="logits")


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_autocast_training(minilm_path, minilm_batch, full_batch, padded):
    hf, fb = load_pair(minilm_path, "BertForSequenceClassification", num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    batch = dict(minilm_batch if padded else full_batch)
    batch["labels"] = torch.arange(batch["input_ids"].shape[0]) % 3
    watched = ["classifier.weight", "bert.encoder.layer.3.intermediate.dense.weight",
               "bert.encoder.layer.0.attention.self.value.weight", "bert.embeddings.LayerNorm.weight"]

    def run(model, autocast):
        model.train()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if n in watched}

    ref, ref_grads = run(hf, False)
    hf_out, hf_grads = run(hf, True)
    fb_out, fb_grads = run(fb, True)
    _assert_autocast_rule(fb_out.logits, hf_out.logits, ref.logits, what="logits")
    _assert_autocast_rule(fb_out.loss.detach(), hf_out.loss.detach(), ref.loss.detach(), what="loss")
    for name in watched:
        assert fb_grads[name].dtype == hf_grads[name].dtype == torch.float32
        _assert_autocast_rule(fb_grads[name], hf_grads[name], ref_grads[name], what=f"grad {name}")


# ---------------------------------------------------------------------------------------------------------------
# 7. torch.jit.trace with another padding pattern


def test_jit_trace_other_padding(minilm_pair, tokenizer, sentences):
    hf, fb = minilm_pair
    traced_on = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    other = dict(tokenizer(sentences[::-1], padding=True, return_tensors="pt"))
    assert traced_on["input_ids"].shape == other["input_ids"].shape
    assert not torch.equal(traced_on["attention_mask"], other["attention_mask"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        fb.config.return_dict = False
        try:
            traced = torch.jit.trace(fb, tuple(traced_on[n] for n in names), strict=False, check_trace=False)
        finally:
            fb.config.return_dict = True
        for batch in (traced_on, other):
            out = traced(*(batch[n] for n in names))
            ref = hf(**batch)
            mask = batch["attention_mask"]
            assert_real_close(out[0], ref.last_hidden_state, mask, what="traced last_hidden_state")
            assert_real_close(out[1], ref.pooler_output, what="traced pooler_output")


# ---------------------------------------------------------------------------------------------------------------
# 10. attention implementation switches

ATTN_IMPLEMENTATIONS = ["eager", "sdpa", "flash_attention_2", "flex_attention"]


@pytest.mark.parametrize("impl", ATTN_IMPLEMENTATIONS)
def test_from_pretrained_attn_implementation(minilm_path, hf_minilm, minilm_batch, impl):
    fb = fastbert.BertModel.from_pretrained(minilm_path, attn_implementation=impl).eval()
    assert fb.config._attn_implementation == impl
    with torch.no_grad():
        out, ref = fb(**minilm_batch), hf_minilm(**minilm_batch)
    assert_real_close(out.last_hidden_state, ref.last_hidden_state, minilm_batch["attention_mask"],
                      what="last_hidden_state")
    assert_real_close(out.pooler_output, ref.pooler_output, what="pooler_output")


def test_set_attn_implementation(minilm_path, hf_minilm, minilm_batch):
    fb = fastbert.BertModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        ref = hf_minilm(**minilm_batch)
    for impl in ATTN_IMPLEMENTATIONS + ["sdpa"]:
        fb.set_attn_implementation(impl)
        assert fb.config._attn_implementation == impl, f"set_attn_implementation({impl!r})"
        with torch.no_grad():
            out = fb(**minilm_batch)
        assert_real_close(out.last_hidden_state, ref.last_hidden_state, minilm_batch["attention_mask"],
                          what=f"{impl}: last_hidden_state")


# ---------------------------------------------------------------------------------------------------------------
# 11. output_hidden_states as layer indices (transformers 5's output capture)


@pytest.mark.parametrize("selection", [[0, 3, -1], [2], -1, 4, (5, 0), [1, 1]], ids=str)
@torch.no_grad()
def test_selected_hidden_states(minilm_pair, minilm_batch, selection):
    hf, fb = minilm_pair
    hf_out = hf(**minilm_batch, output_hidden_states=selection)
    fb_out = fb(**minilm_batch, output_hidden_states=selection)
    assert list(fb_out.keys()) == list(hf_out.keys())
    assert isinstance(fb_out.hidden_states, tuple) and len(fb_out.hidden_states) == len(hf_out.hidden_states)
    assert any(h is None for h in hf_out.hidden_states), "transformers leaves the unselected entries None"
    for i, (a, b) in enumerate(zip(fb_out.hidden_states, hf_out.hidden_states, strict=True)):
        if b is None:
            assert a is None, f"hidden_states[{i}] was not selected"
        else:
            assert a is not None, f"hidden_states[{i}] was selected"
            assert_real_close(a, b, minilm_batch["attention_mask"], what=f"hidden_states[{i}]")
    fb_tuple = fb(**minilm_batch, output_hidden_states=selection, return_dict=False)
    assert len(fb_tuple) == 3 and [h is None for h in fb_tuple[2]] == [h is None for h in hf_out.hidden_states]
