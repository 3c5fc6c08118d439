"""The Python stages of benchmarks/gpu_session.sh: environment check, BERT-size correctness, headline benchmarks.

    python benchmarks/gpu_session.py env|correctness|bench --out DIR [--dry-run]

Each stage writes DIR/<stage>.json ({"stage", "status", ...}) and prints its findings; the shell script gives each
its own time budget. ``--dry-run`` (CI, no GPU) parses arguments, imports what the stage imports, builds its case
list and writes its JSON with status "dry-run", so the script cannot rot between GPU sessions.

correctness: attention at bert-base size (12 heads x 64, 512 tokens) on the triton and cuda backends, bf16 and
fp16, padded (random lengths, key-padding mask) and varlen (the same sequences packed), forward and backward, judged
by the project's rule against a float64 reference computed on the GPU: max|kernel - ref| <= 2 * max|torch_D - ref| +
atol, where torch_D is F.scaled_dot_product_attention in the same dtype; the float64 reference itself is checked
against the NumPy reference (fastbert.reference) on one sequence.

bench: bert-base bf16, same-run ratios of fastbert (auto backend) over transformers' sdpa model with the same
weights: forward 32 x 512; training step (forward + backward) 32 x 512; forward at variable lengths (uniform in
[32, 512]); batch-1 x 128 latency, fastbert eager and with CUDA graphs. CUDA events, warm-up, median.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BERT = dict(batch=32, seqlen=512, heads=12, head_dim=64)
CORRECTNESS_BATCH = 8  # sequences per correctness case: 8 x 512 tokens, 12 heads


def _write(out, stage, **fields):
    os.makedirs(out, exist_ok=True)
    record = {"stage": stage, **fields}
    with open(os.path.join(out, f"{stage}.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(json.dumps(record, default=str)[:4000])
    return record


# --------------------------------------------------------------------------------------------------------------
# env


def _available(backend):
    """(available, reason) of one backend on CUDA tensors; probes that backend only (ops.backends() probes all,
    and the cuda probe builds the extension when it is not built yet)."""
    from fastbert.ops import _backend

    return _backend._probe(backend, "cuda")


def stage_env(args):
    import torch
    import transformers
    import triton


    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton.__version__, transformers=transformers.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                capability=torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
    if args.dry_run:  # probing would build the cpp extension on a fresh CPU machine: minutes, for nothing here
        return _write(args.out, "env", status="dry-run", backends="not probed in a dry run", **info)
    # torch and triton only: probing cuda would start a second build beside the background one (gpu_session.sh).
    info["backends"] = {name: _available(name) for name in ("torch", "triton")}
    ok = torch.cuda.is_available() and info["backends"]["triton"][0]
    return _write(args.out, "env", status="pass" if ok else "fail", **info)


# --------------------------------------------------------------------------------------------------------------
# correctness


def correctness_cases():
    return [(backend, dtype, layout) for backend in ("triton", "cuda") for dtype in ("bf16", "fp16")
            for layout in ("padded", "varlen")]


def _attention_ref(q, k, v, mask, scale):
    """float64 attention and its gradients' inputs on the GPU: q, k, v (B, T, H, D) float64, mask (B, T) bool."""
    import torch

    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _run_case(backend, dtype_name, layout, seed):
    import torch
    import torch.nn.functional as F

    import fastbert.ops as ops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    b, t, h, d = CORRECTNESS_BATCH, BERT["seqlen"], BERT["heads"], BERT["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).cuda()
    q64, k64, v64, g64 = (torch.randn(b, t, h, d, generator=gen, dtype=torch.float64).cuda() for _ in range(4))
    scale = d**-0.5
    leaves64 = [x.clone().requires_grad_(True) for x in (q64, k64, v64)]
    ref = _attention_ref(*leaves64, mask, scale)
    ref_grads = torch.autograd.grad(ref, leaves64, g64)

    def masked(x):  # padded query rows are not compared (their values differ by convention between kernels)
        return x[mask]

    leaves = [x.to(dtype).requires_grad_(True) for x in (q64, k64, v64)]
    sdpa = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in leaves),
                                          attn_mask=mask[:, None, None, :], scale=scale).transpose(1, 2)
    sdpa_grads = torch.autograd.grad(sdpa, leaves, g64.to(dtype))

    ops.set_backend(backend)
    try:
        kl = [x.to(dtype).requires_grad_(True) for x in (q64, k64, v64)]
        if layout == "padded":
            out = ops.attention(*kl, mask, scale=scale)
            grads = torch.autograd.grad(out, kl, g64.to(dtype))
        else:
            idx = mask.flatten().nonzero().squeeze(1)
            packed = [x.reshape(b * t, h, d).index_select(0, idx) for x in kl]
            cu = torch.zeros(b + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lengths, 0)
            out_p = ops.varlen_attention(*packed, cu.cuda(), int(lengths.max()), scale=scale)
            grads = torch.autograd.grad(out_p, kl, g64.reshape(b * t, h, d).index_select(0, idx).to(dtype))
            out = torch.zeros(b * t, h, d, dtype=dtype, device="cuda").index_copy(0, idx, out_p).view(b, t, h, d)
        resolved = ops.resolved_backend("attention_fwd" if layout == "padded" else "varlen_attention_fwd", "cuda")
    finally:
        ops.set_backend(None)
    result = dict(backend=backend, resolved=resolved, dtype=dtype_name, layout=layout, shape=[b, t, h, d],
                  lengths=lengths.tolist(), checks={})
    ok = resolved == backend
    for name, got, base, want in [("out", out, sdpa, ref)] + list(
            zip(("dq", "dk", "dv"), grads, sdpa_grads, ref_grads, strict=True)):
        err = float((masked(got).double() - masked(want)).abs().max())
        base_err = float((masked(base).double() - masked(want)).abs().max())
        atol = 1e-3 if name == "out" else 2e-3
        passed = err <= 2 * base_err + atol
        ok = ok and passed
        result["checks"][name] = dict(err=err, sdpa_err=base_err, bound=2 * base_err + atol, passed=passed)
    result["passed"] = ok
    return result


