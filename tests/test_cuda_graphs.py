"""fastbert.cuda_graphs: per-bucket CUDA graph replay of eval forwards. The replay tests need a GPU; bucket choice,
argument checks, the CPU refusal and the warm-up-equals-capture check (a simulated capture) run everywhere."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastbert
from fastbert.cuda_graphs import bucket_for

GPU = torch.cuda.is_available()


def test_bucket_for():
    buckets = (1, 2, 4, 8)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert bucket_for(9, buckets) is None


def test_cpu_model_is_refused(make_config, make_pair):
    _, fb = make_pair("BertModel", make_config(), seed=0)
    with pytest.raises(ValueError, match="CUDA device"):
        fastbert.cuda_graphs(fb)


@pytest.mark.parametrize("buckets", [dict(batch_buckets=()), dict(length_buckets=(16, 10_000)),
                                     dict(batch_buckets=(0, 2))])
@pytest.mark.skipif(not GPU, reason="the argument checks run after the device check")
@pytest.mark.cuda
def test_bad_buckets(buckets, make_config, make_pair):
    _, fb = make_pair("BertModel", make_config(), seed=0)
    with pytest.raises(ValueError, match="buckets"):
        fastbert.cuda_graphs(fb.cuda(), **buckets)


def _batch(config, lengths, seqlen, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (len(lengths), seqlen), generator=gen)
    mask = (torch.arange(seqlen)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0).cuda(), "attention_mask": mask.cuda()}


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification", "BertForTokenClassification"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA GPU")
def test_replay_matches_eager(name, dtype, make_config, make_pair):
    config = make_config(max_position_embeddings=128)
    _, fb = make_pair(name, config, seed=1)
    fb = fb.cuda().to(dtype).eval()
    graphed = fastbert.cuda_graphs(fb, batch_buckets=(2, 4), length_buckets=(16, 32))
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    for seed, (lengths, seqlen) in enumerate([([9, 3, 12], 12), ([5], 5), ([20, 17], 20), ([4, 4, 4], 12)]):
        batch = _batch(config, lengths, seqlen, seed)
        with torch.inference_mode():
            expected = fb(**batch)
            got = graphed(**batch)
        real = batch["attention_mask"].bool()
        key = "last_hidden_state" if name == "BertModel" else "logits"
        e, g = expected[key], got[key]
        assert g.shape == e.shape
        if e.dim() == 3:
            e, g = e[real], g[real]
        torch.testing.assert_close(g.float(), e.float(), rtol=0, atol=atol)
    assert graphed.captured == [(2, 16), (2, 32), (4, 16)]  # 3x12 and 3x12 share (4, 16); 1x5 -> (2, 16)


def _graphed_base_model(make_config, make_pair, seed):
    """(config, fp32 BertModel on the GPU in eval mode, its cuda_graphs wrapper with one (2, 16) bucket)."""
    config = make_config(max_position_embeddings=128)
    _, fb = make_pair("BertModel", config, seed=seed)
    fb = fb.cuda().eval()
    return config, fb, fastbert.cuda_graphs(fb, batch_buckets=(2,), length_buckets=(16,))


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA GPU")
def test_calls_a_graph_cannot_serve_run_eagerly(make_config, make_pair):
    config, fb, graphed = _graphed_base_model(make_config, make_pair, seed=2)
    big = _batch(config, [3, 3, 3], 8, 0)  # batch 3 > the largest bucket
    with torch.no_grad():
        torch.testing.assert_close(graphed(**big).last_hidden_state, fb(**big).last_hidden_state)
        graphed(**_batch(config, [3], 8, 1), output_hidden_states=True)
    out = graphed(**_batch(config, [3, 2], 8, 2))  # grad enabled: eager, so gradients still flow
    assert out.last_hidden_state.requires_grad
    fb.train()
    graphed(**_batch(config, [3, 2], 8, 3))
    assert graphed.captured == []


@pytest.mark.cuda
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA GPU")
def test_replay_sees_in_place_weight_updates(make_config, make_pair):
    # A graph reads the parameters themselves (not the fused-QKV inference cache, which eager calls rebuild when a
    # weight changes): after an in-place update, the replay must match eager with the new weights.
    config, fb, graphed = _graphed_base_model(make_config, make_pair, seed=3)
    batch = _batch(config, [9, 5], 9, 0)
    with torch.inference_mode():
        before = graphed(**batch).last_hidden_state.clone()
    with torch.no_grad():
        for layer in fb.encoder.layer:
            layer.attention.self.key.weight.mul_(-2.0)
            layer.attention.self.value.bias.add_(0.5)
    with torch.inference_mode():
        expected = fb(**batch).last_hidden_state
        got = graphed(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert not torch.allclose(got[real], before[real]), "the update did not change the replayed output"
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    assert graphed.captured == [(2, 16)]


# ----------------------------------------------------------------------------------------------------------------
# warm-up runs the kernels the capture runs (CPU: the capture is simulated)


class _FakeCapture:
    """Stands in for torch.cuda's stream and graph API on the CPU: inside ``torch.cuda.graph(...)``,
    ``torch.cuda.is_current_stream_capturing()`` is True, as in a real capture."""

    def __init__(self):
        self.capturing = False

    @contextlib.contextmanager
    def graph(self, *args, **kwargs):
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False

    def install(self, monkeypatch):
        class Stream:
            def __init__(self, *args, **kwargs):
                pass

            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
        monkeypatch.setattr(torch.cuda, "graph", self.graph)


def _variant(op_name, args):
    """What selects a compiled kernel: the op, and per argument None or (dtype, rank) (mask or not, padded (B, T, H,
    D) or packed (N, H, D), dtypes); dropout on or off."""
    sig = tuple(None if a is None else (str(a.dtype), a.dim()) if isinstance(a, torch.Tensor) else type(a).__name__
                for a in args)
    return op_name, sig


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification"])
def test_warmup_runs_the_kernel_variants_the_capture_runs(name, monkeypatch, make_config, make_pair):
    # A kernel first used inside the capture is compiled and loaded there, which CUDA forbids while a stream captures.
    # Record every op variant that warm-up and capture call through the backend dispatch, and require the same set.
    from fastbert.cuda_graphs import _Graph
    from fastbert.ops import _backend

    fake = _FakeCapture()
    fake.install(monkeypatch)
    seen = {"warmup": set(), "capture": set()}
    resolve = _backend.impl

    def recording_impl(op_name, device_type):
        fn = resolve(op_name, device_type)

        def run(*args):
            seen["capture" if fake.capturing else "warmup"].add(_variant(op_name, args))
            return fn(*args)

        return run

    monkeypatch.setattr(_backend, "impl", recording_impl)
    config = make_config(max_position_embeddings=64)
    _, fb = make_pair(name, config, seed=4)
    fb = fb.eval()
    unpad = getattr(fb.config, "unpad_inputs", True)
    graph = _Graph(fb, 2, 16, torch.device("cpu"), None, warmup=1)
    assert seen["capture"], "the simulated capture ran no fastbert op"
    assert any(op == "attention_fwd" and sig[3] is not None for op, sig in seen["capture"]), \
        "the capture should run the masked attention kernel"
    assert seen["warmup"] == seen["capture"], (
        f"warm-up only: {sorted(seen['warmup'] - seen['capture'])}; capture only: "
        f"{sorted(seen['capture'] - seen['warmup'])}")
    assert getattr(fb.config, "unpad_inputs", True) == unpad, "the warm-up did not restore config.unpad_inputs"
    assert graph.inputs["attention_mask"].shape == (2, 16)
