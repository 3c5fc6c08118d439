"""`fastbert finetune` end to end: the MiniLM weights learn a small sentiment set (>= 90% held-out accuracy), token
classification reports entity-level F1, checkpoints load in transformers, --resume continues exactly where the
checkpoint left off, an existing output directory is never overwritten, and one training step gives the same loss,
gradients and updated weights as the same step on transformers' model."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random

import pytest
import torch
import transformers
from safetensors.torch import load_file

import fastbert
from fastbert.cli import main
from fastbert.train import data, loop, metrics
from fastbert.train.finetune import SequenceClassificationTask, TokenClassificationTask

POSITIVE = ["great", "wonderful", "excellent", "delightful", "fantastic", "brilliant", "lovely", "superb"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "bad", "miserable"]
NOUNS = ["movie", "meal", "concert", "book", "trip", "hotel", "game", "show"]
TEMPLATES = ["the {n} was {a}", "what a {a} {n}", "i found the {n} {a}", "honestly, a {a} {n} overall"]


def sentiment_rows(seed=0):
    """512 (sentence, label) rows from the word lists, shuffled; different rows are different sentences."""
    rows = [(t.format(n=n, a=a), label) for t, n, (label, words) in
            itertools.product(TEMPLATES, NOUNS, [("positive", POSITIVE), ("negative", NEGATIVE)]) for a in words]
    random.Random(seed).shuffle(rows)
    return rows


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]
PLACES = [["paris"], ["new", "york"], ["berlin"], ["los", "angeles"], ["tokyo"]]


def ner_records(n, seed):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        verb = rng.choice(["lives in", "visited", "works in", "left"]).split()
        tokens = [person, *verb, *place]
        tags = ["B-PER"] + ["O"] * len(verb) + ["B-LOC"] + ["I-LOC"] * (len(place) - 1)
        records.append({"tokens": tokens, "tags": tags})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def finetune_argv(train, evaluation, model, out, *extra, task="classification"):
    return ["finetune", "--task", task, "--train", train, "--eval", evaluation, "--model", model, "--out", str(out),
            "--no-progress", *extra]


def read_log(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_minilm_learns_sentiment(tmp_path, minilm_path):
    rows = sentiment_rows()
    train = write_csv(tmp_path / "train.csv", rows[:96])
    evaluation = write_csv(tmp_path / "eval.csv", rows[96:160])  # held out: sentences the model never trained on
    out = tmp_path / "out"
    argv = finetune_argv(train, evaluation, minilm_path, out, "--epochs", "2", "--batch-size", "16", "--lr", "3e-4")
    assert main(argv) == 0
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    assert results["accuracy"] >= 0.9 and results["macro_f1"] >= 0.9, results
    assert [h["step"] for h in results["history"]] == [6, 12]
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in log)

    # Checkpoints and the final model are save_pretrained directories that transformers loads as they are.
    assert sorted(os.listdir(out)) >= ["checkpoint-12", "checkpoint-6", "config.json", "eval_results.json"]
    for name in ("checkpoint-6", "checkpoint-12", "."):
        assert os.path.isfile(out / name / "model.safetensors") and os.path.isfile(out / name / "tokenizer.json")
    hf, info = transformers.BertForSequenceClassification.from_pretrained(str(out), output_loading_info=True,
                                                                          attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    fb = fastbert.BertForSequenceClassification.from_pretrained(str(out))
    batch = transformers.AutoTokenizer.from_pretrained(str(out))(["what a superb game", "the hotel was awful"],
                                                                 padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_logits, fb_logits = hf.eval()(**batch).logits, fb.eval()(**batch).logits
    torch.testing.assert_close(fb_logits, hf_logits, rtol=0, atol=1e-5)
    assert hf_logits.argmax(-1).tolist() == [1, 0]
    state = torch.load(out / "checkpoint-12" / "training_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "scaler"}


@pytest.mark.slow
def test_token_classification_reports_entity_f1(tmp_path, minilm_path):
    train = write_jsonl(tmp_path / "train.jsonl", ner_records(48, seed=0))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", ner_records(24, seed=1))
    out = tmp_path / "out"
    argv = finetune_argv(train, evaluation, minilm_path, out, "--epochs", "2", "--batch-size", "8", "--lr", "5e-4",
                         "--keep-checkpoints", "1", task="token-classification")
    assert main(argv) == 0
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    assert {"accuracy", "f1", "precision", "recall", "macro_f1", "loss"} <= set(results)
    assert results["f1"] >= 0.9, results
    config = transformers.BertConfig.from_pretrained(str(out))
    assert sorted(config.label2id) == ["B-LOC", "B-PER", "I-LOC", "O"]


def test_entity_level_metrics():
    """conlleval semantics: an entity counts only when its type and its whole span are right."""
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "O"]]  # the PER span is cut short: 2 of 3 entities right
    result = metrics.token_classification_metrics(true, predicted)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["macro_f1"] == pytest.approx((0.0 + 1.0) / 2)  # PER f1 0, LOC f1 1
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert metrics.classification_metrics([0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx(
        {"accuracy": 0.75, "macro_f1": (2 / 3 + 2 / 3 + 1) / 3})


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    rows = sentiment_rows()
    train = write_csv(tmp_path / "train.csv", rows[:40])
    evaluation = write_csv(tmp_path / "eval.csv", rows[40:56])
    options = ["--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--save-steps", "3", "--keep-checkpoints", "0",
               "--max-length", "32"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(finetune_argv(train, evaluation, tiny_model_dir, full, *options)) == 0

    def stop_at_step_8(self, step):
        if step == 8:
            raise Interrupted
    with monkeypatch.context() as patch:
        patch.setattr(loop.TrainingLoop, "_after_step", stop_at_step_8)
        with pytest.raises(Interrupted):
            main(finetune_argv(train, evaluation, tiny_model_dir, resumed, *options))
    # Steps 1-8 ran; checkpoints at 3 and 5 (end of epoch 1) and 6; step 7 and 8 are lost and must run again.
    assert sorted(os.listdir(resumed)) == ["checkpoint-3", "checkpoint-5", "checkpoint-6", "eval_results.json",
                                           "train_log.jsonl"]
    assert [r["step"] for r in read_log(resumed)] == list(range(1, 9))
    assert main(finetune_argv(train, evaluation, tiny_model_dir, resumed, *options, "--resume")) == 0

    full_log, resumed_log = read_log(full), read_log(resumed)
    assert [r["step"] for r in resumed_log] == list(range(1, 11))  # steps 7 and 8 replaced, nothing twice
    # Same process, same threads, same batches, same dropout streams: the numbers are bit for bit the same.
    for a, b in zip(full_log, resumed_log, strict=True):
        assert (a["loss"], a["accuracy"], a["lr"]) == (b["loss"], b["accuracy"], b["lr"]), (a, b)
    weights_full, weights_resumed = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights_full.keys() == weights_resumed.keys()
    for name, tensor in weights_full.items():
        assert torch.equal(weights_resumed[name], tensor), name
    with open(full / "eval_results.json") as f, open(resumed / "eval_results.json") as g:
        assert json.load(f)["history"] == json.load(g)["history"]

    # Settings that fix the data order and the schedule cannot change across a resume.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(finetune_argv(train, evaluation, tiny_model_dir, resumed, *options[:2], "--batch-size", "4",
                           *options[4:], "--resume"))
    assert "batch_size: 8 in the checkpoint, 4 now" in capsys.readouterr().err


def test_existing_output_directory_is_never_overwritten(tmp_path, tiny_model_dir, capsys):
    rows = sentiment_rows()
    train = write_csv(tmp_path / "train.csv", rows[:8])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra, message in [((), "pass --resume"), (("--resume",), "no complete checkpoint")]:
        with pytest.raises(SystemExit) as exc:
            main(finetune_argv(train, train, tiny_model_dir, out, *extra))
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def _assert_grads_close(fb, hf, rtol=1e-4, atol_scale=1e-5):
    """Every parameter's gradient; atol relative to the largest gradient entry (as in test_model_training.py)."""
    hf_params, fb_params = dict(hf.named_parameters()), dict(fb.named_parameters())
    assert fb_params.keys() == hf_params.keys()
    scale = max(p.grad.abs().max().item() for p in hf_params.values() if p.grad is not None)
    assert scale > 0
    for name, param in hf_params.items():
        if param.grad is None:
            assert fb_params[name].grad is None or fb_params[name].grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(fb_params[name].grad, param.grad, rtol=rtol, atol=atol_scale * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


LR = 1e-3


def training_steps(model, task, batch, steps):
    """The loop's step on one process, repeated on one batch: loss, backward, clipping, AdamW + schedule.
    Returns the losses and the first step's gradients."""
    optimizer = loop.build_optimizer(model, lr=LR, weight_decay=0.01)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 0, 10)
    losses, first_grads = [], None
    for _ in range(steps):
        loss = loop.combine_terms(task.compute(model, batch))
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for name, param in model.named_parameters():
        param.grad = first_grads.get(name)
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("head", ["classification", "token-classification"])
def test_training_step_matches_transformers(head, minilm_path, tokenizer, sentences):
    """Real weights, a padded batch of real sentences built by the training data pipeline: the same loss and
    gradients on the first step, and the same losses on the steps after it (so the same update was applied).
    Weights are not compared element by element after a step: Adam's first step moves each weight by about
    lr * sign(gradient), which amplifies rounding in gradients that are close to zero."""
    name = "BertForSequenceClassification" if head == "classification" else "BertForTokenClassification"
    torch.manual_seed(0)
    hf = getattr(transformers, name).from_pretrained(minilm_path, num_labels=3, attn_implementation="eager").eval()
    fb = getattr(fastbert, name).from_pretrained(minilm_path, num_labels=3).eval()
    fb.load_state_dict(hf.state_dict(), strict=True)
    if head == "classification":
        examples = data.ClassificationExamples("x", sentences, None, ["a", "b", "c", "a"], "string", [1, 2, 3, 4])
        features = data.encode_classification(examples, tokenizer, {"a": 0, "b": 1, "c": 2}, 32)
        task = SequenceClassificationTask(features, features, tokenizer.pad_token_id)
    else:
        words = [s.split() for s in sentences]
        tags = [[["O", "B-X", "I-X"][i % 3] for i in range(len(w))] for w in words]
        examples = data.TokenClassificationExamples("x", words, tags, [1, 2, 3, 4])
        features = data.encode_token_classification(examples, tokenizer, {"O": 0, "B-X": 1, "I-X": 2}, 32)
        task = TokenClassificationTask(features, features, tags, ["O", "B-X", "I-X"], tokenizer.pad_token_id)
    batch = task.make_batch(range(len(features)), epoch=0)
    assert (batch["attention_mask"] == 0).any()
    hf_losses, fb_losses = training_steps(hf, task, batch, 3), training_steps(fb, task, batch, 3)
    _assert_grads_close(fb, hf)
    assert fb_losses == pytest.approx(hf_losses, rel=1e-5, abs=1e-6)
    assert hf_losses[-1] < hf_losses[0] - 0.1  # the steps did change the model


def test_optimizer_skips_weight_decay_on_biases_and_layer_norm(make_config):
    model = fastbert.BertForSequenceClassification(make_config())
    decay, no_decay = loop.build_optimizer(model, lr=LR, weight_decay=0.01).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for n in names.values()
                                                          if n.endswith("bias") or "LayerNorm" in n}
