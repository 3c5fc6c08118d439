"""Loading checkpoints safely: a pytorch_model.bin whose pickle would run code is refused before any of it runs (the
payload here creates a marker file), ``weights_only=False`` is refused, and a safetensors checkpoint that does not
match the model reports its missing, unexpected and mismatched keys by name."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
import transformers
from safetensors.torch import save_file

import fastbert

CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
              max_position_embeddings=12, num_labels=2)


class _Payload:
    """Unpickling this calls open(marker, "w"): code execution, made visible by the file it creates."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _checkpoint_dir(tmp_path, how):
    config = transformers.BertConfig(**CONFIG)
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    state = dict(transformers.BertModel(config).state_dict())
    marker = tmp_path / "payload-ran"
    state["pooler.dense.extra"] = _Payload(str(marker))
    path = tmp_path / "pytorch_model.bin"
    if how == "zip":
        torch.save(state, path)  # torch's default (zip) format
    elif how == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle named like a checkpoint
        with open(path, "wb") as f:
            pickle.dump(state, f)
    return marker


@pytest.mark.parametrize("how", ["zip", "legacy", "raw pickle"])
@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification"])
def test_code_in_a_pickled_checkpoint_is_refused_without_running(tmp_path, name, how):
    marker = _checkpoint_dir(tmp_path, how)
    with pytest.raises(pickle.UnpicklingError) as info:
        getattr(fastbert, name).from_pretrained(tmp_path)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "arbitrary code" in message, message
    assert "weights_only=False` will likely succeed" not in message  # torch's advice is not repeated
    assert not marker.exists(), "the pickled payload ran"


def test_weights_only_false_is_refused(tmp_path):
    marker = _checkpoint_dir(tmp_path, "zip")
    with pytest.raises(ValueError, match="weights_only"):
        fastbert.BertModel.from_pretrained(tmp_path, weights_only=False)
    assert not marker.exists()


def test_a_plain_pytorch_model_bin_still_loads(tmp_path):
    config = transformers.BertConfig(**CONFIG)
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    hf = transformers.BertModel(config)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    fb, info = fastbert.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(fb.pooler.dense.weight, hf.pooler.dense.weight, rtol=0, atol=0)


def _safetensors_dir(tmp_path, edit):
    config = transformers.BertConfig(**CONFIG)
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    state = {k: v.clone().contiguous() for k, v in transformers.BertModel(config).state_dict().items()}
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))


def _drop_and_add(state):
    del state["encoder.layer.0.output.dense.weight"]
    state["encoder.layer.0.extra.weight"] = torch.zeros(3)


@pytest.fixture
def load_report():
    """The text transformers logs while loading (its load report is a warning on the "transformers" logger, whose
    own stderr handler does not propagate to pytest's log capture)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield lambda: "\n".join(records)
    logger.removeHandler(handler)


def test_missing_and_unexpected_keys_are_reported_by_name(tmp_path, load_report):
    _safetensors_dir(tmp_path, _drop_and_add)
    _, info = fastbert.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"encoder.layer.0.output.dense.weight"}
    assert set(info["unexpected_keys"]) == {"encoder.layer.0.extra.weight"}
    report = load_report()
    for key, status in [("encoder.layer.0.output.dense.weight", "MISSING"), ("encoder.layer.0.extra.weight",
                                                                              "UNEXPECTED")]:
        assert any(key in line and status in line for line in report.splitlines()), report


def test_a_shape_mismatch_is_an_error_naming_the_key(tmp_path, load_report):
    _safetensors_dir(tmp_path, lambda state: state.update({"pooler.dense.bias": torch.zeros(5)}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        fastbert.BertModel.from_pretrained(tmp_path)
    report = load_report()
    assert any("pooler.dense.bias" in line and "MISMATCH" in line for line in report.splitlines()), report
    # With ignore_mismatched_sizes the key is re-initialized and reported, as in transformers.
    _, info = fastbert.BertModel.from_pretrained(tmp_path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert [key for key, *_ in info["mismatched_keys"]] == ["pooler.dense.bias"]


def test_from_hf_reports_what_does_not_fit():
    # from_hf converts a model in memory (no file, no pickle): a module tree that is not BERT's is refused by name.
    config = transformers.BertConfig(**CONFIG)
    torch.manual_seed(0)
    hf = transformers.BertModel(config)
    hf.encoder.layer[0].attention.self.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra"):
        fastbert.from_hf(hf)
    assert not os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")  # no test here relies on weakening torch.load
