"""CUDA graphs for small-batch inference: capture the forward once per (batch, length) bucket, then replay it.

At batch 1-8 a BERT forward is launch-bound: hundreds of small kernels whose CPU-side dispatch (Python, the custom
op layer, Triton's launcher) costs more than their GPU time. A CUDA graph replays the whole recorded kernel
sequence with one launch. The price: shapes are frozen per graph, so inputs are padded up to the next bucket
(padding is masked, so real tokens are unaffected), and every bucket keeps its own static input/output buffers.

    graphed = fastbert.cuda_graphs(model)          # or model.enable_cuda_graphs()
    out = graphed(input_ids=ids, attention_mask=mask)

Replays use the padded layout (a graph cannot hold the data-dependent shapes of padding removal). Calls a graph
cannot serve run eagerly: training mode, autograd enabled on a parameter that needs grad, inputs_embeds,
output_attentions / output_hidden_states, packed (cu_seqlens) input, or a batch / length above the largest bucket.
"""

from __future__ import annotations

import bisect
import contextlib
import threading

import torch

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)
DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


def bucket_for(value: int, buckets) -> int | None:
    """The smallest bucket >= value, or None when value exceeds every bucket."""
    i = bisect.bisect_left(buckets, value)
    return buckets[i] if i < len(buckets) else None


@contextlib.contextmanager
def _padded_layout(model):
    """Run ``model`` on the padded layout, as a CUDA-graph capture does: ``config.unpad_inputs = False`` on every
    config in the model (BertModel reads it), restored afterwards."""
    configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    missing = object()
    saved = {key: config.__dict__.get("unpad_inputs", missing) for key, config in configs.items()}
    try:
        for config in configs.values():
            config.unpad_inputs = False
        yield
    finally:
        for key, config in configs.items():
            if saved[key] is missing:
                config.__dict__.pop("unpad_inputs", None)
            else:
                config.unpad_inputs = saved[key]


class _Graph:
    """One captured forward: static inputs (input_ids, attention_mask, token_type_ids) and the outputs it fills."""

    def __init__(self, model, batch: int, seqlen: int, device, pool, warmup: int):
        self.inputs = {
            "input_ids": torch.zeros(batch, seqlen, dtype=torch.long, device=device),
            "attention_mask": torch.zeros(batch, seqlen, dtype=torch.long, device=device),
            "token_type_ids": torch.zeros(batch, seqlen, dtype=torch.long, device=device),
        }
        # The warm-up must run exactly the kernels the capture records: compiling and loading a Triton kernel,
        # autotuning or allocating a cuBLAS workspace inside the capture fails ("operation not permitted when stream
        # is capturing"). A capture keeps the padded layout with the mask (no unpadding plan: that needs a host
        # sync), so the warm-up runs with unpadding off (_padded_layout) and a mask with padding in every row, which
        # no path may drop as "all real" (an all-ones mask is dropped in eager mode: the unmasked attention kernel
        # would be warmed up instead of the masked one). It runs on a side stream, as torch.cuda.graphs requires.
        mask = self.inputs["attention_mask"]
        mask.fill_(1)
        mask[:, -1] = 0
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad(), _padded_layout(model):
            for _ in range(warmup):
                model(**self.inputs, return_dict=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
            self.outputs = model(**self.inputs, return_dict=True)

    def run(self, input_ids, attention_mask, token_type_ids, per_token):
        batch, seqlen = input_ids.shape
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                            ("token_type_ids", token_type_ids)):
            static = self.inputs[name]
            static.zero_()  # rows and columns past the real batch are padding (mask 0)
            if value is not None:
                static[:batch, :seqlen].copy_(value)
        if attention_mask is None:
            self.inputs["attention_mask"][:batch, :seqlen] = 1
        self.graph.replay()
        return _slice_outputs(self.outputs, batch, seqlen, per_token)


