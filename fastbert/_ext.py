"""Build and load fastbert's compiled extension (csrc/), which defines the ``torch.ops.fastbert_ext.*`` ops.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja), or ahead of time with
:func:`build` (``fastbert build``), and cached per user in a directory keyed by a hash of everything the binary
depends on: the sources, torch's version, Python's version, the CPU capability torch runs at and the compiler
flags (which add -mavx512bf16 on CPUs with AVX512-BF16: hardware fp32 -> bf16 rounding). A change to any of them
builds into a new directory; an unchanged one loads the cached library without invoking the compiler (so a machine
with a warm cache needs neither a compiler nor ninja).

The library is a plain shared object (ops registered with ``TORCH_LIBRARY``, no Python module), loaded with
``torch.ops.load_library``. It is compiled in a child process with a time limit, so a hung or killed build never
leaves this process half-initialized. Where csrc/ is: ``$FASTBERT_CSRC``, else ``<package>/csrc`` (a wheel), else
``<package>/../csrc`` (a source checkout or an editable install).

Environment: ``FASTBERT_CSRC`` (sources), ``FASTBERT_BUILD_DIR`` (cache root; default ``~/.cache/fastbert/ext``),
``FASTBERT_BUILD_TIMEOUT`` (seconds, default 900), ``FASTBERT_EXTRA_CFLAGS`` (appended and part of the key; with
``-march=native`` do not share the cache between different CPUs), ``MAX_JOBS`` (parallel compile jobs, read by
torch), ``CXX`` (the compiler, default ``c++``), ``TORCH_CUDA_ARCH_LIST`` (archs of the CUDA build; default: the
visible GPUs', else sm_80 and sm_90), ``CUDA_HOME`` (the toolkit, found by torch).

Two libraries: ``cpp`` (csrc/fastbert.cpp, which defines every op schema, and the CPU kernels) and ``cuda``
(csrc/fastbert_cuda*.cpp and csrc/cuda/*.cu: CUDA kernels for those schemas, so loading it loads ``cpp`` first). The
cuda one is built only where torch is a CUDA build and nvcc is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("cpp", "cuda")
LIB_NAMES = {"cpp": "fastbert_ext_cpp", "cuda": "fastbert_ext_cuda"}
CUDA_BINDING = "fastbert_cuda.cpp"  # the torch binding of csrc/cuda (with fastbert_cuda_*.cpp); enables the cuda build
# The kernels use cp.async, ldmatrix and bf16 mma.sync: compute capability 8.0 (Ampere) or newer.
MIN_CUDA_CAPABILITY = (8, 0)
DEFAULT_CUDA_ARCHS = ((8, 0), (9, 0))  # built when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset
DEFAULT_TIMEOUT_S = 900.0
_STAMP = "build.json"  # written after a successful build; its absence means "not built (or interrupted)"

# Compiler flags per torch CPU capability (torch.backends.cpu.get_cpu_capability()), the same instruction sets torch
# compiles its own kernels with for that capability, so ATen's Vectorized<float> picks the matching implementation.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}

_log = logging.getLogger("fastbert")
_lock = threading.RLock()
_loaded: dict[str, Path] = {}  # backend -> library loaded into this process
_failed: dict[Path, str] = {}  # build dir -> why its build failed (not retried in this process)


class BuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message says why (missing tool, compiler output)."""


@dataclass(frozen=True)
class BuildResult:
    path: Path  # the shared library
    compiled: bool  # False: the cached build was up to date
    seconds: float


# --------------------------------------------------------------------------------------------------------------
# where things are


def csrc_dir() -> Path:
    """The C++/CUDA sources: $FASTBERT_CSRC, else <package>/csrc (wheel), else <package>/../csrc (checkout)."""
    env = os.environ.get("FASTBERT_CSRC", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "fastbert.cpp").is_file():
            return candidate
    raise BuildError(f"the C++ sources (csrc/fastbert.cpp) are not in {package / 'csrc'} nor {package.parent / 'csrc'}")


