"""BERT task heads, drop-in compatible with ``transformers``: pretraining (MLM + NSP), masked LM, next sentence,
sequence / token classification, question answering, multiple choice. Same parameter names, arguments, losses
and output types as their transformers twins.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers.modeling_outputs import (
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

from fastbert import ops
from fastbert.modeling import BertModel, BertPreTrainedModel, _activation, _check_extra_kwargs, gelu_approximation
from fastbert.validation import input_checks_enabled

_TIED_MLM_KEYS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


class BertPredictionHeadTransform(nn.Module):
    """dense + fused GELU + LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.approximate = gelu_approximation(config.hidden_act)
        self.transform_act_fn = _activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        ln = self.LayerNorm
        if self.approximate is None:
            hidden_states = self.transform_act_fn(self.dense(hidden_states))
            return ops.layer_norm(hidden_states, ln.weight, ln.bias, ln.eps)
        # As in BertIntermediate, the dense bias rides in the matmul; the op fuses GELU + LayerNorm.
        return ops.bias_gelu_layer_norm(self.dense(hidden_states), None, ln.weight, ln.bias, ln.eps, self.approximate)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        # decoder.weight is tied to the word embeddings and decoder.bias to `bias` (transformers' layout).
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states):
        return self.decoder(self.transform(hidden_states))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled_output):
        return self.seq_relationship(pooled_output)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output, pooled_output):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


