"""ONNX Runtime and OpenVINO as providers of ``fastbert bench``: the CPU runtimes people serve BERT encoders with.

Both run the model the torch providers copy (same weights), exported once per run to ONNX with dynamic batch and
sequence axes. ONNX Runtime runs that graph after its BERT fusion optimizer (fused Attention, SkipLayerNormalization,
BiasGelu, EmbedLayerNormalization; the counts go into the result), OpenVINO compiles it for the CPU with a static
shape per benchmark shape (its fastest setting) and the requested inference precision. Both get torch's thread
count, and their worker threads are told not to spin after a call (ORT) or are not given a spinning mode (OpenVINO
has none to set); ``timing.time_alternating``'s untimed call before each short timed call keeps any tail of one
runtime's pool out of the next provider's sample.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import tempfile
import warnings
from collections import Counter

import numpy as np
import torch

PEER_PROVIDERS = ("onnxruntime", "onnxruntime-int8", "openvino")
_NEEDS = {"onnxruntime": ("onnx", "onnxruntime"), "onnxruntime-int8": ("onnx", "onnxruntime"),
          "openvino": ("onnx", "openvino")}
PIP_HINT = 'pip install onnxruntime openvino onnx onnxscript (or the checkout\'s extra: pip install -e ".[peers]")'
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# The ops ORT's BERT optimizer fuses; a row whose graph lacks fused Attention or SkipLayerNormalization is not
# the ONNX Runtime people deploy, so the row says so.
ORT_FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu",
                 "Gelu", "FastGelu", "LayerNormalization")
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_OV_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}


def unavailable(name: str) -> str | None:
    """Why peer ``name`` cannot run here (a missing package, with the pip command), or None."""
    missing = [m for m in _NEEDS[name] if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed: {PIP_HINT}"
    return None


class _LastHidden(torch.nn.Module):
    """BertModel -> last_hidden_state, with token_type_ids as an input so the embedding fusion sees all three."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def _export(spec, path: str) -> str:
    """Export spec.hf_model (eager attention: the pattern ORT's fusion recognizes) to ONNX; returns the exporter.

    The TorchScript exporter (``dynamo=False``) comes first: its graph is the one ORT's BERT optimizer fuses into
    Attention (the dynamo exporter's graph, as of torch 2.13 / onnxscript 0.7, fuses LayerNorms and GELU but not
    attention). Where a torch lacks it, the dynamo exporter with dynamic batch/sequence dims is the fallback."""
    wrapper = _LastHidden(spec.hf_model).eval()  # export restores the wrapper's mode: a fresh Module is in train mode
    ids = torch.full((2, 8), min(1000, spec.config.vocab_size - 1), dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # padding in the example, so that no all-ones shortcut of the mask code is traced
    args = (ids, mask, torch.zeros_like(ids))
    names = dict(input_names=list(INPUT_NAMES), output_names=["last_hidden_state"])
    has_dynamo_flag = "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch >= 2.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters warn about tracing transformers' mask code; not actionable
        try:
            kwargs = {"dynamo": False} if has_dynamo_flag else {}
            torch.onnx.export(wrapper, args, path, opset_version=17, **names, **kwargs,
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in (*INPUT_NAMES, "last_hidden_state")})
            return "torch.onnx.export (TorchScript)"
        except Exception as legacy_error:  # noqa: BLE001 - any failure of the old exporter: try the new one
            batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
            try:
                torch.onnx.export(wrapper, args, path, dynamo=True, **names,
                                  dynamic_shapes={n: {0: batch, 1: seq} for n in INPUT_NAMES})
            except Exception as dynamo_error:
                raise RuntimeError(f"ONNX export failed: TorchScript exporter: {legacy_error}; "
                                   f"dynamo exporter: {dynamo_error}") from dynamo_error
            return "torch.onnx.export (dynamo)"


