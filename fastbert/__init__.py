"""fastbert: a drop-in replacement for transformers' BERT whose hot ops run on fused kernels.

    from fastbert import AutoTokenizer, BertForSequenceClassification   # instead of `from transformers import ...`
"""

from transformers import AutoTokenizer, BertConfig, BertTokenizer, BertTokenizerFast

from fastbert.convert import from_hf
from fastbert.cuda_graphs import CUDAGraphRunner, cuda_graphs
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
from fastbert.ops import BackendUnavailableError, backends, set_backend, set_deterministic
from fastbert.padding import pack, unpack
from fastbert.validation import set_input_checks

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
    "CUDAGraphRunner",
    "backends",
    "cuda_graphs",
    "from_hf",
    "pack",
    "set_backend",
    "set_deterministic",
    "set_input_checks",
    "unpack",
]
