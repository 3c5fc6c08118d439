"""Compile the CUDA kernels (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90: compile only, no GPU needed.

Every source is compiled once per arch (a thread pool runs the jobs in parallel) with
    nvcc -c -std=c++17 -O3 -Xptxas -v --expt-relaxed-constexpr -arch=sm_XX -Werror all-warnings -Xcompiler -Wall,-Wextra
plus the -D__CUDA_NO_HALF_OPERATORS__ & co. that torch's extension build adds, and the run fails on any compiler
error or warning, and on register spills ("bytes spill stores/loads" > 0) in any kernel: every kernel here is on a
hot path, and a spill there costs more than the register it saved. The attention kernels must exist in both modes
(padded and varlen, the template flag kVarlen).

The torch binding (csrc/fastbert_cuda*.cpp) is compiled in the same pool with the host compiler against torch's
headers (-fsyntax-only: torch here may be a CPU-only build, which ships the c10/cuda headers but not their generated
config header, nor libc10_cuda to link), so a binding that no longer matches launchers.h or torch's API fails here
too, on a machine without a GPU or a CUDA build of torch. The registers
per kernel are printed (``pytest -s``), attached to the test report (``record_property``) and, with
``FASTBERT_PTXAS_REPORT=path.json``, written to a file. ``FASTBERT_CUDA_ARCHS=sm_80`` compiles one arch only.
Skipped when nvcc is not on PATH.

The launchers of csrc/cuda/launchers.h must each be defined once (extern "C") in the objects, and the header must
compile on its own as C++17 and as C (the torch binding includes it without any CUDA kernel code).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
# FASTBERT_CUDA_ARCHS=sm_80 narrows the run (the default compiles both, ~1.5-2 min on 2 cores).
ARCHS = tuple(a.strip() for a in os.environ.get("FASTBERT_CUDA_ARCHS", "sm_80,sm_90").split(",") if a.strip())
NVCC = shutil.which("nvcc")
# The last four are torch.utils.cpp_extension.COMMON_NVCC_FLAGS: the extension build compiles with them.
FLAGS = ["-c", "-std=c++17", "-O3", "-Xptxas", "-v", "--expt-relaxed-constexpr", "-Werror", "all-warnings",
         "-Xcompiler", "-Wall,-Wextra", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
CSRC = CUDA_DIR.parent
HOST = "host"  # the "arch" of the binding's host-compiler job
# Kernel families that must be instantiated (a template nobody instantiates would compile to nothing).
KERNEL_FAMILIES = (
    "ln_fwd_kernel", "ln_bwd_kernel", "ln_fwd_generic_kernel", "ln_bwd_generic_kernel", "ln_param_grad_kernel",
    "bias_gelu_kernel", "softmax_fwd_kernel", "softmax_bwd_kernel", "softmax_fwd_generic_kernel",
    "softmax_bwd_generic_kernel", "attn_fwd_mma_kernel", "attn_bwd_dkdv_mma_kernel", "attn_bwd_dq_mma_kernel",
    "attn_bwd_delta_kernel", "attn_fwd_simt_kernel", "attn_bwd_dkdv_simt_kernel", "attn_bwd_dq_simt_kernel",
)
# Attention kernels templated on kVarlen: both the padded (false) and the packed (true) instance must exist.
VARLEN_FAMILIES = ("attn_fwd_mma_kernel", "attn_bwd_dkdv_mma_kernel", "attn_bwd_dq_mma_kernel", "attn_fwd_simt_kernel",
                   "attn_bwd_dkdv_simt_kernel", "attn_bwd_dq_simt_kernel")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


@dataclass
class Kernel:
    mangled: str
    name: str = ""
    registers: int = -1
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


@dataclass
class Compiled:
    source: str
    arch: str
    returncode: int
    output: str
    seconds: float
    obj: Path
    kernels: dict[str, Kernel] = field(default_factory=dict)


def parse_ptxas(output: str) -> dict[str, Kernel]:
    """Kernels (entry functions and non-inlined device functions) with registers, stack and spills."""
    kernels: dict[str, Kernel] = {}
    current = None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack_bytes, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
    names = list(kernels)
    if names and shutil.which("c++filt"):
        demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
        for mangled, pretty in zip(names, demangled.splitlines(), strict=False):
            kernels[mangled].name = pretty
    for k in kernels.values():
        k.name = k.name or k.mangled
    return kernels


def _compile(source: Path, arch: str, out_dir: Path) -> Compiled:
    obj = out_dir / f"{source.stem}.{arch}.o"
    start = time.perf_counter()
    proc = subprocess.run([NVCC, *FLAGS, f"-arch={arch}", str(source), "-o", str(obj)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    return Compiled(source.name, arch, proc.returncode, output, seconds, obj, parse_ptxas(output))


def _binding_command(source: Path) -> list[str] | None:
    """g++ -fsyntax-only of a binding source against torch's and CUDA's headers; None when they are not here."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    torch_includes = [Path(p) for p in include_paths()]
    cuda_include = _cuda_include()
    if cxx is None or cuda_include is None or not (torch_includes[0] / "c10" / "cuda" / "CUDAStream.h").is_file():
        return None
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}"]
    if not (torch_includes[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU-only torch: the generated header is absent
    for inc in (*torch_includes, Path(sysconfig.get_paths()["include"]), cuda_include):
        cmd += ["-isystem", str(inc)]  # warnings are checked in fastbert's code only
    return [*cmd, str(source)]


def _compile_binding(source: Path) -> Compiled:
    cmd = _binding_command(source)
    if cmd is None:
        return Compiled(source.name, HOST, -1, "skipped: no host compiler, CUDA headers or torch's c10/cuda headers",
                        0.0, Path())
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return Compiled(source.name, HOST, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start, Path())


def _cuda_include() -> Path | None:
    candidates = [Path(NVCC).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    candidates += [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


def _short(name: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::|fastbert::cuda::", "", name)
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "half")
    return re.sub(r"\((?:const )?(?:LnParams|AttnParams|SoftmaxParams)[^)]*\)$", "", name)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], Compiled]:
    sources = sorted(CUDA_DIR.glob("*.cu"), key=lambda p: -p.stat().st_size)  # biggest first: better packing
    assert sources, f"no .cu files in {CUDA_DIR}"
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    jobs = [(src, arch) for src in sources for arch in ARCHS]
    bindings = sorted(CSRC.glob("fastbert_cuda*.cpp"))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        host = [pool.submit(_compile_binding, src) for src in bindings]  # first: they are the longest jobs
        results = list(pool.map(lambda job: _compile(*job, out_dir), jobs))
        results += [f.result() for f in host]
    wall = time.perf_counter() - start
    by_key = {(r.source, r.arch): r for r in results}

    lines = [f"nvcc: {len(jobs)} compiles in {wall:.1f} s wall ({sum(r.seconds for r in results):.1f} s summed)"]
    for r in results:
        lines.append(f"  {r.source} {r.arch}: {r.seconds:.1f} s, {len(r.kernels)} kernels")
    lines.append(f"  {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel [arch]")
    for r in results:
        for k in r.kernels.values():
            lines.append(f"  {k.registers:>4} {k.stack_bytes:>5} {k.spill_stores:>5}/{k.spill_loads:<5}  "
                         f"{_short(k.name)} [{r.arch}]")
    print("\n".join(lines))
    report = os.environ.get("FASTBERT_PTXAS_REPORT")
    if report:
        payload = {"wall_seconds": wall, "compiles": [
            {"source": r.source, "arch": r.arch, "seconds": r.seconds, "returncode": r.returncode,
             "kernels": [vars(k) for k in r.kernels.values()]} for r in results]}
        Path(report).write_text(json.dumps(payload, indent=1))
    return by_key


def _for_arch(compiled, arch):
    return [r for (_, a), r in sorted(compiled.items()) if a == arch]


def _has_kernels(source: str) -> bool:
    return "__global__" in (CUDA_DIR / source).read_text()


def test_sources_present():
    for name in ("launchers.h", "common.cuh", "layer_norm.cu", "bias_gelu.cu", "softmax.cu", "attention_fwd.cu",
                 "attention_bwd.cu", "attention_simt.cu", "attention_api.cu"):
        assert (CUDA_DIR / name).is_file(), f"csrc/cuda/{name} is missing"
    for name in ("fastbert_cuda.cpp", "fastbert_cuda_attention.cpp", "fastbert_cuda.h"):
        assert (CSRC / name).is_file(), f"csrc/{name} (the torch binding) is missing"


def test_binding_compiles_against_torch(compiled):
    results = _for_arch(compiled, HOST)
    assert {r.source for r in results} >= {"fastbert_cuda.cpp", "fastbert_cuda_attention.cpp"}
    if all(r.returncode == -1 for r in results):
        pytest.skip(results[0].output)
    for r in results:
        assert r.returncode == 0, f"{r.source} failed to compile against torch's headers:\n{r.output[-6000:]}"


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_without_warnings(compiled, arch):
    for r in _for_arch(compiled, arch):
        assert r.returncode == 0, f"{r.source} ({arch}) failed to compile:\n{r.output[-6000:]}"
        warnings = [ln for ln in r.output.splitlines() if re.search(r"warning", ln, re.IGNORECASE)]
        assert not warnings, f"{r.source} ({arch}) warnings:\n" + "\n".join(warnings[:20])


@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(compiled, arch, record_property):
    spilled, registers = [], {}
    for r in _for_arch(compiled, arch):
        assert r.returncode == 0, f"{r.source} ({arch}) failed to compile"
        if _has_kernels(r.source):
            assert r.kernels, f"ptxas reported no kernels for {r.source} ({arch}): is -Xptxas -v output parsed?"
        for k in r.kernels.values():
            registers[_short(k.name)] = k.registers
            if k.spill_stores or k.spill_loads:
                spilled.append(f"{_short(k.name)}: {k.spill_stores} B spill stores, {k.spill_loads} B spill loads")
    record_property(f"registers_{arch}", json.dumps(registers))
    assert not spilled, f"register spills ({arch}):\n" + "\n".join(spilled)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_family_is_instantiated(compiled, arch):
    names = " ".join(k.name for r in _for_arch(compiled, arch) for k in r.kernels.values())
    missing = [f for f in KERNEL_FAMILIES if f"{f}<" not in names and f"{f}(" not in names]
    assert not missing, f"kernels not instantiated for {arch}: {missing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_kernels_have_padded_and_varlen_instances(compiled, arch):
    names = [k.name for r in _for_arch(compiled, arch) for k in r.kernels.values()]
    missing = [f"{f}<..., {mode}>" for f in VARLEN_FAMILIES for mode in ("false", "true")
               if not any(f"{f}<" in n and re.search(rf", {mode}>", n) for n in names)]
    assert not missing, f"attention kernels not instantiated for {arch}: {missing}"


def _declared_launchers() -> list[str]:
    text = (CUDA_DIR / "launchers.h").read_text()
    return sorted(set(re.findall(r"^\s*(?:cudaError_t|size_t|int)\s+(fastbert_\w+)\s*\(", text, re.MULTILINE)))


def test_every_launcher_is_defined_once(compiled):
    if shutil.which("nm") is None:
        pytest.skip("nm is not available")
    declared = _declared_launchers()
    assert len(declared) >= 12, f"launchers.h declares only {declared}"
    defined: dict[str, int] = {}
    for r in _for_arch(compiled, ARCHS[0]):
        out = subprocess.run(["nm", "-g", "--defined-only", str(r.obj)], capture_output=True, text=True).stdout
        for sym in re.findall(r"\s[TW]\s+(fastbert_\w+)$", out, re.MULTILINE):
            defined[sym] = defined.get(sym, 0) + 1
    problems = [f"{name}: defined {defined.get(name, 0)} times" for name in declared if defined.get(name, 0) != 1]
    assert not problems, "launchers.h vs the objects:\n" + "\n".join(problems)


@pytest.mark.parametrize("lang", ["c++17", "c11"])
def test_launchers_header_is_self_contained(tmp_path, lang):
    text = (CUDA_DIR / "launchers.h").read_text()
    assert not re.search(r"#include\s*[<\"](torch|ATen|c10|pybind11)", text), "launchers.h must not include torch"
    include = _cuda_include()
    if include is None:
        pytest.skip("cuda_runtime_api.h not found next to nvcc, in /usr/local/cuda, $CUDA_HOME or $CUDA_PATH")
    compiler = shutil.which("g++" if lang == "c++17" else "gcc")
    if compiler is None:
        pytest.skip("no host compiler")
    src = tmp_path / ("use.cpp" if lang == "c++17" else "use.c")
    src.write_text('#include "launchers.h"\nint fastbert_header_probe(void) { return (int)FASTBERT_BFLOAT16; }\n')
    proc = subprocess.run([compiler, f"-std={lang}", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", f"-I{CUDA_DIR}",
                           f"-I{include}", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_dynamic_shared_memory_launch_is_checked_against_the_arch_limit():
    # Each launch with dynamic shared memory (a kSmem* size in the <<< >>> config) sits in a launcher that
    # static_asserts smem_fits_every_arch for that size (common.cuh: 99 KB per block, sm_86/sm_89's limit), so a
    # tile config that would fail at launch on an A10/L4/L40S/RTX part does not compile. No nvcc needed.
    unchecked = []
    for source in sorted(CUDA_DIR.glob("*.cu")):
        text = source.read_text()
        for launch in re.finditer(r"<<<[^>]*?,\s*[^,>]+,\s*(kSmem\w*)\s*,[^>]*>>>", text):
            size = launch.group(1)
            function = text[: launch.start()].rsplit("\ncudaError_t ", 1)[-1]  # the launcher around the launch
            if not re.search(rf"static_assert\([^;]*smem_fits_every_arch<{size}>\(\)", function, re.S):
                unchecked.append(f"{source.name}: {size}")
    assert not unchecked, f"dynamic shared memory not checked against kMaxSmemPerBlock: {unchecked}"
    common = (CUDA_DIR / "common.cuh").read_text()
    assert re.search(r"constexpr int kMaxSmemPerBlock = 99 \* 1024;", common)
