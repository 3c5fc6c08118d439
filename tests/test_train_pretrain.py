"""`fastbert pretrain`: BERT's masking recipe and sentence pairs, a tiny model that clearly learns, resume, and one
pretraining step against transformers' BertForPreTraining."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

import fastbert
from fastbert.cli import main
from fastbert.train import corpus, loop
from fastbert.train.pretrain import PretrainingTask

ANIMALS = ["cat", "dog", "horse", "bird", "fish", "mouse"]
VERBS = ["sees", "chases", "likes", "follows", "watches"]
PLACES = ["garden", "house", "park", "river", "field"]


def write_corpus(path, documents, seed):
    """``documents`` documents of 2-6 template sentences, blank lines between documents."""
    rng = random.Random(seed)
    docs = ["\n".join(f"the {rng.choice(ANIMALS)} {rng.choice(VERBS)} the {rng.choice(ANIMALS)} in the "
                      f"{rng.choice(PLACES)} ." for _ in range(rng.randint(2, 6))) for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def read_log(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_masking_follows_bert_recipe():
    rng = np.random.default_rng(0)
    vocab, mask_id = 1000, 3
    chosen = masked_as_mask = randomized = kept = candidates = 0
    for _ in range(400):
        n = int(rng.integers(10, 60))
        ids = rng.integers(10, vocab, size=n)
        special = np.zeros(n, dtype=bool)
        special[[0, n // 2, n - 1]] = True
        masked, labels = corpus.mask_tokens(ids, special, rng, vocab, mask_id)
        picked = labels != -100
        assert not picked[special].any() and (masked[special] == ids[special]).all()
        assert (labels[picked] == ids[picked]).all() and (masked[~picked] == ids[~picked]).all()
        assert picked.sum() == max(1, round(0.15 * (n - 3)))  # 15% of the non-special tokens, in every sequence
        chosen += picked.sum()
        candidates += n - 3
        masked_as_mask += (masked[picked] == mask_id).sum()
        kept += (masked[picked] == ids[picked]).sum()
        randomized += ((masked[picked] != mask_id) & (masked[picked] != ids[picked])).sum()
    assert 0.14 < chosen / candidates < 0.16
    assert masked_as_mask / chosen == pytest.approx(0.8, abs=0.04)
    assert randomized / chosen == pytest.approx(0.1, abs=0.03)  # a random token may equal the original (1/1000)
    assert kept / chosen == pytest.approx(0.1, abs=0.03)


def test_sentence_pairs_continue_or_come_from_another_document():
    # Token ids tell where they come from: document d, sentence s, position j -> 10000 d + 100 s + j.
    rng = random.Random(0)
    documents = [[[10000 * d + 100 * s + j for j in range(rng.randint(3, 12))] for s in range(rng.randint(1, 8))]
                 for d in range(40)]
    pairs = corpus.build_sentence_pairs(documents, max_length=32, seed=0)
    assert len(pairs) > 60
    for pair in pairs:
        assert pair.a and pair.b and len(pair.a) + len(pair.b) <= 32 - 3
        doc_a, doc_b = pair.a[-1] // 10000, pair.b[0] // 10000
        flat_a = [t for s in documents[doc_a] for t in s]
        start = flat_a.index(pair.a[0])
        assert flat_a[start:start + len(pair.a)] == pair.a  # A is a stretch of one document (maybe truncated)
        flat_b = [t for s in documents[doc_b] for t in s]
        start = flat_b.index(pair.b[0])
        assert flat_b[start:start + len(pair.b)] == pair.b
        if pair.is_random_next:
            assert doc_b != doc_a
        else:  # B starts right after A's last token, or at the sentence after A's last sentence
            assert pair.b[0] in (pair.a[-1] + 1, (pair.a[-1] // 100 + 1) * 100)
    random_share = np.mean([p.is_random_next for p in pairs])
    assert 0.35 < random_share < 0.65


@pytest.mark.slow
def test_pretraining_tiny_config_lowers_mlm_loss(tmp_path):
    train = write_corpus(tmp_path / "train.txt", 30, seed=0)
    held_out = write_corpus(tmp_path / "eval.txt", 10, seed=1)
    out = tmp_path / "out"
    argv = ["pretrain", "--corpus", train, "--eval", held_out, "--config", "tiny", "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--lr", "2e-3", "--max-length", "32", "--no-progress"]
    assert main(argv) == 0
    log = read_log(out)
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    assert {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "loss"} <= set(results)
    assert {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"} <= set(log[0])
    initial = log[0]["mlm_loss"]
    assert initial > 9.5  # about ln(30522) = 10.3: the fresh model knows nothing
    assert results["mlm_loss"] < initial - 2.0, (initial, results)
    assert results["mlm_accuracy"] > 0.2
    config = transformers.BertConfig.from_pretrained(str(out))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 2)
    assert config.sparse_mlm_logits is True  # pretraining ran the sparse head

    hf = transformers.BertForPreTraining.from_pretrained(str(out), attn_implementation="eager").eval()
    fb = fastbert.BertForPreTraining.from_pretrained(str(out)).eval()
    batch = transformers.AutoTokenizer.from_pretrained(str(out))(["the cat [MASK] the dog .", "a bird"],
                                                                 padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_out, fb_out = hf(**batch), fb(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(fb_out.prediction_logits[real], hf_out.prediction_logits[real], rtol=0, atol=1e-4)
    torch.testing.assert_close(fb_out.seq_relationship_logits, hf_out.seq_relationship_logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def small_config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small-config")
    transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64).save_pretrained(str(path))
    return str(path)


@pytest.mark.slow
def test_pretraining_resumes_mid_epoch(tmp_path, small_config_dir, monkeypatch):
    train = write_corpus(tmp_path / "train.txt", 30, seed=2)
    options = ["--corpus", train, "--config", small_config_dir, "--epochs", "2", "--batch-size", "8",
               "--max-length", "32", "--lr", "1e-3", "--save-steps", "2", "--no-progress"]
    assert main(["pretrain", *options, "--out", str(tmp_path / "full")]) == 0
    steps = len(read_log(tmp_path / "full"))
    assert steps >= 6

    def stop(self, step):
        if step == steps - 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop.TrainingLoop, "_after_step", stop)
        with pytest.raises(KeyboardInterrupt):
            main(["pretrain", *options, "--out", str(tmp_path / "resumed")])
    assert main(["pretrain", *options, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [(r["mlm_loss"], r["nsp_loss"]) for r in full] == [(r["mlm_loss"], r["nsp_loss"]) for r in resumed]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_pretraining_step_matches_transformers(mode, tokenizer, make_pair):
    """The loop's pretraining loss and gradients on one batch, fastbert vs transformers. In train mode (dropout
    probabilities 0) fastbert's head projects only the masked positions onto the vocabulary; the loss must not
    notice."""
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")
    hf, fb = make_pair("BertForPreTraining", config, seed=3)
    fb.config.sparse_mlm_logits = True  # as `fastbert pretrain` sets it
    hf.train(mode == "train"), fb.train(mode == "train")
    rng = random.Random(3)
    documents = [[[rng.randrange(1000, 5000) for _ in range(rng.randint(3, 9))] for _ in range(4)] for _ in range(6)]
    pairs = corpus.build_sentence_pairs(documents, max_length=24, seed=0)
    task = PretrainingTask(pairs, pairs, tokenizer, config.vocab_size, seed=0)
    batch = task.make_batch(np.arange(6), epoch=0)
    masked = int((batch["labels"] != -100).sum())
    assert (batch["attention_mask"] == 0).any() and masked > 6
    assert batch["next_sentence_label"].unique().numel() == 2
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    targets = {"labels": batch["labels"], "next_sentence_label": batch["next_sentence_label"]}
    with torch.no_grad():
        logits = fb(**inputs, **targets).prediction_logits
    assert logits.shape[0] == (masked if mode == "train" else 6)  # the sparse head is exercised in train mode
    losses = {}
    for name, model in (("hf", hf), ("fb", fb)):
        model.zero_grad(set_to_none=True)
        terms = task.compute(model, batch)
        loss = loop.combine_terms(terms)
        loss.backward()
        # The loop's loss is BertForPreTraining's own: mean masked-LM loss + mean next-sentence loss.
        with torch.no_grad():
            own = model(**inputs, **targets).loss
        assert abs(loss.item() - own.item()) <= 1e-5
        assert terms["mlm"].count.item() == masked
        losses[name] = loss.item()
    assert abs(losses["fb"] - losses["hf"]) <= 1e-5
    hf_params, fb_params = dict(hf.named_parameters()), dict(fb.named_parameters())
    scale = max(p.grad.abs().max().item() for p in hf_params.values())
    for name, param in hf_params.items():
        torch.testing.assert_close(fb_params[name].grad, param.grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