def _numpy_anchor():
    """The GPU float64 composition against fastbert.reference (NumPy float64) on one 64-token sequence."""
    import numpy as np
    import torch

    from fastbert.reference import attention_fwd_ref

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(1, 64, dtype=torch.bool)
    mask[0, 50:] = False
    ref, _ = attention_fwd_ref(q.numpy(), k.numpy(), v.numpy(), mask.numpy(), 0.125)
    got = _attention_ref(q.cuda(), k.cuda(), v.cuda(), mask.cuda(), 0.125).cpu().numpy()
    return float(np.abs(got - ref).max())


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _wait_for_build(path, deadline) -> bool:
    """Whether the background build (gpu_session.sh) succeeded, waiting for it until ``deadline``. Without a path
    (the stage run alone) the backend's own probe builds or loads the library."""
    if not path:
        return True
    while not _read(path) and time.monotonic() < deadline:
        time.sleep(1)
    return _read(path).startswith("rc 0 ")


def stage_correctness(args):
    cases = correctness_cases()
    if args.dry_run:
        import torch.nn.functional  # noqa: F401

        import fastbert.ops  # noqa: F401
        from fastbert.reference import attention_fwd_ref  # noqa: F401

        return _write(args.out, "correctness", status="dry-run", cases=[list(c) for c in cases])
    import torch


    results, skipped = [], []
    anchor = _numpy_anchor()
    deadline = time.monotonic() + args.budget - 45  # what the cuda cases need once the build is there
    for i, (backend, dtype, layout) in enumerate(cases):
        if backend == "cuda" and not _wait_for_build(args.build_done, deadline):
            skipped.append(dict(backend=backend, dtype=dtype, layout=layout, reason="the extension build did not "
                                f"succeed in time: {_read(args.build_done) or 'still running'}"))
            continue
        available, reason = _available(backend)
        if not available:
            skipped.append(dict(backend=backend, dtype=dtype, layout=layout, reason=reason))
            continue
        try:
            results.append(_run_case(backend, dtype, layout, seed=i))
        except Exception as exc:  # one broken case must not hide the others
            results.append(dict(backend=backend, dtype=dtype, layout=layout, passed=False,
                                error=f"{type(exc).__name__}: {exc}"[:2000]))
        torch.cuda.empty_cache()
    ok = anchor < 1e-10 and all(r["passed"] for r in results) and results
    return _write(args.out, "correctness", status="pass" if ok else "fail", numpy_anchor_err=anchor,
                  results=results, skipped=skipped)


