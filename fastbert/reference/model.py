"""The whole BERT model in float64 NumPy, built from a transformers-style state dict: the ground truth in tests.

It follows transformers' BertModel (post-LN, absolute positions) and its task heads, composed from the op
references in fastbert.ops.*.reference so that the model and the ops share one definition of each numeric.
Inference only: no dropout. Two deliberate differences, both fastbert's documented choices: a sequence with no
real token gets zero attention output, where transformers attends uniformly over the padding; and the layers'
outputs hold 0 at padded positions (fastbert computes real tokens only), where transformers lets padded queries
attend to the real tokens. Real tokens are the same either way.

    ref = BertReference(config, model.state_dict())
    out = ref.forward(input_ids, attention_mask)      # dict: last_hidden_state, pooler_output, ...
"""

import numpy as np

from fastbert.ops.attention.reference import attention_fwd_ref, attention_probs_ref
from fastbert.ops.bias_gelu.reference import bias_gelu_fwd_ref, bias_gelu_layer_norm_fwd_ref
from fastbert.ops.layer_norm.reference import layer_norm_fwd_ref

__all__ = ["BertReference", "cross_entropy_ref", "state_dict_to_numpy"]

# hidden_act -> `approximate` of the GELU reference. gelu_fast uses a constant rounded to 10 digits
# (0.7978845608 for sqrt(2/pi)); the difference is ~3e-12 relative, far below any kernel tolerance.
_GELU_APPROXIMATE = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
}


def _relu(x):
    return np.maximum(x, 0.0)


def _silu(x):
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x << 0, giving x / inf = -0: correct
        return x / (1.0 + np.exp(-x))


_OTHER_ACTIVATIONS = {"relu": _relu, "silu": _silu, "swish": _silu}


def state_dict_to_numpy(state_dict):
    """Convert a state dict of torch tensors or array-likes to {name: float64 numpy array}.

    Torch is duck-typed (anything with .detach is treated as a tensor), so this module never imports torch.
    """
    arrays = {}
    for name, value in state_dict.items():
        if hasattr(value, "detach"):
            arrays[name] = value.detach().cpu().double().numpy()
        else:
            arrays[name] = np.asarray(value, dtype=np.float64)
    return arrays


def _canonical_name(name):
    """transformers' name without the "bert." prefix; old TF-style LayerNorm gamma/beta become weight/bias."""
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    return name


def _linear(x, weight, bias=None):
    """x: (..., in); weight: (out, in) as in torch.nn.Linear; bias: (out,) or None. Returns (..., out)."""
    out = x @ weight.T
    return out if bias is None else out + bias


