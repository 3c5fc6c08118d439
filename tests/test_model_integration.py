"""fastbert inside transformers' machinery: Trainer fine-tuning and pipelines, compared with transformers' own model."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

import fastbert


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def _synthetic_classification(config, n=64, seqlen=12):
    """Label = parity of the token at position 1; real lengths 4..11, so batches are padded."""
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, config.vocab_size, (n, seqlen), generator=gen)
    lengths = 4 + torch.arange(n) % 8
    attention_mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id)
    labels = input_ids[:, 1] % 2
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_trainer_fine_tunes_and_checkpoint_loads_in_transformers(tmp_path, make_config):
    config = make_config(num_labels=2)
    torch.manual_seed(0)
    model = fastbert.BertForSequenceClassification(config)
    data = _synthetic_classification(config)

    @torch.no_grad()
    def full_batch_loss():
        model.eval()
        return model(**data).loss.item()

    loss_before = full_batch_loss()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=30, per_device_train_batch_size=16, learning_rate=3e-3,
        use_cpu=True, report_to="none", logging_steps=5, save_strategy="no", seed=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TensorDataset(data))
    result = trainer.train()
    assert result.global_step == 30
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) >= 3 and logged[-1] < logged[0]
    loss_after = full_batch_loss()
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before), f"unchanged: {set(before) - set(changed)}"

    out_dir = tmp_path / "final"
    trainer.save_model(str(out_dir))
    assert os.path.isfile(out_dir / "model.safetensors")
    hf, info = transformers.BertForSequenceClassification.from_pretrained(
        str(out_dir), output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    with torch.no_grad():
        hf_out, fb_out = hf(**data), model(**data)
    torch.testing.assert_close(fb_out.logits, hf_out.logits, rtol=0, atol=1e-5)
    assert abs(fb_out.loss.item() - hf_out.loss.item()) <= 1e-5


MASKED_TEXTS = ["The capital of France is [MASK].", "I like [MASK] very much, said the [MASK]."]


def _assert_same_predictions(fb_result, hf_result, key):
    """Pipeline results (nested lists of dicts): same labels/tokens in the same order, scores within 1e-4 rel."""
    if isinstance(hf_result, list):
        assert isinstance(fb_result, list) and len(fb_result) == len(hf_result)
        for a, b in zip(fb_result, hf_result, strict=True):
            _assert_same_predictions(a, b, key)
        return
    assert fb_result[key] == hf_result[key]
    assert fb_result["score"] == pytest.approx(hf_result["score"], rel=1e-4, abs=1e-7)


def test_fill_mask_pipeline(minilm_heads, tokenizer):
    hf, fb = minilm_heads["BertForMaskedLM"]
    results = [transformers.pipeline("fill-mask", model=m, tokenizer=tokenizer)(MASKED_TEXTS, top_k=5)
               for m in (hf, fb)]
    assert len(results[0]) == 2 and len(results[0][1]) == 2  # the second text has two masks
    _assert_same_predictions(results[1], results[0], "token")


def test_text_classification_pipeline(minilm_heads, tokenizer, sentences):
    hf, fb = minilm_heads["BertForSequenceClassification"]
    results = [transformers.pipeline("text-classification", model=m, tokenizer=tokenizer)(sentences, top_k=None)
               for m in (hf, fb)]
    assert len(results[0]) == len(sentences) and len(results[0][0]) == 3
    _assert_same_predictions(results[1], results[0], "label")


def test_feature_extraction_pipeline(hf_minilm, fb_minilm, tokenizer, sentences):
    results = [transformers.pipeline("feature-extraction", model=m, tokenizer=tokenizer, return_tensors=True)(
        sentences) for m in (hf_minilm, fb_minilm)]
    for fb_features, hf_features in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(fb_features, hf_features, rtol=0, atol=1e-5)
