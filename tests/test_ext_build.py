"""fastbert._ext: where the sources are, why a build cannot happen, what a failed build looks like to the user, and
what the cuda build is made of (sources, flags, every op schema bound for CUDA, fakes) without a GPU.

A broken or impossible build must never raise out of a probe: ``auto`` falls back to torch with one warning, and an
explicit FASTBERT_BACKEND=cpp raises BackendUnavailableError carrying the compiler's message. Builds here go to
temporary cache directories and use tiny source trees (no torch headers), so each takes a few seconds.
"""

import os
import shutil
import warnings

import pytest
import torch

import fastbert.ops as ops
from fastbert import _ext
from fastbert.ops import BackendUnavailableError, _backend


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty build cache (so that a probe has to build) and no backend override; backend caches reset."""
    monkeypatch.setenv("FASTBERT_BUILD_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTBERT_BACKEND", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    _backend._probe.cache_clear()
    _backend._resolve.cache_clear()
    yield monkeypatch
    ops.set_backend(None)
    monkeypatch.undo()  # restore the environment before the probes run again in later tests
    _backend._probe.cache_clear()
    _backend._resolve.cache_clear()


def _broken_csrc(root):
    (root / "cpu").mkdir(parents=True)
    (root / "fastbert.cpp").write_text("int fastbert_broken( {  // deliberately invalid C++\n")
    return root


def test_csrc_is_found_next_to_the_package_and_can_be_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTBERT_CSRC", raising=False)
    found = _ext.csrc_dir()
    assert (found / "fastbert.cpp").is_file() and (found / "cpu" / "kernels.h").is_file()
    assert found in (_ext.Path(_ext.__file__).parent / "csrc", _ext.Path(_ext.__file__).parent.parent / "csrc")
    monkeypatch.setenv("FASTBERT_CSRC", str(tmp_path))
    assert _ext.csrc_dir() == tmp_path.resolve()
    assert _ext.sources("cpp", tmp_path)[0] == tmp_path / "fastbert.cpp"


def test_probe_without_a_compiler(fresh_cache, tmp_path):
    fresh_cache.setenv("PATH", str(tmp_path / "empty-bin"))
    ok, reason = _ext.probe("cpp")
    assert not ok and reason.startswith("no C++ compiler (c++) found"), reason
    fresh_cache.setenv("CXX", "g++-that-does-not-exist")
    ok, reason = _ext.probe("cpp")
    assert not ok and reason.startswith("no C++ compiler (g++-that-does-not-exist) found"), reason


def test_probe_without_ninja(fresh_cache, tmp_path):
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(compiler, bin_dir / "c++")
    fresh_cache.setenv("PATH", str(bin_dir))
    assert _ext.probe("cpp") == (False, "ninja not installed (pip install ninja)")


def test_a_warm_cache_needs_no_compiler(monkeypatch, tmp_path):
    _ext.build()  # the real extension (already built by the op tests' probe, else built now)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    ok, reason = _ext.probe("cpp")
    assert ok and "compiled CPU kernels" in reason, reason


def test_build_failure_carries_the_compiler_output(fresh_cache, tmp_path):
    fresh_cache.setenv("FASTBERT_CSRC", str(_broken_csrc(tmp_path / "csrc")))
    ok, reason = _ext.probe("cpp")
    assert not ok and reason.startswith("build failed:"), reason
    assert "fastbert.cpp" in reason and "error" in reason.lower(), reason
    with pytest.raises(_ext.BuildError, match="build failed"):  # remembered: not recompiled in this process
        _ext.build()


def test_explicit_cpp_with_a_broken_build_raises_with_the_compiler_text(fresh_cache, tmp_path):
    fresh_cache.setenv("FASTBERT_CSRC", str(_broken_csrc(tmp_path / "csrc")))
    fresh_cache.setenv("FASTBERT_BACKEND", "cpp")
    with pytest.raises(BackendUnavailableError) as info:
        ops.softmax(torch.randn(1, 1, 2, 3))
    message = str(info.value)
    assert "FASTBERT_BACKEND=cpp" in message and "build failed" in message
    assert "fastbert_broken" in message or "expected" in message, message


def test_auto_falls_back_to_torch_with_one_warning_when_the_build_fails(fresh_cache, tmp_path):
    fresh_cache.setenv("FASTBERT_CSRC", str(_broken_csrc(tmp_path / "csrc")))
    scores = torch.randn(1, 1, 2, 3)
    with pytest.warns(UserWarning, match="backend 'cpp' skipped on cpu: build failed"):
        probs = ops.softmax(scores)
    torch.testing.assert_close(probs, torch.softmax(scores, dim=-1))
    assert ops.resolved_backend("softmax_fwd", "cpu") == "torch"
    _backend._resolve.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per backend and process
        ops.layer_norm(torch.randn(2, 8), torch.ones(8), None)


def test_build_timeout_kills_the_build(fresh_cache, tmp_path):
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "fastbert.cpp").write_text('extern "C" int fastbert_ext_stamp() { return 0; }\n')
    with pytest.raises(_ext.BuildError, match="timed out after 0 s"):
        _ext.build(csrc=csrc, timeout=0.2)
    assert not (_ext.build_dir("cpp", csrc) / "lock").exists(), "the killed build's lock must not block the next"


def test_cuda_probe_says_why_not():
    ok, reason = _ext.probe("cuda")
    if torch.version.cuda is None:
        assert not ok and "torch is a CPU-only build" in reason
    elif not ok:
        assert any(why in reason for why in ("nvcc", "compute capability", "build failed", "timed out")), reason
    status = ops.backends("cuda")["cuda"]
    if not torch.cuda.is_available():
        assert not status.available and "no CUDA device is visible" in status.reason


def test_cuda_probe_never_compiles_without_a_gpu(monkeypatch):
    # A CUDA build of torch and a toolkit, but no GPU (a CI runner): the probe must not spend minutes compiling.
    monkeypatch.setattr(_ext, "_cuda_prerequisites", lambda: (True, ""))
    monkeypatch.setattr(_ext, "_cuda_visible", lambda: False)
    monkeypatch.setattr(_ext, "load", lambda *a, **k: pytest.fail("probe('cuda') tried to build without a GPU"))
    assert _ext.probe("cuda") == (False, "no CUDA device is visible to torch")


def test_cuda_build_inputs_and_flags(monkeypatch):
    csrc = _ext.csrc_dir()
    names = [p.relative_to(csrc).as_posix() for p in _ext.sources("cuda")]
    assert names[0] == _ext.CUDA_BINDING and "fastbert_cuda_attention.cpp" in names
    assert {f"cuda/{p.name}" for p in (csrc / "cuda").glob("*.cu")} <= set(names)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags = _ext.compiler_flags("cuda")
    assert "-fopenmp" not in flags["cflags"] and "-std=c++17" in flags["cuda_cflags"]
    if not torch.cuda.is_available():  # ahead of time without a GPU: both CI targets
        assert [f for f in flags["cuda_cflags"] if "arch" in f] == [
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
    default_dir = _ext.build_dir("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # torch turns it into flags; it is part of the cache key
    assert not any("arch" in f for f in _ext.compiler_flags("cuda")["cuda_cflags"])
    assert _ext.build_dir("cuda") != default_dir


def test_cuda_build_command_without_cuda_says_why(capsys):
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    assert _ext.main(["--backend", "cuda"]) == 1
    assert "cannot build the cuda extension: torch is a CPU-only build" in capsys.readouterr().err


def _registered(pattern: str, *files) -> set[str]:
    import re

    return {m for f in files for m in re.findall(pattern, f.read_text())}


def test_every_schema_has_a_cuda_kernel_in_the_binding():
    csrc = _ext.csrc_dir()
    schemas = _registered(r'm\.def\(\s*"(\w+)\(', csrc / "fastbert.cpp")
    bound = _registered(r'm\.impl\("(\w+)"', *csrc.glob("fastbert_cuda*.cpp"))
    assert len(schemas) == 13 and schemas == bound, f"schemas without a CUDA kernel: {schemas - bound}"


def test_cuda_ops_are_registered_with_shape_only_fakes():
    if not ops.backends("cpu")["cpp"].available:
        pytest.skip("the native modules load with the cpp library (unavailable here)")
    cuda_ops = {op for op in _backend.op_names() if _backend._has_impl(op, "cuda")}
    fwd_bwd = {f"{op}_{d}" for op in ("add_layer_norm", "bias_gelu", "bias_gelu_layer_norm", "softmax", "attention",
                                      "varlen_attention") for d in ("fwd", "bwd")}
    assert cuda_ops == fwd_bwd | {"bias_gelu_fwd_"}
    e, meta = torch.ops.fastbert_ext, dict(device="meta")
    q, k = (torch.empty(2, t, 3, 16, **meta, dtype=torch.bfloat16) for t in (5, 7))
    out, lse = e.attention_fwd(q, k, k, None, 0.0, 0.25, None)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    grads = e.attention_bwd(q, q, k, k, out, lse, None, 0.0, 0.25, None)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    p, cu = torch.empty(9, 3, 16, **meta), torch.empty(4, dtype=torch.int32, **meta)
    out, lse = e.varlen_attention_fwd(p, p, p, cu, 6, 0.0, 0.25, None)
    assert out.shape == p.shape and lse.shape == (3, 9) and lse.dtype == torch.float32
    assert all(g.shape == p.shape for g in e.varlen_attention_bwd(p, p, p, p, out, lse, cu, 6, 0.0, 0.25, None))


def test_build_command_line(capsys):
    assert _ext.main([]) == 0
    assert "fastbert cpp extension up to date" in capsys.readouterr().out


def test_cuda_wrappers_send_what_the_kernels_do_not_take_to_torch():
    # Checked on CPU tensors: a supported input goes to torch.ops.fastbert_ext (which has no CPU kernel for
    # attention, hence the error), an unsupported one runs the torch implementation and matches it exactly.
    if not ops.backends("cpu")["cpp"].available:
        pytest.skip("the native modules load with the cpp library (unavailable here)")
    from fastbert.ops.attention import native as attention_native
    from fastbert.ops.varlen_attention import native as varlen_native

    fwd = _backend._IMPLS["attention_fwd"]
    q = torch.randn(2, 5, 2, 12)
    assert attention_native.unsupported_reason(q, q, q).startswith("head dim 12")
    out, lse = fwd["cuda"](q, q, q, None, 0.0, 0.3, None)
    expected = fwd["torch"](q, q, q, None, 0.0, 0.3, None)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    with pytest.raises(NotImplementedError, match="fastbert_ext::attention_fwd"):
        fwd["cuda"](q[..., :8].contiguous(), q[..., :8].contiguous(), q[..., :8].contiguous(), None, 0.0, 0.3, None)
    p, cu = torch.randn(7, 2, 20), torch.tensor([0, 3, 7], dtype=torch.int32)
    assert varlen_native.unsupported_reason(p, p, p, cu, 4) is not None
    out, lse = _backend._IMPLS["varlen_attention_fwd"]["cuda"](p, p, p, cu, 4, 0.0, 0.2, None)
    expected = _backend._IMPLS["varlen_attention_fwd"]["torch"](p, p, p, cu, 4, 0.0, 0.2, None)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    x = torch.randn(3, 0)
    assert _backend._IMPLS["bias_gelu_fwd"]["cuda"](x, None, "none").shape == (3, 0)
