"""``fastbert finetune``: sequence or token classification from a CSV / JSONL file, starting from a local BERT
checkpoint (any transformers BERT directory; fastbert loads it with the same classes)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastbert.train import checkpoint as ckpt
from fastbert.train import data, metrics
from fastbert.train.loop import (
    LossTerm,
    TrainingLoop,
    TrainSettings,
    check_settings,
    setup_distributed,
    teardown_distributed,
)

TASKS = ("classification", "token-classification")


def _model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _eval_batches(features, batch_size, pad_token_id):
    for start in range(0, len(features), batch_size):
        yield start, data.pad_batch(features[start:start + batch_size], pad_token_id)


class SequenceClassificationTask:
    """Cross-entropy over one label per example; accuracy and macro-F1 on the evaluation file."""

    def __init__(self, train_features, eval_features, pad_token_id):
        self.train, self.eval, self.pad_token_id = train_features, eval_features, pad_token_id
        self.num_examples = len(train_features)

    def make_batch(self, indices, epoch):
        return data.pad_batch([self.train[i] for i in indices], self.pad_token_id)

    def compute(self, model, batch):
        logits = model(**_model_inputs(batch)).logits.float()  # (B, num_labels)
        labels = batch["label"]
        return {"loss": LossTerm(F.cross_entropy(logits, labels, reduction="sum"),
                                 torch.tensor(labels.numel(), device=labels.device),
                                 (logits.argmax(-1) == labels).sum())}

    def evaluate(self, model, batch_size, autocast):
        device = next(model.parameters()).device
        predicted, loss_sum = [], 0.0
        for _, batch in _eval_batches(self.eval, batch_size, self.pad_token_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                logits = model(**_model_inputs(batch)).logits.float()
            loss_sum += F.cross_entropy(logits, batch["label"], reduction="sum").item()
            predicted += logits.argmax(-1).tolist()
        result = metrics.classification_metrics([f["label"] for f in self.eval], predicted)
        return {**result, "loss": loss_sum / len(self.eval)}


class TokenClassificationTask:
    """Cross-entropy over each word's first sub-word token; entity-level F1 (seqeval) on the evaluation file."""

    def __init__(self, train_features, eval_features, eval_tags, tags, pad_token_id):
        self.train, self.eval, self.eval_tags, self.tags = train_features, eval_features, eval_tags, tags
        self.pad_token_id = pad_token_id
        self.num_examples = len(train_features)

    def make_batch(self, indices, epoch):
        return data.pad_batch([self.train[i] for i in indices], self.pad_token_id)

    def compute(self, model, batch):
        logits = model(**_model_inputs(batch)).logits.float()  # (B, T, num_tags)
        labels = batch["labels"]
        labelled = labels != -100
        logits, labels = logits[labelled], labels[labelled]  # (N, num_tags), (N,)
        return {"loss": LossTerm(F.cross_entropy(logits, labels, reduction="sum"), labelled.sum(),
                                 (logits.argmax(-1) == labels).sum())}

    def evaluate(self, model, batch_size, autocast):
        device = next(model.parameters()).device
        predicted, loss_sum, count = [], 0.0, 0
        for start, batch in _eval_batches(self.eval, batch_size, self.pad_token_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                logits = model(**_model_inputs(batch)).logits.float()
            labelled = batch["labels"] != -100
            loss_sum += F.cross_entropy(logits[labelled], batch["labels"][labelled], reduction="sum").item()
            count += int(labelled.sum())
            best = logits.argmax(-1).tolist()  # (B, T)
            for row, feature in zip(best, self.eval[start:start + batch_size], strict=True):
                # A word the model never saw (truncated, or no sub-word token) counts as predicted 'O'.
                predicted.append([self.tags[row[p]] if p >= 0 else "O" for p in feature["word_positions"]])
        result = metrics.token_classification_metrics(self.eval_tags, predicted)
        return {**result, "loss": loss_sum / max(count, 1)}


def check_model_dir(path: str, option: str = "--model") -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{option} {path}: expected a local model directory with config.json and weights "
                         "(model.safetensors), as written by save_pretrained; nothing is downloaded")