def cross_entropy_ref(logits, labels, ignore_index=-100):
    """Mean cross-entropy over the labels that are not ignore_index, like torch.nn.functional.cross_entropy.

    logits: (..., num_classes); labels: logits.shape[:-1] integers. Returns a float (nan when every label is
    ignored, as torch does).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must equal logits.shape[:-1] = {logits.shape[:-1]}")
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != ignore_index
    if not keep.any():
        return float("nan")
    logits, labels = logits[keep], labels[keep]
    row_max = logits.max(axis=-1, keepdims=True)
    log_norm = row_max[:, 0] + np.log(np.exp(logits - row_max).sum(axis=-1))
    picked = logits[np.arange(labels.size), labels]
    return float((log_norm - picked).mean())


class BertReference:
    """BERT forward pass and task heads in float64 NumPy.

    config: any object with transformers' BertConfig attributes (vocab_size, hidden_size, num_hidden_layers,
        num_attention_heads, intermediate_size, hidden_act, max_position_embeddings, type_vocab_size,
        layer_norm_eps, num_labels).
    state_dict: transformers' BERT parameter names, with or without the "bert." prefix; torch tensors or arrays.
    Inputs of every method: input_ids, token_type_ids, position_ids: (batch, seqlen) ints; attention_mask:
    (batch, seqlen), 1 = real token, 0 = padding. Defaults: all real, token type 0, positions 0..seqlen-1.
    """

    def __init__(self, config, state_dict):
        self.config = config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}"
            )
        self.head_dim = self.hidden_size // self.num_heads
        self.eps = float(config.layer_norm_eps)
        self.max_positions = int(config.max_position_embeddings)
        self.hidden_act = config.hidden_act
        if self.hidden_act not in _GELU_APPROXIMATE and self.hidden_act not in _OTHER_ACTIVATIONS:
            supported = sorted([*_GELU_APPROXIMATE, *_OTHER_ACTIVATIONS])
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported by the reference; use one of {supported}"
            )
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported; only 'absolute' is")
        self.params = {_canonical_name(k): v for k, v in state_dict_to_numpy(state_dict).items()}
        self.has_pooler = "pooler.dense.weight" in self.params

    # ---- helpers -------------------------------------------------------------------------------------------

    def _p(self, name):
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"state dict has no {name!r} (needed here); names are transformers' BERT names") from None

    def _activation(self, x, bias):
        """hidden_act(x + bias); x: (..., n), bias: (n,). GELU goes through the bias_gelu op reference."""
        if self.hidden_act in _GELU_APPROXIMATE:
            return bias_gelu_fwd_ref(x, bias, _GELU_APPROXIMATE[self.hidden_act])
        return _OTHER_ACTIVATIONS[self.hidden_act](x + bias)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids):
        """Validate and fill defaults; returns (input_ids, key_padding_mask or None, token_type_ids, position_ids)."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {input_ids.shape}")
        batch, seqlen = input_ids.shape
        if seqlen > self.max_positions:
            raise ValueError(f"seqlen {seqlen} exceeds max_position_embeddings {self.max_positions}")
        named = {"attention_mask": attention_mask, "token_type_ids": token_type_ids, "position_ids": position_ids}
        for name, value in named.items():
            if value is not None and np.shape(value) != (batch, seqlen):
                raise ValueError(f"{name} must have input_ids' shape {(batch, seqlen)}, got {np.shape(value)}")
        key_padding_mask = None if attention_mask is None else np.asarray(attention_mask) != 0
        if token_type_ids is None:
            token_type_ids = np.zeros((batch, seqlen), dtype=np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(seqlen), (batch, seqlen))
        return input_ids, key_padding_mask, np.asarray(token_type_ids), np.asarray(position_ids)

    # ---- model ---------------------------------------------------------------------------------------------

    def embeddings(self, input_ids, token_type_ids=None, position_ids=None):
        """LayerNorm(word + token_type + position embeddings). Returns (batch, seqlen, hidden) float64."""
        input_ids, _, token_type_ids, position_ids = self._check_inputs(input_ids, None, token_type_ids, position_ids)
        word = self._p("embeddings.word_embeddings.weight")[input_ids]  # (B, S, C)
        token_type = self._p("embeddings.token_type_embeddings.weight")[token_type_ids]
        position = self._p("embeddings.position_embeddings.weight")[position_ids]
        ln = "embeddings.LayerNorm."
        ln_weight, ln_bias = self._p(ln + "weight"), self._p(ln + "bias")
        out, _, _ = layer_norm_fwd_ref(word, token_type + position, ln_weight, ln_bias, self.eps)
        return out

    def _self_attention(self, layer, hidden, key_padding_mask, need_probs):
        """Multi-head self-attention of one layer before its output projection.

        hidden: (batch, seqlen, hidden); key_padding_mask: (batch, seqlen) bool or None.
        Returns context: (batch, seqlen, hidden) and probs: (batch, heads, seqlen, seqlen) or None.
        """
        batch, seqlen, _ = hidden.shape
        prefix = f"encoder.layer.{layer}.attention.self."
        heads = (batch, seqlen, self.num_heads, self.head_dim)
        q, k, v = (
            _linear(hidden, self._p(prefix + name + ".weight"), self._p(prefix + name + ".bias")).reshape(heads)
            for name in ("query", "key", "value")
        )  # each (B, S, H, D)
        context, _ = attention_fwd_ref(q, k, v, key_padding_mask)  # (B, S, H, D)
        probs = attention_probs_ref(q, k, key_padding_mask)[0] if need_probs else None
        return context.reshape(batch, seqlen, self.hidden_size), probs

    def _layer(self, layer, hidden, key_padding_mask, need_probs):
        """One post-LN encoder layer: (batch, seqlen, hidden) -> same, plus attention probs or None."""
        prefix = f"encoder.layer.{layer}."
        context, probs = self._self_attention(layer, hidden, key_padding_mask, need_probs)
        attn_out = _linear(
            context, self._p(prefix + "attention.output.dense.weight"), self._p(prefix + "attention.output.dense.bias")
        )
        ln = prefix + "attention.output.LayerNorm."
        hidden, _, _ = layer_norm_fwd_ref(attn_out, hidden, self._p(ln + "weight"), self._p(ln + "bias"), self.eps)
        intermediate = self._activation(
            hidden @ self._p(prefix + "intermediate.dense.weight").T, self._p(prefix + "intermediate.dense.bias")
        )  # (B, S, I)
        mlp_out = _linear(intermediate, self._p(prefix + "output.dense.weight"), self._p(prefix + "output.dense.bias"))
        ln = prefix + "output.LayerNorm."
        hidden, _, _ = layer_norm_fwd_ref(mlp_out, hidden, self._p(ln + "weight"), self._p(ln + "bias"), self.eps)
        return hidden, probs

    def encoder(self, hidden, attention_mask=None, output_hidden_states=False, output_attentions=False):
        """Run the encoder layers.

        hidden: (batch, seqlen, hidden) embedding output; attention_mask: (batch, seqlen), 1 = real, 0 = pad.
        Returns (last_hidden, hidden_states, attentions):
            last_hidden: (batch, seqlen, hidden);
            hidden_states: tuple of num_layers + 1 arrays (embedding output first), or None if not asked;
            attentions: tuple of num_layers arrays (batch, heads, seqlen, seqlen), or None if not asked.
        """
        hidden = np.asarray(hidden, dtype=np.float64)
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must be (batch, seqlen, {self.hidden_size}), got shape {hidden.shape}")
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = np.asarray(attention_mask) != 0
            if key_padding_mask.shape != hidden.shape[:2]:
                raise ValueError(
                    f"attention_mask must be (batch, seqlen) = {hidden.shape[:2]}, got {key_padding_mask.shape}"
                )
        hidden_states = [hidden] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in range(self.num_layers):
            hidden, probs = self._layer(layer, hidden, key_padding_mask, output_attentions)
            if key_padding_mask is not None:
                # fastbert's padded positions hold 0 (padded keys are masked, so real tokens do not see them)
                hidden = np.where(key_padding_mask[..., None], hidden, 0.0)
            if output_hidden_states:
                hidden_states.append(hidden)
            if output_attentions:
                attentions.append(probs)
        return (
            hidden,
            None if hidden_states is None else tuple(hidden_states),
            None if attentions is None else tuple(attentions),
        )

    def pooler(self, last_hidden):
        """tanh(dense(first token)): (batch, seqlen, hidden) -> (batch, hidden), or None without pooler weights."""
        if not self.has_pooler:
            return None
        return np.tanh(_linear(last_hidden[:, 0], self._p("pooler.dense.weight"), self._p("pooler.dense.bias")))

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        output_hidden_states=True,
        output_attentions=True,
    ):
        """BertModel's forward. Returns a dict:
        last_hidden_state: (batch, seqlen, hidden); pooler_output: (batch, hidden) or None;
        hidden_states: tuple of num_layers + 1 (batch, seqlen, hidden), or None when not asked;
        attentions: tuple of num_layers (batch, heads, seqlen, seqlen), or None when not asked.
        """
        input_ids, key_padding_mask, token_type_ids, position_ids = self._check_inputs(
            input_ids, attention_mask, token_type_ids, position_ids
        )
        embedded = self.embeddings(input_ids, token_type_ids, position_ids)
        last_hidden, hidden_states, attentions = self.encoder(
            embedded, key_padding_mask, output_hidden_states, output_attentions
        )
        return {
            "last_hidden_state": last_hidden,
            "pooler_output": self.pooler(last_hidden),
            "hidden_states": hidden_states,
            "attentions": attentions,
        }

    def _features(self, input_ids, attention_mask, token_type_ids, position_ids):
        out = self.forward(
            input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states=False, output_attentions=False
        )
        return out["last_hidden_state"], out["pooler_output"]

    def _pooled(self, pooled):
        if pooled is None:
            raise KeyError("this head needs the pooler, but the state dict has no 'pooler.dense.weight'")
        return pooled

    # ---- heads ---------------------------------------------------------------------------------------------

    def _mlm_logits_from_hidden(self, last_hidden):
        """BertLMPredictionHead: (batch, seqlen, hidden) -> (batch, seqlen, vocab)."""
        prefix = "cls.predictions."
        dense = last_hidden @ self._p(prefix + "transform.dense.weight").T
        dense_bias = self._p(prefix + "transform.dense.bias")
        ln_weight = self._p(prefix + "transform.LayerNorm.weight")
        ln_bias = self._p(prefix + "transform.LayerNorm.bias")
        if self.hidden_act in _GELU_APPROXIMATE:
            transformed, _, _ = bias_gelu_layer_norm_fwd_ref(
                dense, dense_bias, ln_weight, ln_bias, self.eps, _GELU_APPROXIMATE[self.hidden_act]
            )
        else:
            activated = _OTHER_ACTIVATIONS[self.hidden_act](dense + dense_bias)
            transformed, _, _ = layer_norm_fwd_ref(activated, None, ln_weight, ln_bias, self.eps)
        # The decoder is tied to the word embeddings and its bias to cls.predictions.bias, unless the state dict
        # carries its own: transformers' forward uses decoder.weight/decoder.bias, which differ when untied.
        decoder = self.params.get(prefix + "decoder.weight")
        if decoder is None:
            decoder = self._p("embeddings.word_embeddings.weight")
        bias = self.params.get(prefix + "decoder.bias")
        if bias is None:
            bias = self._p(prefix + "bias")
        return _linear(transformed, decoder, bias)

    def _next_sentence_from_pooled(self, pooled):
        """BertOnlyNSPHead: (batch, hidden) -> (batch, 2)."""
        weight, bias = self._p("cls.seq_relationship.weight"), self._p("cls.seq_relationship.bias")
        return _linear(self._pooled(pooled), weight, bias)

    def masked_lm_logits(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """BertForMaskedLM logits: (batch, seqlen, vocab)."""
        last_hidden, _ = self._features(input_ids, attention_mask, token_type_ids, position_ids)
        return self._mlm_logits_from_hidden(last_hidden)

    def pretraining_logits(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """BertForPreTraining: (prediction_logits (batch, seqlen, vocab), seq_relationship_logits (batch, 2))."""
        last_hidden, pooled = self._features(input_ids, attention_mask, token_type_ids, position_ids)
        return self._mlm_logits_from_hidden(last_hidden), self._next_sentence_from_pooled(pooled)

    def next_sentence_logits(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """BertForNextSentencePrediction logits: (batch, 2)."""
        _, pooled = self._features(input_ids, attention_mask, token_type_ids, position_ids)
        return self._next_sentence_from_pooled(pooled)

    def sequence_classification_logits(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """BertForSequenceClassification logits: (batch, num_labels)."""
        _, pooled = self._features(input_ids, attention_mask, token_type_ids, position_ids)
        return _linear(self._pooled(pooled), self._p("classifier.weight"), self._p("classifier.bias"))

    def token_classification_logits(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """BertForTokenClassification logits: (batch, seqlen, num_labels)."""
        last_hidden, _ = self._features(input_ids, attention_mask, token_type_ids, position_ids)
        return _linear(last_hidden, self._p("classifier.weight"), self._p("classifier.bias"))

    def question_answering_logits(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """BertForQuestionAnswering: (start_logits (batch, seqlen), end_logits (batch, seqlen))."""
        last_hidden, _ = self._features(input_ids, attention_mask, token_type_ids, position_ids)
        logits = _linear(last_hidden, self._p("qa_outputs.weight"), self._p("qa_outputs.bias"))  # (B, S, 2)
        return logits[..., 0], logits[..., 1]

    def multiple_choice_logits(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """BertForMultipleChoice logits: inputs (batch, num_choices, seqlen) -> (batch, num_choices)."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 3:
            raise ValueError(f"input_ids must be (batch, num_choices, seqlen), got shape {input_ids.shape}")
        batch, num_choices, seqlen = input_ids.shape

        def flat(value):
            return None if value is None else np.asarray(value).reshape(batch * num_choices, seqlen)

        _, pooled = self._features(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids))
        logits = _linear(self._pooled(pooled), self._p("classifier.weight"), self._p("classifier.bias"))
        return logits.reshape(batch, num_choices)
