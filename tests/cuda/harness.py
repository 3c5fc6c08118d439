"""ctypes harness for the CUDA kernels of csrc/cuda, without the torch binding.

``build_library`` compiles every ``csrc/cuda/*.cu`` plus ``tests/cuda/harness_api.cu`` (device memory, errors, host
access to the Philox generator) into one shared library with nvcc; ``Lib`` declares the C signatures of
``csrc/cuda/launchers.h`` so tests call the launchers directly; ``Tensor`` moves NumPy arrays (fp32, fp16, bf16
as uint16 bit patterns) to and from the device. The NumPy model of the two dropout mappings documented in
launchers.h (``rows_keep``, ``attention_keep``) gives the masks that the float64 references are evaluated with.

Environment: ``FASTBERT_CUDA_ARCH`` (nvcc -arch, default ``native``), ``FASTBERT_CUDA_HARNESS_DIR`` (build cache,
default ``~/.cache/fastbert/cuda-harness``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CUDA_SRC = HERE.parents[1] / "csrc" / "cuda"

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
GELU = {"none": 0, "tanh": 1}

# --------------------------------------------------------------------------------------------------------------
# dtypes: float64 values <-> device storage


def to_bf16_bits(x) -> np.ndarray:
    """Round float values to bfloat16 (nearest even) and return the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class DType:
    def __init__(self, name: str, code: int, storage):
        self.name, self.code, self.storage = name, code, np.dtype(storage)
        self.itemsize = self.storage.itemsize

    def encode(self, values) -> np.ndarray:
        if self.name == "bfloat16":
            return to_bf16_bits(values)
        return np.ascontiguousarray(values, dtype=self.storage)

    def decode(self, stored) -> np.ndarray:
        if self.name == "bfloat16":
            return from_bf16_bits(stored).astype(np.float64)
        return np.asarray(stored).astype(np.float64)

    def quantize(self, values) -> np.ndarray:
        """The float64 values this dtype actually stores for `values`."""
        return self.decode(self.encode(values))

    def __repr__(self) -> str:
        return self.name


DTYPES = {
    "float32": DType("float32", 0, np.float32),
    "float16": DType("float16", 1, np.float16),
    "bfloat16": DType("bfloat16", 2, np.uint16),
}
F32 = DTYPES["float32"]
U8 = DType("uint8", -1, np.uint8)  # key padding masks
I32 = DType("int32", -1, np.int32)  # cu_seqlens

# --------------------------------------------------------------------------------------------------------------
# The dropout mappings of launchers.h, in NumPy (uint64 arithmetic on uint32 words).

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
TAG_ROWS, TAG_ATTENTION = 0x524F5753, 0x4154544E


def philox4x32_10(c0, c1, c2, c3, key: int):
    """Philox4x32-10 of broadcast uint32 counter words under a 64-bit key: four uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint64) & _MASK32 for x in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = np.broadcast_arrays(*c)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(_W0)) & _MASK32
            k1 = (k1 + np.uint64(_W1)) & _MASK32
        p0 = np.uint64(_M0) * c0
        p1 = np.uint64(_M1) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
    return [x.astype(np.uint32) for x in (c0, c1, c2, c3)]


def _u16(words, slot) -> np.ndarray:
    slot = np.asarray(slot)
    w = np.choose(slot >> 1, [x.astype(np.uint64) for x in words])
    return ((w >> (16 * (slot & 1)).astype(np.uint64)) & np.uint64(0xFFFF)).astype(np.uint32)


def dropout_threshold16(p: float) -> int:
    t = float(np.rint(float(np.float32(p)) * 65536.0))
    return int(min(max(t, 0.0), 65535.0))


def keep_scale(p: float) -> float:
    return float(np.float32(1.0) / (np.float32(1.0) - np.float32(p)))


def rows_keep(seed: int, rows: int, cols: int, p: float) -> np.ndarray:
    """(rows, cols) bool keep mask of add_layer_norm's dropout."""
    r = np.arange(rows, dtype=np.uint64)[:, None]
    c = np.arange(cols, dtype=np.uint64)[None, :]
    words = philox4x32_10(c >> np.uint64(3), r & _MASK32, r >> np.uint64(32), TAG_ROWS, seed)
    return _u16(words, (c & np.uint64(7)).astype(np.int64)) >= dropout_threshold16(p)


