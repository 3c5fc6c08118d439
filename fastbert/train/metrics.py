"""Evaluation metrics, from the libraries everyone checks their numbers against: scikit-learn for accuracy and
macro-F1, seqeval for entity-level (CoNLL) precision / recall / F1 on IOB tags."""

from __future__ import annotations

# Never `pip install "fastbert[train]"`: the package index's `fastbert` is an unrelated project.
_INSTALL_HINT = ("fastbert finetune computes its metrics with scikit-learn and seqeval: pip install scikit-learn "
                 'seqeval (or pip install ".[train]" from the fastbert checkout)')


class MissingDependencyError(ImportError):
    """A library the training commands need is not installed; the message says what to install."""


def require_metric_libraries() -> None:
    """Fail before training, not after the first epoch, when a metrics library is missing."""
    missing = []
    for module, package in (("sklearn.metrics", "scikit-learn"), ("seqeval.metrics", "seqeval")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingDependencyError(f"{_INSTALL_HINT} (missing: {', '.join(missing)})")


def classification_metrics(true_labels: list, predicted_labels: list) -> dict:
    """accuracy and macro-F1 (unweighted mean of the per-class F1 over the classes seen in either list)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(true_labels, predicted_labels)),
        "macro_f1": float(f1_score(true_labels, predicted_labels, average="macro", zero_division=0)),
    }


def token_classification_metrics(true_tags: list[list[str]], predicted_tags: list[list[str]]) -> dict:
    """Entity-level precision / recall / F1 (micro over entities, as conlleval reports), entity-level macro-F1
    over entity types, and token-level accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "accuracy": float(accuracy_score(true_tags, predicted_tags)),
        "f1": float(f1_score(true_tags, predicted_tags, zero_division=0)),
        "precision": float(precision_score(true_tags, predicted_tags, zero_division=0)),
        "recall": float(recall_score(true_tags, predicted_tags, zero_division=0)),
        "macro_f1": float(f1_score(true_tags, predicted_tags, average="macro", zero_division=0)),
    }