def cache_root() -> Path:
    env = os.environ.get("FASTBERT_BUILD_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastbert" / "ext"


def sources(backend: str = "cpp", csrc: Path | None = None) -> list[Path]:
    """The translation units of ``backend``'s library."""
    csrc = csrc_dir() if csrc is None else Path(csrc)
    if backend == "cpp":
        return [csrc / "fastbert.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]
    if backend == "cuda":
        bindings = sorted(p for p in csrc.glob("fastbert_cuda*.cpp") if p.name != CUDA_BINDING)
        return [csrc / CUDA_BINDING, *bindings, *sorted((csrc / "cuda").glob("*.cu"))]
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _hashed_files(backend: str, csrc: Path) -> list[Path]:
    sub = "cpu" if backend == "cpp" else "cuda"
    headers = [p for pattern in ("*.h", "*.cuh") for p in (*csrc.glob(pattern), *(csrc / sub).glob(pattern))]
    return sorted(set(sources(backend, csrc)) | set(headers))


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU converts fp32 to bf16 in hardware (AVX512-BF16, e.g. Cooper Lake, Sapphire Rapids, Zen 4),
    as torch detects it. The cpp build then adds -mavx512bf16 (its flags, hence its cache directory, differ)."""
    import torch

    probe = getattr(getattr(torch, "cpu", None), "_is_avx512_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # a probe must never break the build; the portable conversion is always correct
        return False


def cuda_arch_flags() -> list[str]:
    """nvcc -gencode flags of the cuda build: none when $TORCH_CUDA_ARCH_LIST is set (torch turns it into flags),
    else one per distinct compute capability of the visible GPUs (8.0+), else sm_80 and sm_90 (a build ahead of
    time on a machine without a GPU). Compiling for the visible GPU only keeps the first build short."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return []
    import torch

    caps: set[tuple[int, int]] = set()
    if torch.version.cuda is not None and torch.cuda.is_available():
        caps = {tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}
    caps = {c for c in caps if c >= MIN_CUDA_CAPABILITY} or set(DEFAULT_CUDA_ARCHS)
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in sorted(caps)]


def compiler_flags(backend: str = "cpp") -> dict[str, list[str]]:
    """cflags, ldflags and cuda_cflags of ``backend``'s build.

    cpp: -O3 plus the ISA flags of torch's CPU capability (not -march=native: a cache shared by several machines
    would then need the whole CPU model in its key), and OpenMP for at::parallel_for (at run time the libgomp that
    torch already loaded serves it: same soname, so torch.set_num_threads applies).
    cuda: the binding (host C++ that only checks and launches: no OpenMP, no ISA flags) and nvcc's flags: C++17
    (the .cu files include no torch header, so they need not follow torch's language standard), -O3, the archs of
    :func:`cuda_arch_flags`. torch adds -D__CUDA_NO_HALF_OPERATORS__ & co.; the kernels convert explicitly.
    """
    extra = os.environ.get("FASTBERT_EXTRA_CFLAGS", "").split()
    if backend == "cuda":
        return {
            "cflags": ["-O3", "-DNDEBUG", *extra],
            "ldflags": [],
            "cuda_cflags": ["-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr", *cuda_arch_flags()],
        }
    cap = cpu_capability() if platform.machine().lower() in ("x86_64", "amd64") else "DEFAULT"
    isa = list(_ISA_FLAGS.get(cap, []))
    if cap == "AVX512" and cpu_has_avx512_bf16():
        isa.append("-mavx512bf16")  # csrc/cpu/vec_utils.h: one-instruction fp32 -> bf16 rounding
    defines = [f"-DCPU_CAPABILITY={cap if isa else 'DEFAULT'}"] + ([f"-DCPU_CAPABILITY_{cap}"] if isa else [])
    # -ffp-contract=off: g++ fuses a * b + c into an FMA by default in C++, differently in each inlining context;
    # the kernels write their FMAs explicitly, so the forward and the backward's recomputation round identically.
    return {
        "cflags": ["-O3", "-DNDEBUG", "-ffp-contract=off", "-fopenmp", *isa, *defines, *extra],
        "ldflags": ["-fopenmp"],
        "cuda_cflags": [],
    }


def build_dir(backend: str = "cpp", csrc: Path | None = None) -> Path:
    """The cache directory of ``backend``'s build for these sources, torch, Python, CPU capability and flags."""
    import torch

    csrc = csrc_dir() if csrc is None else Path(csrc)
    flags = compiler_flags(backend)
    digest = hashlib.sha256()
    meta = [
        backend,
        torch.__version__,
        str(torch.version.git_version),
        str(torch.version.cuda),
        f"{sys.version_info[0]}.{sys.version_info[1]}",
        platform.machine(),
        cpu_capability(),
        flags,
        os.environ.get("TORCH_CUDA_ARCH_LIST", "") if backend == "cuda" else "",
    ]
    digest.update(json.dumps(meta).encode())
    for path in _hashed_files(backend, csrc):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    version = torch.__version__.split("+")[0]
    name = f"{backend}-torch{version}-py{sys.version_info[0]}{sys.version_info[1]}-{cpu_capability().lower()}"
    return cache_root() / f"{name}-{digest.hexdigest()[:16]}"


def library_path(backend: str = "cpp", csrc: Path | None = None) -> Path:
    return build_dir(backend, csrc) / f"{LIB_NAMES[backend]}.so"


# --------------------------------------------------------------------------------------------------------------
# building

# Runs in the child process: compile (ninja, through torch) and load the library once, so that a library that
# links but cannot load (a missing symbol) fails the build rather than the caller.
_CHILD = """
import json, sys
from torch.utils.cpp_extension import load
a = json.loads(sys.argv[1])
load(name=a["name"], sources=a["sources"], extra_cflags=a["cflags"], extra_ldflags=a["ldflags"],
     extra_cuda_cflags=a["cuda_cflags"], extra_include_paths=a["include"], build_directory=a["dir"],
     verbose=a["verbose"], is_python_module=False)
"""


def _check_tools(backend: str) -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler ({cxx}) found: install g++ (e.g. apt-get install g++) or set CXX")
    if shutil.which("ninja") is None:
        raise BuildError("ninja not installed (pip install ninja)")


# A compiler / linker / loader diagnostic (g++ "file:3:5: error:", nvcc "file(3): error:", ld, dlopen), as opposed
# to the Python traceback around it ("CalledProcessError", "RuntimeError: Error building extension").
_DIAGNOSTIC = re.compile(r"\berror\b:|undefined (symbol|reference)|cannot find -l", re.IGNORECASE)


def _summarize(log: str, limit: int = 2500) -> str:
    """The compiler's complaint out of a build log: from its first diagnostic on, without command lines."""
    lines = [line for line in log.splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if _DIAGNOSTIC.search(line)), None)
    if first is None:
        text = "\n".join(lines[-15:])
    else:
        keep = [line for line in lines[first:] if not line.lstrip().startswith(("[", "ninja: ", "FAILED: "))]
        text = "\n".join(keep[:25])
    return text if len(text) <= limit else text[:limit] + " [...]"