def attention_keep(seed: int, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, p: float) -> np.ndarray:
    """(batch, nheads, seqlen_q, seqlen_k) bool keep mask of the attention dropout."""
    bh = np.arange(batch * nheads, dtype=np.uint64)[:, None, None]
    q = np.arange(seqlen_q, dtype=np.uint64)[None, :, None]
    k = np.arange(seqlen_k, dtype=np.uint64)[None, None, :]
    ql, kl = q & np.uint64(15), k & np.uint64(15)
    one, seven = np.uint64(1), np.uint64(7)
    c0 = ((k >> np.uint64(4)) << np.uint64(5)) | ((ql & one) << np.uint64(4)) | (((ql & seven) >> one) << np.uint64(2))
    c0 = c0 | ((kl & seven) >> one)
    words = philox4x32_10(c0, q >> np.uint64(4), bh, TAG_ATTENTION, seed)
    slot = ((ql >> np.uint64(3)) * np.uint64(4) + (kl >> np.uint64(3)) * np.uint64(2) + (kl & one)).astype(np.int64)
    keep = _u16(words, np.broadcast_to(slot, words[0].shape)) >= dropout_threshold16(p)
    return keep.reshape(batch, nheads, seqlen_q, seqlen_k)


# --------------------------------------------------------------------------------------------------------------
# Building


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def gpu_available() -> bool:
    """A CUDA device is visible to the driver (checked through libcuda, without building anything)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nfailed with exit code {proc.returncode}:\n{proc.stderr}{proc.stdout}")


def build_library(sources=None, name: str = "fastbert_cuda_harness", arch: str | None = None,
                  out_dir: Path | None = None) -> Path:
    """Compile `sources` (default: csrc/cuda/*.cu + harness_api.cu) into lib<name>.so, cached by content + flags."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH")
    sources = [Path(s) for s in (sources or [*sorted(CUDA_SRC.glob("*.cu")), HERE / "harness_api.cu"])]
    arch = arch or os.environ.get("FASTBERT_CUDA_ARCH", "native")
    flags = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", f"-arch={arch}",
             f"-I{CUDA_SRC}"]
    digest = hashlib.sha256(" ".join([nvcc, *flags]).encode())
    for path in sorted({*sources, *CUDA_SRC.glob("*.cuh"), *CUDA_SRC.glob("*.h")}):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    root = out_dir or Path(os.environ.get("FASTBERT_CUDA_HARNESS_DIR", Path.home() / ".cache/fastbert/cuda-harness"))
    build = Path(root) / f"{name}-{digest.hexdigest()[:16]}"
    lib = build / f"lib{name}.so"
    if lib.is_file():
        return lib
    build.mkdir(parents=True, exist_ok=True)
    objects = [build / f"{s.stem}.o" for s in sources]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        jobs = [[nvcc, "-c", *flags, str(src), "-o", str(obj)] for src, obj in zip(sources, objects, strict=True)]
        list(pool.map(_run, jobs))
    tmp = build / f"lib{name}.so.tmp"
    _run([nvcc, "-shared", f"-arch={arch}", *map(str, objects), "-o", str(tmp)])
    tmp.replace(lib)
    return lib


# --------------------------------------------------------------------------------------------------------------
# The C API


class Strides(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("seq", ctypes.c_int64), ("head", ctypes.c_int64)]


_P, _I64, _F, _U64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64
_I, _SZ = ctypes.c_int, ctypes.c_size_t
_S = Strides

SIGNATURES = {
    "fastbert_add_layer_norm_fwd": (_I, [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _F, _F, _U64, _I, _I, _P]),
    "fastbert_layer_norm_bwd_workspace_size": (_SZ, [_I64, _I64]),
    "fastbert_add_layer_norm_bwd": (
        _I, [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _F, _U64, _P, _SZ, _I, _I, _P]),
    "fastbert_bias_gelu_fwd": (_I, [_P, _P, _P, _I64, _I64, _I, _I, _I, _P]),
    "fastbert_bias_gelu_bwd": (_I, [_P, _P, _P, _P, _I64, _I64, _I, _I, _I, _P]),
    "fastbert_bias_gelu_layer_norm_fwd": (_I, [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _F, _I, _I, _I, _P]),
    "fastbert_bias_gelu_layer_norm_bwd": (
        _I, [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I, _P, _SZ, _I, _I, _P]),
    "fastbert_softmax_fwd": (_I, [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _F, _I, _P]),
    "fastbert_softmax_bwd": (_I, [_P, _P, _P, _I64, _I64, _F, _I, _P]),
    "fastbert_attention_supported": (_I, [_I64, _I]),
    "fastbert_attention_fwd": (
        _I, [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _S, _S, _S, _S, _I64, _F, _F, _U64, _I, _P]),
    "fastbert_attention_bwd_workspace_size": (_SZ, [_I64, _I64, _I64]),
    "fastbert_attention_bwd": (
        _I, [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, *([_S] * 8), _I64, _F, _F, _U64,
             _P, _SZ, _I, _P]),
    "fastbert_varlen_attention_fwd": (
        _I, [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _S, _S, _S, _S, _F, _F, _U64, _I, _P]),
    "fastbert_varlen_attention_bwd": (
        _I, [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, *([_S] * 8), _F, _F, _U64, _P, _SZ,
             _I, _P]),
    # harness_api.cu
    "fbh_device_count": (_I, []),
    "fbh_device_name": (_I, [ctypes.c_char_p, _I]),
    "fbh_malloc": (_P, [_SZ]),
    "fbh_free": (_I, [_P]),
    "fbh_memcpy_htod": (_I, [_P, _P, _SZ]),
    "fbh_memcpy_dtoh": (_I, [_P, _P, _SZ]),
    "fbh_memset": (_I, [_P, _I, _SZ]),
    "fbh_synchronize": (_I, []),
    "fbh_peek_last_error": (_I, []),
    "fbh_error_string": (ctypes.c_char_p, [_I]),
    "fbh_event_create": (_P, []),
    "fbh_event_record": (_I, [_P]),
    "fbh_event_elapsed_ms": (_F, [_P, _P]),
    "fbh_event_destroy": (_I, [_P]),
    "fbh_philox4x32_10": (None, [ctypes.c_uint32] * 4 + [_U64, ctypes.POINTER(ctypes.c_uint32)]),
    "fbh_dropout_threshold16": (ctypes.c_uint32, [_F]),
    "fbh_attn_dropout_keep": (_I, [_U64, ctypes.c_uint32, _I64, _I64, _I64]),
    "fbh_rows_dropout_keep": (_I, [_U64, ctypes.c_uint32, _I64, _I64]),
}


class Lib:
    """The loaded library; attribute access returns the declared C functions (missing ones raise)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.dll = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(self.dll, name, None)
            if fn is not None:
                fn.restype, fn.argtypes = restype, argtypes

    def __getattr__(self, name):
        return getattr(self.dll, name)

    def check(self, err: int, what: str = "launch") -> None:
        if err != CUDA_SUCCESS:
            raise RuntimeError(f"{what} returned {err}: {self.fbh_error_string(err).decode()}")
        sync = self.fbh_synchronize()
        if sync != CUDA_SUCCESS:
            raise RuntimeError(f"{what} failed on the device: {self.fbh_error_string(sync).decode()}")


class Tensor:
    """A device array: `offset` extra elements in front make a deliberately misaligned pointer."""

    def __init__(self, lib: Lib, shape, dtype: DType, offset: int = 0):
        self.lib, self.shape, self.dtype = lib, tuple(int(s) for s in shape), dtype
        self.numel = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = (self.numel + offset) * dtype.itemsize
        self.base = lib.fbh_malloc(self.nbytes)
        if not self.base:
            raise MemoryError(f"cudaMalloc of {self.nbytes} bytes failed")
        self.ptr = self.base + offset * dtype.itemsize
        lib.fbh_memset(self.base, 0xFF, self.nbytes)  # NaN in every dtype: unwritten outputs show up

    @classmethod
    def from_values(cls, lib: Lib, values, dtype: DType, offset: int = 0) -> Tensor:
        stored = dtype.encode(np.asarray(values, dtype=np.float64))
        t = cls(lib, stored.shape, dtype, offset)
        err = lib.fbh_memcpy_htod(t.ptr, stored.ctypes.data, stored.nbytes)
        if err:
            raise RuntimeError(f"upload failed: {lib.fbh_error_string(err).decode()}")
        return t

    def raw(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype.storage)
        err = self.lib.fbh_memcpy_dtoh(out.ctypes.data, self.ptr, out.nbytes)
        if err:
            raise RuntimeError(f"download failed: {self.lib.fbh_error_string(err).decode()}")
        return out

    def get(self) -> np.ndarray:
        """The contents as float64."""
        return self.dtype.decode(self.raw())

    def __del__(self):
        if getattr(self, "base", None):
            self.lib.fbh_free(self.base)
            self.base = None


def ptr(t: Tensor | None):
    return None if t is None else t.ptr