class CUDAGraphRunner(torch.nn.Module):
    """Wraps a fastbert model (BertModel or a head) so that eval forwards replay per-bucket CUDA graphs.

    batch_buckets / length_buckets: the shapes to capture, lazily on first use (each capture warms up the model
    first, costing a few forwards). Outputs of a replay are the graph's static buffers sliced to the caller's
    shape: they are overwritten by the next replay of the same bucket; clone them to keep them.
    """

    def __init__(self, model, batch_buckets=DEFAULT_BATCH_BUCKETS, length_buckets=DEFAULT_LENGTH_BUCKETS,
                 warmup: int = 3):
        super().__init__()
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the model on a CUDA device; it is on {device}. Move it with model.to('cuda') "
                "first, or call the model directly on CPU"
            )
        self.model = model
        self.batch_buckets = tuple(sorted(int(b) for b in batch_buckets))
        self.length_buckets = tuple(sorted(int(t) for t in length_buckets))
        max_positions = model.config.max_position_embeddings
        if not self.batch_buckets or not self.length_buckets or self.batch_buckets[0] < 1 or \
                self.length_buckets[0] < 1 or self.length_buckets[-1] > max_positions:
            raise ValueError(
                f"batch_buckets and length_buckets must be non-empty positive sizes, lengths at most "
                f"max_position_embeddings={max_positions}; got {batch_buckets} and {length_buckets}"
            )
        self.warmup = int(warmup)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = None
        self._lock = threading.Lock()

    def _graphable(self, kwargs) -> bool:
        if self.model.training or any(kwargs.get(k) is not None for k in (
                "inputs_embeds", "cu_seqlens", "position_ids", "labels", "start_positions", "end_positions",
                "next_sentence_label")):
            return False
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters()):
            return False
        ids = kwargs.get("input_ids")
        return isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.device.type == "cuda"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if not self._graphable(kwargs):
            return self.model(**kwargs)
        batch, seqlen = input_ids.shape
        key = (bucket_for(batch, self.batch_buckets), bucket_for(seqlen, self.length_buckets))
        if None in key or batch == 0 or seqlen == 0:
            return self.model(**kwargs)
        # Validate the caller's inputs eagerly (cheap on these sizes): the graph itself runs no checks.
        from fastbert.validation import check_model_inputs

        check_model_inputs(self.model.config, input_ids, attention_mask, token_type_ids, None, None)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                # Static buffers must be ordinary tensors even when the first call runs under inference_mode.
                with torch.inference_mode(False):
                    graph = _Graph(self.model, *key, input_ids.device, self._pool, self.warmup)
                self._graphs[key] = graph
            result = graph.run(input_ids, attention_mask, token_type_ids, self._per_token_fields())
        return result if kwargs.get("return_dict", True) is not False else result.to_tuple()

    def _per_token_fields(self) -> frozenset:
        fields = {"last_hidden_state", "prediction_logits", "start_logits", "end_logits"}
        if type(self.model).__name__ in ("BertForMaskedLM", "BertForTokenClassification"):
            fields.add("logits")  # (B, T, ...) here; (B, num_labels) for the sequence-level heads
        return frozenset(fields)

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (batch, length) buckets captured so far."""
        return sorted(self._graphs)


def _slice_outputs(outputs, batch: int, seqlen: int, per_token):
    """The graph's outputs cut to the caller's (batch, seqlen): per-token fields (B, T, ...), per-sequence (B, ...)."""
    sliced = {}
    for name, value in outputs.items():
        if isinstance(value, torch.Tensor):
            value = value[:batch, :seqlen] if name in per_token else value[:batch]
        sliced[name] = value
    return type(outputs)(**sliced)


def cuda_graphs(model, batch_buckets=DEFAULT_BATCH_BUCKETS, length_buckets=DEFAULT_LENGTH_BUCKETS, warmup: int = 3):
    """``CUDAGraphRunner(model, ...)``: replay per-bucket CUDA graphs for eval forwards of small batches."""
    return CUDAGraphRunner(model, batch_buckets, length_buckets, warmup)