def _run_child(args: dict, timeout: float, verbose: bool) -> None:
    cmd = [sys.executable, "-c", _CHILD, json.dumps(args)]
    out = None if verbose else subprocess.PIPE
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT if out else None, text=True, start_new_session=True
    )  # its own process group: a timeout kills ninja and g++ too
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        (Path(args["dir"]) / "lock").unlink(missing_ok=True)  # torch's build lock, left behind by the kill
        hint = "set FASTBERT_BUILD_TIMEOUT to allow longer"
        raise BuildError(f"build timed out after {timeout:.0f} s ({hint})") from None
    if proc.returncode != 0:
        raise BuildError(f"build failed: {_summarize(log or '(see the output above)')}")


def build(
    verbose: bool = False,
    backend: str = "cpp",
    csrc: Path | None = None,
    force: bool = False,
    timeout: float | None = None,
) -> BuildResult:
    """Compile ``backend``'s library unless the cache already holds it; returns where it is.

    Does not load it (see :func:`load`). ``force`` deletes the cached build first. Raises :class:`BuildError`
    with the reason (missing tool, compiler output, time limit).
    """
    with _lock:
        csrc = csrc_dir() if csrc is None else Path(csrc).resolve()
        target = build_dir(backend, csrc)
        lib = target / f"{LIB_NAMES[backend]}.so"
        if force:
            shutil.rmtree(target, ignore_errors=True)
            _failed.pop(target, None)
        elif (target / _STAMP).is_file() and lib.is_file():
            return BuildResult(lib, False, 0.0)
        if target in _failed:
            raise BuildError(_failed[target])
        missing = [str(p) for p in sources(backend, csrc) if not p.is_file()]
        if missing:
            raise BuildError(f"sources missing: {', '.join(missing)}")
        _check_tools(backend)
        if timeout is None:
            timeout = float(os.environ.get("FASTBERT_BUILD_TIMEOUT", DEFAULT_TIMEOUT_S))
        target.mkdir(parents=True, exist_ok=True)
        lock = target / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > timeout:
            lock.unlink(missing_ok=True)  # a build killed long ago; torch would wait on it forever
        flags = compiler_flags(backend)
        args = {
            "name": LIB_NAMES[backend],
            "sources": [str(p) for p in sources(backend, csrc)],
            **flags,
            "include": [str(csrc)],
            "dir": str(target),
            "verbose": verbose,
        }
        _log.warning("fastbert: compiling the %s extension (once; cached in %s)", backend, target)
        start = time.perf_counter()
        try:
            _run_child(args, timeout, verbose)
        except BuildError as exc:
            _failed[target] = str(exc)
            raise
        seconds = time.perf_counter() - start
        info = {"seconds": round(seconds, 1), **flags, "sources": args["sources"], "python": sys.version}
        (target / _STAMP).write_text(json.dumps(info, indent=1))
        return BuildResult(lib, True, seconds)


