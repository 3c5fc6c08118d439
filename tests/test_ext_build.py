"""fastbert._ext: where the sources are, why a build cannot happen, what a failed build looks like to the user.

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
        assert any(why in reason for why in ("nvcc", "not bound yet", "build failed")), reason


def test_build_command_line(capsys):
    assert _ext.main([]) == 0
    assert "fastbert cpp extension up to date" in capsys.readouterr().out