# --------------------------------------------------------------------------------------------------------------
# bench


def _median_ms(fn, warmup=5, repeats=20):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _models(dtype):
    import torch
    import transformers

    import fastbert

    config = transformers.BertConfig(attn_implementation="sdpa")  # bert-base
    torch.manual_seed(0)
    hf = transformers.BertModel(config, add_pooling_layer=True).to("cuda", dtype).eval()
    fb = fastbert.from_hf(copy.deepcopy(hf)).eval()  # from_hf takes over the parameters it converts: a copy
    return config, hf, fb


def bench_cases():
    return ["forward 32x512", "train step 32x512", "forward 32x512 varlen", "latency 1x128", "latency 1x128 graphs"]


def stage_bench(args):
    if args.dry_run:
        import transformers  # noqa: F401

        import fastbert  # noqa: F401
        from fastbert.cuda_graphs import cuda_graphs  # noqa: F401

        return _write(args.out, "bench", status="dry-run", cases=bench_cases())
    import torch

    import fastbert

    dtype = torch.bfloat16
    config, hf, fb = _models(dtype)
    gen = torch.Generator().manual_seed(0)
    b, t = BERT["batch"], BERT["seqlen"]
    ids = torch.randint(1000, config.vocab_size, (b, t), generator=gen).cuda()
    full = torch.ones(b, t, dtype=torch.long, device="cuda")
    lengths = torch.randint(32, t + 1, (b,), generator=gen)
    var = (torch.arange(t)[None] < lengths[:, None]).long().cuda()
    rows = {}

    def pair(name, run_fb, run_hf):
        rows[name] = dict(fastbert_ms=_median_ms(run_fb), transformers_sdpa_ms=_median_ms(run_hf))
        rows[name]["speedup"] = rows[name]["transformers_sdpa_ms"] / rows[name]["fastbert_ms"]
        print(name, rows[name], flush=True)

    with torch.no_grad():
        pair("forward 32x512", lambda: fb(input_ids=ids, attention_mask=full),
             lambda: hf(input_ids=ids, attention_mask=full))
        pair("forward 32x512 varlen", lambda: fb(input_ids=ids, attention_mask=var),
             lambda: hf(input_ids=ids, attention_mask=var))

    def train(model):
        def step():
            out = model(input_ids=ids, attention_mask=var).last_hidden_state
            out.float().square().mean().backward()
        return step

    fb.train(), hf.train()
    pair("train step 32x512", train(fb), train(hf))
    fb.eval(), hf.eval()
    fb.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)
    one = ids[:1, :128].contiguous()
    one_mask = torch.ones_like(one)
    graphed = fastbert.cuda_graphs(fb, batch_buckets=(1,), length_buckets=(128,))
    with torch.inference_mode():
        pair("latency 1x128", lambda: fb(input_ids=one, attention_mask=one_mask),
             lambda: hf(input_ids=one, attention_mask=one_mask))
        pair("latency 1x128 graphs", lambda: graphed(input_ids=one, attention_mask=one_mask),
             lambda: hf(input_ids=one, attention_mask=one_mask))
        diff = float((graphed(input_ids=one, attention_mask=one_mask).last_hidden_state.float()
                      - fb(input_ids=one, attention_mask=one_mask).last_hidden_state.float()).abs().max())
    return _write(args.out, "bench", status="pass", dtype="bf16", model="bert-base (random weights)",
                  gpu=torch.cuda.get_device_name(), rows=rows, graphs_vs_eager_max_diff=diff)


STAGES = {"env": stage_env, "correctness": stage_correctness, "bench": stage_bench}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: imports, case lists and the JSON file only")
    parser.add_argument("--build-done", default="", help="file the background build writes its exit status to")
    parser.add_argument("--budget", type=float, default=600.0, help="the stage's time budget in seconds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    record = STAGES[args.stage](args)
    print(f"{args.stage}: {record['status']} in {time.perf_counter() - start:.1f} s")
    return 0 if record["status"] in ("pass", "dry-run") else 1


if __name__ == "__main__":
    sys.exit(main())