def check_training_args(args) -> None:
    """The options both commands share, before any file is read or anything is written."""
    check_settings(args)
    if args.max_length < 8:
        raise ValueError(f"--max-length must be >= 8, got {args.max_length}")


def settings_from_args(args) -> TrainSettings:
    return TrainSettings(
        out_dir=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
        seed=args.seed, precision=args.precision, save_steps=args.save_steps,
        keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress,
    )


def load_files(task: str, train_path: str, eval_path: str):
    """Read and validate both files; returns (train examples, eval examples, label list)."""
    if task == "classification":
        train, evaluation = data.load_classification(train_path), data.load_classification(eval_path)
        if train.label_kind != evaluation.label_kind:
            raise data.DataError(f"{train_path} has {train.label_kind} labels but {eval_path} has "
                                 f"{evaluation.label_kind} labels; use the same kind in both")
        labels = data.label_list(train.labels, train_path, evaluation.labels, eval_path, evaluation.lines)
    else:
        train, evaluation = data.load_token_classification(train_path), data.load_token_classification(eval_path)
        eval_tags = [tag for tags in evaluation.tags for tag in tags]
        eval_lines = [line for tags, line in zip(evaluation.tags, evaluation.lines, strict=True) for _ in tags]
        labels = data.label_list([t for tags in train.tags for t in tags], train_path, eval_tags, eval_path,
                                 eval_lines, what="tag")
    return train, evaluation, labels


def run(args) -> dict:
    """The `fastbert finetune` command; returns the final evaluation metrics."""
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}; got {args.task!r}")
    metrics.require_metric_libraries()
    check_training_args(args)
    train, evaluation, labels = load_files(args.task, args.train, args.eval)  # bad files fail here, before training
    check_model_dir(args.model)
    resume_from = ckpt.prepare_output_dir(args.out, args.resume)
    run_settings = {
        "task": args.task, "train_examples": len(train.lines), "labels": [str(label) for label in labels],
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
        "max_length": args.max_length, "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay,
    }
    if resume_from is not None:
        ckpt.check_same_settings(resume_from, run_settings)

    import transformers

    import fastbert

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if not tokenizer.is_fast:
        raise ValueError(f"--model {args.model}: needs a fast (tokenizers) tokenizer, i.e. a tokenizer.json")
    config = transformers.BertConfig.from_pretrained(args.model)
    if args.max_length > config.max_position_embeddings:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    label_to_id = {label: i for i, label in enumerate(labels)}
    pad = tokenizer.pad_token_id
    if args.task == "classification":
        task = SequenceClassificationTask(
            data.encode_classification(train, tokenizer, label_to_id, args.max_length),
            data.encode_classification(evaluation, tokenizer, label_to_id, args.max_length), pad)
        model_class = fastbert.BertForSequenceClassification
    else:
        task = TokenClassificationTask(
            data.encode_token_classification(train, tokenizer, label_to_id, args.max_length),
            data.encode_token_classification(evaluation, tokenizer, label_to_id, args.max_length),
            evaluation.tags, labels, pad)
        model_class = fastbert.BertForTokenClassification
    state = setup_distributed(args.device)
    try:
        torch.manual_seed(args.seed)  # a new classifier layer starts from the same weights on every process
        model = model_class.from_pretrained(
            resume_from or args.model, num_labels=len(labels),
            id2label={i: str(label) for i, label in enumerate(labels)},
            label2id={str(label): i for i, label in enumerate(labels)},
        )
        loop = TrainingLoop(model, task, tokenizer, settings_from_args(args), state, resume_from, run_settings)
        return loop.run()
    finally:
        teardown_distributed(state)