# --------------------------------------------------------------------------------------------------------------
# loading and probing


def load(backend: str = "cpp", csrc: Path | None = None) -> Path:
    """Build if needed and load ``backend``'s library into this process (once); returns its path."""
    if backend == "cuda":
        ok, reason = _cuda_prerequisites()
        if not ok:
            raise BuildError(reason)
        load("cpp", csrc)  # defines the op schemas the CUDA library implements
    with _lock:
        result = build(backend=backend, csrc=csrc)
        current = _loaded.get(backend)
        if current == result.path:
            return current
        if current is not None:
            raise BuildError(
                f"another build of the fastbert extension ({current}) is already loaded in this process; "
                f"restart Python to use {result.path}"
            )
        import torch

        try:
            torch.ops.load_library(str(result.path))
        except OSError as exc:
            raise BuildError(f"loading {result.path} failed: {exc}") from None
        _loaded[backend] = result.path
        return result.path


def is_loaded(backend: str = "cpp") -> bool:
    return backend in _loaded


def _cuda_prerequisites() -> tuple[bool, str]:
    import torch

    if torch.version.cuda is None:
        return False, "torch is a CPU-only build (torch.version.cuda is None)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return False, "no CUDA toolkit (nvcc) found: install one matching torch's CUDA, or set CUDA_HOME"
    if not (csrc_dir() / CUDA_BINDING).is_file():
        return False, f"csrc/{CUDA_BINDING} (the torch binding of the CUDA kernels) is missing"
    if torch.cuda.is_available():
        caps = [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
        if all(c < MIN_CUDA_CAPABILITY for c in caps):
            have = ", ".join(f"{a}.{b}" for a, b in caps)
            return False, f"the CUDA kernels need compute capability 8.0+ (Ampere or newer); this GPU has {have}"
    return True, ""


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def probe(backend: str) -> tuple[bool, str]:
    """(available, reason) for ``backend`` ('cpp' or 'cuda'); builds and loads the library if needed. Never raises."""
    try:
        if backend not in BACKENDS:
            return False, f"unknown extension backend {backend!r}"
        if backend == "cuda":
            ok, reason = _cuda_prerequisites()
            if ok and not _cuda_visible():
                # Nothing could run the kernels: do not spend minutes compiling them (a CPU-only CI with a CUDA
                # build of torch and a toolkit). `fastbert build --backend cuda` still builds ahead of time.
                ok, reason = False, "no CUDA device is visible to torch"
            if not ok:
                return False, reason
        path = load(backend)
        if backend == "cpp":
            return True, f"compiled CPU kernels ({cpu_capability()}) from {path.parent}"
        archs = [f.split("code=")[-1] for f in cuda_arch_flags()] or [os.environ["TORCH_CUDA_ARCH_LIST"].strip()]
        return True, f"compiled CUDA kernels ({', '.join(archs)}) from {path.parent}"
    except BuildError as exc:
        return False, str(exc)
    except Exception as exc:  # a probe must never take the caller down
        return False, f"extension failed: {type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """``python -m fastbert._ext [--verbose] [--force] [--backend cpp]``: build ahead of time."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastbert._ext", description=main.__doc__)
    parser.add_argument("--backend", default="cpp", choices=BACKENDS)
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    parser.add_argument("--force", action="store_true", help="delete the cached build and compile again")
    args = parser.parse_args(argv)
    if args.backend == "cuda":
        ok, reason = _cuda_prerequisites()
        if not ok:
            print(f"cannot build the cuda extension: {reason}", file=sys.stderr)
            return 1
    try:
        result = build(verbose=args.verbose, backend=args.backend, force=args.force)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    state = f"built in {result.seconds:.0f} s" if result.compiled else "up to date"
    print(f"fastbert {args.backend} extension {state}: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