class PeerCache:
    """Per-model ONNX files and runtime sessions, built once per run and shared by every shape."""

    def __init__(self, spec):
        self.spec = spec
        self._dir = tempfile.TemporaryDirectory(prefix="fastbert-bench-peers-")
        self._items = {}

    def get(self, key, build):
        if key not in self._items:
            self._items[key] = build()
        return self._items[key]

    def path(self, name: str) -> str:
        return os.path.join(self._dir.name, name)

    def onnx(self) -> tuple[str, str]:
        def build():
            path = self.path("model.onnx")
            return path, _export(self.spec, path)

        return self.get("onnx", build)

    def ort_model(self, dtype_name: str) -> tuple[str, dict]:
        """The ORT-optimized ONNX file for fp32 / fp16 / int8, and what was done to it."""

        def build():
            from onnxruntime.transformers.optimizer import optimize_model

            source, exporter = self.onnx()
            config = self.spec.config
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimized = optimize_model(source, model_type="bert", num_heads=config.num_attention_heads,
                                           hidden_size=config.hidden_size)
            stats = optimized.get_fused_operator_statistics()
            fused = {op: int(stats.get(op, 0)) for op in ORT_FUSED_OPS if stats.get(op, 0)}
            info = {"exporter": exporter, "optimizer": "onnxruntime.transformers.optimizer (model_type=bert)",
                    "fused_ops": fused,
                    "fusion_complete": bool(fused.get("Attention", 0) + fused.get("MultiHeadAttention", 0)
                                            and fused.get("SkipLayerNormalization", 0))}
            path = self.path("optimized-fp32.onnx")
            optimized.save_model_to_file(path)
            return path, info

        if dtype_name == "fp32":
            return self.get(("ort", "fp32"), build)
        base_path, base_info = self.get(("ort", "fp32"), build)

        def derive():
            import onnx

            if dtype_name == "fp16":
                from onnxruntime.transformers.onnx_model import OnnxModel

                model = OnnxModel(onnx.load(base_path))
                model.convert_float_to_float16(keep_io_types=True)  # ids in, fp32 last_hidden_state out
                path = self.path("optimized-fp16.onnx")
                model.save_model_to_file(path)
                return path, {**base_info, "precision": "fp16 weights and activations (keep_io_types)"}
            from onnxruntime.quantization import QuantType, quantize_dynamic

            path = self.path("optimized-int8.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(base_path, path, weight_type=QuantType.QInt8,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            return path, {**base_info, "precision": "int8 weights, dynamically quantized activations (quantized)"}

        return self.get(("ort", dtype_name), derive)

    def ort_session(self, dtype_name: str, threads: int):
        def build():
            import onnxruntime as ort

            path, info = self.ort_model(dtype_name)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Spinning workers would keep the cores busy after run() returns, taxing whichever provider runs next.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            info = {**info, "onnxruntime": ort.__version__, "intra_op_num_threads": threads,
                    "allow_spinning": "0", "execution_provider": session.get_providers()[0]}
            return session, info

        return self.get(("ort-session", dtype_name, threads), build)

    def openvino_compiled(self, dtype_name: str, threads: int, shape: tuple[int, int] | None):
        def build():
            import openvino as ov

            core = ov.Core()
            source, exporter = self.onnx()
            model = core.read_model(source)
            if shape is not None:  # static: OpenVINO's fastest setting for a fixed benchmark shape
                model.reshape({inp.get_any_name(): list(shape) for inp in model.inputs})
            config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[dtype_name], "INFERENCE_NUM_THREADS": threads,
                      "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
            compiled = core.compile_model(model, "CPU", config)
            precisions = Counter()
            for op in compiled.get_runtime_model().get_ordered_ops():
                rt = op.get_rt_info()
                kind = rt["layerType"].astype(str)
                if kind in ("FullyConnected", "MatMul", "ScaledDotProductAttention"):
                    precisions[f"{kind} {rt['runtimePrecision'].astype(str)}"] += 1
            info = {"exporter": exporter, "openvino": ov.__version__,
                    "shapes": "dynamic" if shape is None else "static, one per benchmark shape",
                    "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
                    "inference_num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
                    "runtime_precisions": dict(precisions)}
            return compiled, info

        return self.get(("ov", dtype_name, threads, shape), build)


def _type_name(ov_type) -> str:
    return ov_type.to_string() if hasattr(ov_type, "to_string") else str(ov_type)


class PeerProvider:
    """Same interface as models.Provider for inference: ``forward()`` returns last_hidden_state as a CPU tensor."""

    model = None  # nothing to switch between train and eval

    def __init__(self, name, run, info):
        self.name, self._run, self.info = name, run, info

    def forward(self):
        return torch.from_numpy(self._run())


def _feed(batch: dict) -> dict:
    ids = batch["input_ids"].cpu().numpy().astype(np.int64)
    return {"input_ids": ids, "attention_mask": batch["attention_mask"].cpu().numpy().astype(np.int64),
            "token_type_ids": np.zeros_like(ids)}


def build(name: str, cache: PeerCache, batch: dict, device, dtype_name: str, train: bool):
    """(PeerProvider, None) or (None, the reason it is skipped)."""
    if train:
        return None, "inference runtime: no training step"
    if device.type != "cpu":
        return None, "benchmarked on CPU only (its GPU execution providers are not part of this bench)"
    reason = unavailable(name)
    if reason:
        return None, reason
    threads = torch.get_num_threads()
    feed = _feed(batch)
    if name.startswith("onnxruntime"):
        if name == "onnxruntime" and dtype_name == "bf16":
            return None, ("ONNX Runtime's CPU execution provider has no bf16 kernels (MatMul, Attention); "
                          "its bf16 row does not exist, see --dtype fp32")
        session, info = cache.ort_session("int8" if name == "onnxruntime-int8" else dtype_name, threads)
        if name == "onnxruntime-int8":
            info = {**info, "quantized": True}
        return PeerProvider(name, lambda: session.run(None, feed)[0], info), None
    import openvino as ov

    if _OV_CAPABILITY[dtype_name] not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return None, f"OpenVINO's CPU plugin reports no {dtype_name} support on this CPU"
    compiled, info = cache.openvino_compiled(dtype_name, threads, tuple(batch["input_ids"].shape))
    request = compiled.create_infer_request()
    # share_outputs: the result stays in OpenVINO's buffer, as torch providers hand back their own tensor
    return PeerProvider(name, lambda: request.infer(feed, share_inputs=True, share_outputs=True)[0], info), None
