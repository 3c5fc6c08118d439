"""``from_hf``: swap transformers' BERT modules for fastbert's, weights and all."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastbert import modeling, modeling_heads

_FASTBERT_CLASSES = {
    cls.__name__: cls
    for cls in (
        modeling.BertModel,
        modeling_heads.BertForPreTraining,
        modeling_heads.BertForMaskedLM,
        modeling_heads.BertForNextSentencePrediction,
        modeling_heads.BertForSequenceClassification,
        modeling_heads.BertForTokenClassification,
        modeling_heads.BertForQuestionAnswering,
        modeling_heads.BertForMultipleChoice,
    )
}


def _is_transformers_bert(module: nn.Module) -> bool:
    from transformers.models.bert import modeling_bert

    return isinstance(module, modeling_bert.BertPreTrainedModel) and type(module).__name__ in _FASTBERT_CLASSES


def _convert_one(hf_model: nn.Module) -> nn.Module:
    cls = _FASTBERT_CLASSES[type(hf_model).__name__]
    config = copy.deepcopy(hf_model.config)
    kwargs = {}
    if cls is modeling.BertModel:
        kwargs["add_pooling_layer"] = hf_model.pooler is not None
    param = next(hf_model.parameters())
    # Build on the meta device: the weights come from hf_model right after, no point initializing them.
    with torch.device("meta"):
        model = cls(config, **kwargs)
    state = hf_model.state_dict()
    ignored = [k for k in state if k.endswith("embeddings.position_ids") or k.endswith("embeddings.token_type_ids")]
    for key in ignored:
        del state[key]
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"cannot convert {type(hf_model).__name__}: missing keys {result.missing_keys}, "
            f"unexpected keys {result.unexpected_keys}"
        )
    model.tie_weights()
    frozen = {name for name, p in hf_model.named_parameters() if not p.requires_grad}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    model.to(device=param.device)
    model.train(hf_model.training)
    return model


def from_hf(model: nn.Module) -> nn.Module:
    """Convert a transformers BERT model to fastbert with the same weights, without copying them.

    ``model`` is a ``transformers.BertModel`` or one of its task heads (BertForMaskedLM, BertForPreTraining,
    BertForNextSentencePrediction, BertForSequenceClassification, BertForTokenClassification,
    BertForQuestionAnswering, BertForMultipleChoice): the fastbert twin is returned, on the same device, dtype and
    train/eval mode, with the same frozen parameters. It takes over the original's parameter tensors (no copy), except
    each layer's query/key/value weights and biases, which are copied into one buffer per layer (see
    ``BertSelfAttention.pack_qkv_``), so keep using the returned model and drop the original; ``copy.deepcopy`` it
    first to keep both.
    Any other ``nn.Module`` (a sentence-transformers model, a user's wrapper) is searched: every
    transformers BERT inside it is replaced in place by its fastbert twin, and the wrapper itself is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_hf expects a torch.nn.Module (a transformers BERT model), got {type(model).__name__}")
    if _is_transformers_bert(model):
        return _convert_one(model)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_transformers_bert(child):
                setattr(parent, name, _convert_one(child))
                replaced += 1
    if not replaced:
        raise ValueError(
            f"from_hf found no transformers BERT model in {type(model).__name__}; it converts "
            f"{', '.join(sorted(_FASTBERT_CLASSES))} and modules that contain them"
        )
    return model
