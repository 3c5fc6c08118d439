"""fastbert: a drop-in replacement for transformers' BERT whose hot ops run on fused kernels.

    from fastbert import AutoTokenizer, BertForSequenceClassification   # instead of `from transformers import ...`
"""

from transformers import AutoTokenizer, BertConfig, BertTokenizer, BertTokenizerFast

from fastbert.convert import from_hf
from fastbert.modeling import BertModel, BertPreTrainedModel
from fastbert.modeling_heads import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from fastbert.ops import BackendUnavailableError, backends, set_backend

__version__ = "0.1.0"

__all__ = [
    "AutoTokenizer",
    "BackendUnavailableError",
    "BertConfig",
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForNextSentencePrediction",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "BertPreTrainedModel",
    "BertTokenizer",
    "BertTokenizerFast",
    "backends",
    "from_hf",
    "set_backend",
]
