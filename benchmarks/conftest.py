"""pytest setup of the per-op benchmarks: ``pytest benchmarks/ --benchmark-only``.

pyproject.toml keeps pytest's default ``python_files`` and ``testpaths = ["tests"]``, so ``python -m pytest`` from the
root never comes here; this conftest makes ``pytest benchmarks/`` collect the ``bench_*.py`` modules, fixes and
reports the torch thread count, holds the session state (ceilings measured once, the current case's reference),
and adds versions, backends and ceilings to the JSON that ``--benchmark-json`` writes.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable

# The bench modules import _common as a top-level module. pytest's default import mode (prepend) already puts this
# directory on sys.path; --import-mode=importlib does not, so do it here rather than depend on the mode.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _common  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fastbert.bench.timing import copy_bandwidth_gbs, matmul_ceiling_tflops  # noqa: E402
from fastbert.ops import backends  # noqa: E402


def pytest_collect_file(file_path, parent):
    # bench_*.py does not match python_files (test_*.py), and a nested pytest.ini would move the rootdir; collecting
    # them from this conftest keeps discovery local to benchmarks/. A file named on the command line is already
    # collected by pytest's own hook, hence the isinitpath check (no duplicate module).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    # torch's default is the physical core count; FASTBERT_BENCH_THREADS pins another value (1 is steadier on a
    # machine shared with other jobs: an OpenMP barrier waiting on a descheduled thread costs a whole time slice).
    # Set explicitly either way, so the figure every benchmark reports is the one that ran.
    value = os.environ.get("FASTBERT_BENCH_THREADS", "").strip()
    torch.set_num_threads(int(value) if value else torch.get_num_threads())


def pytest_report_header(config):
    dtypes = ", ".join(_common.DTYPE_NAMES[d] for d in _common.DTYPES)
    lines = [
        f"fastbert benchmarks: {_common.DEVICE} ({_common.device_name()}), torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, dtypes {dtypes}, rounds {_common.ROUNDS} (+{_common.WARMUP} warm-up)"
    ]
    return lines + [f"  backend {status}" for status in backends(_common.DEVICE.type).values()]


class Ceilings:
    """Hardware ceilings on the benchmark device, each measured once per session: device-to-device copy GB/s (read +
    write) at session start, large-matmul TFLOP/s per dtype when an attention benchmark first asks for it."""

    def __init__(self):
        self._copy_gbs: float | None = None
        self._matmul: dict[torch.dtype, float] = {}

    def copy_gbs(self) -> float:
        if self._copy_gbs is None:
            self._copy_gbs = copy_bandwidth_gbs(_common.DEVICE)
        return self._copy_gbs

    def matmul_tflops(self, dtype: torch.dtype) -> float:
        if dtype not in self._matmul:
            self._matmul[dtype] = matmul_ceiling_tflops(_common.DEVICE, dtype)
        return self._matmul[dtype]

    def measured(self) -> dict:
        out = {} if self._copy_gbs is None else {"copy_gb_per_s": self._copy_gbs}
        out.update({f"matmul_{_common.DTYPE_NAMES[d]}_tflop_per_s": v for d, v in self._matmul.items()})
        return out


class BenchEnv:
    """Session state that ``_common.run_case`` reads: torch threads, --benchmark-min-rounds, ceilings, and the
    float64 reference (with torch-eager's error) of the case being run. Params are case-major, so caching one case
    bounds the memory."""

    def __init__(self, threads: int, min_rounds: int):
        self.threads, self.min_rounds = threads, min_rounds
        self.ceilings = Ceilings()
        self._ref_case, self._ref_entry = None, None

    def reference(self, case: _common.Case, compute: Callable[[], tuple]) -> tuple:
        if case != self._ref_case:
            self._ref_case, self._ref_entry = None, None  # free the previous case before computing the next
            self._ref_entry, self._ref_case = compute(), case
        return self._ref_entry


# The session's BenchEnv, kept for the machine_info hook, which runs when the JSON is written (after the fixtures).
_SESSION: list[BenchEnv] = []


@pytest.fixture(scope="session")
def bench_env(pytestconfig) -> BenchEnv:
    env = BenchEnv(threads=torch.get_num_threads(), min_rounds=pytestconfig.getoption("benchmark_min_rounds"))
    env.ceilings.copy_gbs()  # before any op runs
    _SESSION.append(env)
    return env


def pytest_benchmark_update_machine_info(config, machine_info):
    try:  # the installed version, without importing triton (its import reads TRITON_INTERPRET and loads drivers)
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    machine_info["fastbert"] = {
        "device": str(_common.DEVICE),
        "device_name": _common.device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "torch_threads": torch.get_num_threads(),
        "backends": {name: str(status) for name, status in backends(_common.DEVICE.type).items()},
        "ceilings": _SESSION[-1].ceilings.measured() if _SESSION else {},
    }