def check_class_labels(name, labels, num_classes, shape, *, ignore_index=True, what="class ids"):
    """Raise a ValueError unless ``labels`` holds integer targets in [0, num_classes) (or -100, the loss's
    ignore_index, when ``ignore_index``), one per entry of ``shape``: what CrossEntropyLoss would otherwise refuse
    with an IndexError on CPU and a device-side assert on a GPU. The range check reads the labels' minimum and maximum
    back (a GPU sync); ``fastbert.set_input_checks(False)`` skips it, as it skips the input id checks."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {what}, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {labels.dtype}; it must hold integer {what} (torch.long)")
    expected = int(torch.Size(shape).numel())
    if labels.numel() != expected:
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)}; it needs one target per example, shaped like "
            f"{tuple(shape)} ({expected} values{', -100 for positions without a target' if ignore_index else ''})"
        )
    if labels.numel() == 0 or not input_checks_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if labels.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    valid = (labels >= 0) & (labels < num_classes)
    if ignore_index:
        valid |= labels == -100
    if not bool(valid.all()):
        bad = labels[~valid]
        low, high = (int(v) for v in torch.aminmax(bad))
        allowed = f"[0, {num_classes})" + (" or -100 (ignored)" if ignore_index else "")
        raise ValueError(
            f"{name} holds values in [{low}, {high}] outside the valid range {allowed}: {what}. Check the label "
            "mapping (num_labels / vocab_size in the config must cover every label)"
        )


def _classifier_dropout(config):
    p = getattr(config, "classifier_dropout", None)
    return nn.Dropout(config.hidden_dropout_prob if p is None else p)


def _finish(output, return_dict):
    return output if return_dict else output.to_tuple()


class _BertHead(BertPreTrainedModel):
    """Shared plumbing: run the encoder with the standard arguments, resolve return_dict."""

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                output_attentions, output_hidden_states, cu_seqlens=None, max_seqlen=None, kwargs=None):
        _check_extra_kwargs(kwargs or {})
        return self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )

    def _return_dict(self, return_dict):
        return getattr(self.config, "return_dict", True) if return_dict is None else return_dict


class _MLMHeadMixin:
    def _mlm_scores_and_loss(self, sequence_output, labels):
        """Vocabulary scores and the MLM loss (None without labels).

        sequence_output: (B, T, C) or packed (N, C); labels: the same layout without C, -100 = ignored. Scores are
        (..., vocab_size), as in transformers. Opt-in, ``config.sparse_mlm_logits = True``: in training with labels,
        only the labelled positions (the ~15% masked tokens) go through the prediction head, saving most of the
        vocabulary projection, and ``scores`` is (num_labelled, vocab_size), the labelled positions in row-major
        order (torch.compile keeps the full scores). The loss is the same either way.
        """
        predictions = self.cls.predictions
        if labels is None:
            return predictions(sequence_output), None
        check_class_labels("labels", labels, self.config.vocab_size, sequence_output.shape[:-1], ignore_index=True,
                           what="token ids of the vocabulary (config.vocab_size)")
        flat_labels = labels.reshape(-1)
        sparse = getattr(self.config, "sparse_mlm_logits", False) is True and not torch.compiler.is_compiling()
        if self.training and sparse:
            labelled = (flat_labels != -100).nonzero().squeeze(1)  # data-dependent size: one host sync on a GPU
            hidden = sequence_output.reshape(-1, sequence_output.shape[-1]).index_select(0, labelled)
            scores = predictions(hidden)  # (num_labelled, V)
            return scores, CrossEntropyLoss()(scores, flat_labels.index_select(0, labelled))
        scores = predictions(sequence_output)
        return scores, CrossEntropyLoss()(scores.view(-1, self.config.vocab_size), flat_labels)

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias


class BertForPreTraining(_MLMHeadMixin, _BertHead):
    _tied_weights_keys = dict(_TIED_MLM_KEYS)

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, next_sentence_label=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cu_seqlens=None, max_seqlen=None, **kwargs):
        """labels: (B, T) MLM targets, -100 = ignored; next_sentence_label: (B,), 0 = continuation, 1 = random."""
        outputs = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, cu_seqlens, max_seqlen, kwargs)
        mlm_labels = labels if next_sentence_label is not None else None
        prediction_scores, masked_lm_loss = self._mlm_scores_and_loss(outputs.last_hidden_state, mlm_labels)
        seq_relationship_score = self.cls.seq_relationship(outputs.pooler_output)
        total_loss = None
        if masked_lm_loss is not None:
            check_class_labels("next_sentence_label", next_sentence_label, 2, seq_relationship_score.shape[:-1],
                               what="0 (B continues A) or 1 (B is random)")
            next_sentence_loss = CrossEntropyLoss()(seq_relationship_score.view(-1, 2), next_sentence_label.view(-1))
            total_loss = masked_lm_loss + next_sentence_loss
        output = BertForPreTrainingOutput(
            loss=total_loss,
            prediction_logits=prediction_scores,
            seq_relationship_logits=seq_relationship_score,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return _finish(output, self._return_dict(return_dict))


class BertForMaskedLM(_MLMHeadMixin, _BertHead):
    _tied_weights_keys = dict(_TIED_MLM_KEYS)

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cu_seqlens=None, max_seqlen=None, **kwargs):
        """labels: (B, T) targets, -100 = ignored. logits: (B, T, vocab_size); with ``config.sparse_mlm_logits`` in
        training with labels, only the labelled positions, (num_labelled, vocab_size) (see
        ``_mlm_scores_and_loss``)."""
        outputs = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, cu_seqlens, max_seqlen, kwargs)
        prediction_scores, loss = self._mlm_scores_and_loss(outputs.last_hidden_state, labels)
        output = MaskedLMOutput(loss=loss, logits=prediction_scores, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)
        return _finish(output, self._return_dict(return_dict))


class BertForNextSentencePrediction(_BertHead):
    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cu_seqlens=None, max_seqlen=None, **kwargs):
        """labels: (B,), 0 = B continues A, 1 = random. logits: (B, 2)."""
        outputs = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, cu_seqlens, max_seqlen, kwargs)
        scores = self.cls(outputs.pooler_output)
        loss = None
        if labels is not None:
            check_class_labels("labels", labels, 2, scores.shape[:-1], what="0 (B continues A) or 1 (B is random)")
            loss = CrossEntropyLoss()(scores.view(-1, 2), labels.view(-1))
        output = NextSentencePredictorOutput(loss=loss, logits=scores, hidden_states=outputs.hidden_states,
                                             attentions=outputs.attentions)
        return _finish(output, self._return_dict(return_dict))


class BertForSequenceClassification(_BertHead):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cu_seqlens=None, max_seqlen=None, **kwargs):
        """labels: (B,) class ids, (B,) floats for regression (num_labels == 1), or (B, num_labels) multi-label."""
        outputs = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, cu_seqlens, max_seqlen, kwargs)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            config = self.config
            if config.problem_type is None:
                if self.num_labels == 1:
                    config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    config.problem_type = "single_label_classification"
                else:
                    config.problem_type = "multi_label_classification"
            if config.problem_type == "regression":
                if self.num_labels == 1:
                    loss = MSELoss()(logits.squeeze(), labels.squeeze())
                else:
                    loss = MSELoss()(logits, labels)
            elif config.problem_type == "single_label_classification":
                check_class_labels("labels", labels, self.num_labels, logits.shape[:-1],
                                   what=f"class ids below num_labels={self.num_labels}")
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
            elif config.problem_type == "multi_label_classification":
                if labels.shape != logits.shape:
                    raise ValueError(
                        f"labels has shape {tuple(labels.shape)}; multi-label classification needs one 0/1 target per "
                        f"class, shaped like the logits {tuple(logits.shape)}"
                    )
                loss = BCEWithLogitsLoss()(logits, labels)
        output = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                          attentions=outputs.attentions)
        return _finish(output, self._return_dict(return_dict))


class BertForMultipleChoice(_BertHead):
    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        """input_ids: (B, num_choices, T) or inputs_embeds: (B, num_choices, T, C); labels: (B,).

        logits: (B, num_choices).
        """
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if source.dim() != (3 if input_ids is not None else 4):
            raise ValueError(
                f"BertForMultipleChoice expects (batch, num_choices, seq_len) inputs, got shape {tuple(source.shape)}"
            )
        num_choices = source.shape[1]

        def flat(t):
            return None if t is None else t.reshape(-1, t.size(-1))

        outputs = self._encode(
            flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
            None if inputs_embeds is None else inputs_embeds.reshape(-1, *inputs_embeds.shape[-2:]),
            output_attentions, output_hidden_states, kwargs=kwargs,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, num_choices)
        loss = None
        if labels is not None:
            check_class_labels("labels", labels, num_choices, logits.shape[:-1],
                               what=f"the index of the right choice, below num_choices={num_choices}")
            loss = CrossEntropyLoss()(logits, labels.view(-1))
        output = MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                           attentions=outputs.attentions)
        return _finish(output, self._return_dict(return_dict))


class BertForTokenClassification(_BertHead):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cu_seqlens=None, max_seqlen=None, **kwargs):
        """labels: (B, T) tag ids, -100 = ignored. logits: (B, T, num_labels)."""
        outputs = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, cu_seqlens, max_seqlen, kwargs)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            check_class_labels("labels", labels, self.num_labels, logits.shape[:-1],
                               what=f"tag ids below num_labels={self.num_labels}")
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
        output = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                       attentions=outputs.attentions)
        return _finish(output, self._return_dict(return_dict))


class BertForQuestionAnswering(_BertHead):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        """start_positions, end_positions: (B,) token indices; out-of-range ones are ignored. logits: (B, T) each."""
        outputs = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               output_attentions, output_hidden_states, kwargs=kwargs)
        logits = self.qa_outputs(outputs.last_hidden_state)
        start_logits, end_logits = logits.split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        total_loss = None
        if start_positions is not None and end_positions is not None:
            if start_positions.dim() > 1:
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            ignored_index = start_logits.size(1)
            start_positions = start_positions.clamp(0, ignored_index)
            end_positions = end_positions.clamp(0, ignored_index)
            loss_fct = CrossEntropyLoss(ignore_index=ignored_index)
            total_loss = (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2
        output = QuestionAnsweringModelOutput(loss=total_loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return _finish(output, self._return_dict(return_dict))
