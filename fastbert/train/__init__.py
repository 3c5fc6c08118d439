"""Training from the command line: ``fastbert finetune`` and ``fastbert pretrain`` (docs/TRAINING.md).

- data.py: reading and validating CSV / JSONL files, label vocabularies, tokenization, padding.
- metrics.py: accuracy, macro-F1 (scikit-learn) and entity-level F1 (seqeval).
- loop.py: the training loop both commands share (AdamW, warmup + linear decay, autocast, DDP, progress bar).
- checkpoint.py: output directory rules, ``checkpoint-<step>/`` save / resume (falling back past damaged ones).
- errors.py: the errors a run stops with (divergence, full disk) and disk-full detection.
- finetune.py, pretrain.py: the two tasks and their command-line entry points.

Nothing here is imported by ``import fastbert``: the model package stays free of training dependencies.
"""
