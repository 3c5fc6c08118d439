"""Backward pass against transformers: same weights, same batch, loss.backward(), every parameter's gradient.

Gradients are compared with rtol 1e-4 and atol 1e-5 times the largest gradient entry of the model (so the bar does
not depend on the arbitrary scale of the random weights). Eval mode (no dropout) unless said otherwise; training
mode with dropout probabilities of zero must give the very same numbers; gradient checkpointing must not change them.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_layers import GradientCheckpointingLayer

import fastbert


def labels_for(name, batch):
    if name == "BertForMaskedLM":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, 1::3] = -100
        return labels
    return torch.arange(batch["input_ids"].shape[0]) % 3


def backward(model, batch, labels):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels)
    out.loss.backward()
    return out


def assert_grads_close(fb, hf, rtol=1e-4, atol_scale=1e-5):
    hf_params = dict(hf.named_parameters())
    fb_params = dict(fb.named_parameters())
    assert fb_params.keys() == hf_params.keys()
    scale = max(p.grad.abs().max().item() for p in hf_params.values() if p.grad is not None)
    assert scale > 0
    for name, hf_param in hf_params.items():
        fb_grad = fb_params[name].grad
        if hf_param.grad is None:
            assert fb_grad is None or fb_grad.abs().max() == 0, name
            continue
        assert fb_grad is not None, f"{name}: no gradient in fastbert"
        torch.testing.assert_close(fb_grad, hf_param.grad, rtol=rtol, atol=atol_scale * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForSequenceClassification"])
def test_gradients_match_transformers(name, padded, make_config, make_pair, make_batch):
    config = make_config()
    hf, fb = make_pair(name, config, seed=7)
    batch = make_batch(config, pad=padded, seed=2)
    labels = labels_for(name, batch)
    hf_out, fb_out = backward(hf, batch, labels), backward(fb, batch, labels)
    assert abs(fb_out.loss.item() - hf_out.loss.item()) <= 1e-5
    assert_grads_close(fb, hf)
    if name == "BertForMaskedLM":  # the tied decoder sends its gradient into the shared embedding matrix
        assert fb.cls.predictions.decoder.weight is fb.bert.embeddings.word_embeddings.weight


def test_gradients_match_transformers_minilm(minilm_path, minilm_batch):
    """Real weights, padded batch of real sentences, sequence classification head copied from transformers."""
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=3,
                                                                     attn_implementation="eager").eval()
    fb = fastbert.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()
    fb.load_state_dict(hf.state_dict(), strict=True)
    labels = torch.tensor([0, 2, 1, 1])
    hf_out, fb_out = backward(hf, minilm_batch, labels), backward(fb, minilm_batch, labels)
    assert abs(fb_out.loss.item() - hf_out.loss.item()) <= 1e-5
    assert_grads_close(fb, hf)


def test_inputs_embeds_gradient(make_config, make_pair, make_batch):
    config = make_config()
    hf, fb = make_pair("BertModel", config, seed=8)
    batch = make_batch(config, seed=3)
    embeds = hf.get_input_embeddings()(batch.pop("input_ids")).detach()
    grads = []
    for model in (hf, fb):
        x = embeds.clone().requires_grad_(True)
        out = model(inputs_embeds=x, **batch)
        real = batch["attention_mask"].bool()  # padded positions hold 0 in fastbert: the loss reads real tokens
        (out.last_hidden_state[real].square().mean() + out.pooler_output.sum()).backward()
        grads.append(x.grad)
    scale = grads[0].abs().max().item()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * scale)


def test_train_mode_without_dropout_matches_transformers(make_config, make_pair, make_batch):
    config = make_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf, fb = make_pair("BertForSequenceClassification", config, seed=9)
    hf.train(), fb.train()
    batch = make_batch(config, seed=4)
    labels = labels_for("BertForSequenceClassification", batch)
    hf_out, fb_out = backward(hf, batch, labels), backward(fb, batch, labels)
    torch.testing.assert_close(fb_out.logits, hf_out.logits, rtol=0, atol=1e-5)
    assert_grads_close(fb, hf)


def test_gradient_checkpointing_gives_same_gradients(make_config, make_pair, make_batch):
    config = make_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _, fb = make_pair("BertForMaskedLM", config, seed=10)
    fb.train()
    batch = make_batch(config, seed=5)
    labels = labels_for("BertForMaskedLM", batch)
    loss = backward(fb, batch, labels).loss
    plain = {n: p.grad.clone() for n, p in fb.named_parameters()}
    enable = getattr(fb, "activation_checkpointing_enable", None) or fb.gradient_checkpointing_enable
    enable()
    layers = fb.bert.encoder.layer
    assert all(isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing for layer in layers)
    inner, calls = layers[0]._gradient_checkpointing_func, []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    for layer in layers:
        layer._gradient_checkpointing_func = counting_checkpoint
    checkpointed = backward(fb, batch, labels).loss
    assert len(calls) == config.num_hidden_layers, "the encoder layers did not run through the checkpoint function"
    assert torch.equal(loss, checkpointed)
    for name, param in fb.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("hidden_p, attention_p", [(0.2, 0.0), (0.0, 0.2)], ids=["hidden", "attention"])
@pytest.mark.parametrize("output_attentions", [False, True], ids=["fused", "probs"])
def test_dropout_active_in_train_mode_only(hidden_p, attention_p, output_attentions, make_config, make_pair,
                                           make_batch):
    """Each dropout (hidden, attention probabilities) acts in train mode only, and follows torch's RNG."""
    config = make_config(hidden_dropout_prob=hidden_p, attention_probs_dropout_prob=attention_p)
    _, fb = make_pair("BertModel", config, seed=11)
    batch = make_batch(config, seed=6)

    def run():
        return fb(**batch, output_attentions=output_attentions).last_hidden_state

    with torch.no_grad():
        eval_a, eval_b = run(), run()
        fb.train()
        torch.manual_seed(123)
        train_a, train_b = run(), run()
        torch.manual_seed(123)
        train_a_again = run()
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train_a, train_b) and not torch.allclose(train_a, eval_a)
    assert torch.equal(train_a, train_a_again), "dropout must follow torch's RNG (torch.manual_seed reproduces it)"


def _dropout_energy(call, n=200):
    """E[(train output - eval output)^2], over n dropout draws from a fixed seed."""
    with torch.no_grad():
        reference = call(False)
        torch.manual_seed(0)
        return torch.stack([(call(True) - reference).square().mean() for _ in range(n)]).mean().item()


@pytest.mark.parametrize("where", ["embeddings", "attention.output", "output", "model: attention probs"])
def test_dropout_strength_matches_transformers(where, make_config, make_pair, make_batch):
    """Same dropout, same place: the mean squared train-vs-eval deviation agrees with transformers' within 10%.
    The submodules share transformers' names and call signatures, so each dropout site is checked on its own."""
    attention_only = where.startswith("model")
    config = make_config(hidden_dropout_prob=0.0 if attention_only else 0.2, attention_probs_dropout_prob=0.2)
    hf, fb = make_pair("BertModel", config, seed=13)
    batch = make_batch(config, seed=8)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 11, config.hidden_size, generator=gen)
    inner = torch.randn(3, 11, config.intermediate_size, generator=gen)
    energies = []
    for model in (hf, fb):
        if where == "embeddings":
            def run(model=model):
                return model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        elif where == "attention.output":
            def run(model=model):
                return model.encoder.layer[0].attention.output(hidden, hidden)
        elif where == "output":
            def run(model=model):
                return model.encoder.layer[0].output(inner, hidden)
        else:
            def run(model=model):
                return model(**batch).last_hidden_state[batch["attention_mask"].bool()]

        def call(training, model=model, run=run):
            model.train(training)
            return run()

        energies.append(_dropout_energy(call))
    assert energies[0] > 0
    assert 0.9 <= energies[1] / energies[0] <= 1.1, energies
