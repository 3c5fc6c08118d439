"""Compile the attention kernels (padded and varlen) for one GPU arch, no GPU needed, and print ptxas's registers
and spills per kernel as JSON. Run in a subprocess by test_attention_triton_compile.py:

    python tests/ops/_triton_compile.py 90 bf16,fp32

TRITON_INTERPRET must be unset before triton is imported, hence the separate process. Each kernel is compiled with
the block sizes its launcher picks for that arch (``_fwd_config`` / ``_bwd_config``) and the heaviest constexprs
(dropout on: Philox adds ~30 live registers per tile row). Registers are None where this Triton cannot print
ptxas's report (TRITON_DUMP_PTXAS_LOG, Triton 3.9).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import re
import sys
import tempfile

FLOATS = ("qk_scale", "scale", "dropout_p")
FP32_POINTERS = ("Lse", "Delta", "RowScale")
POINTERS = ("Q", "K", "V", "Out", "dOut", "dQ", "dK", "dV", "Mask", "CuSeqlens", *FP32_POINTERS)
# (dtype, head dim, modes): BERT's head dim in bf16, and fp32 at a zero-padded head dim.
CASES = (("bf16", 64, ("padded", "padded-dropout", "varlen", "varlen-dropout")), ("fp32", 40, ("padded-dropout",
         "varlen-dropout")))


def _signature(fn, consts, dt):
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = {"Mask": "*u8", "CuSeqlens": "*i32"}.get(name, "*fp32" if name in FP32_POINTERS else "*" + dt)
        else:
            sig[name] = "fp32" if name in FLOATS else "i64" if name == "seed" else "i32"
    return sig


def _compile(fn, consts, warps, stages, dt, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    src = ASTSource(fn, _signature(fn, consts, dt), constexprs={(names.index(n),): v for n, v in consts.items()})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # where TRITON_DUMP_PTXAS_LOG prints
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    regs = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else None,
        "spill_loads": int(spills.group(2)) if spills else None,
    }


def main(arch: int, dtype_names) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastbert-ptxas-")  # a cache hit would skip ptxas
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the default
    import torch

    fw = importlib.import_module("fastbert.ops.attention.triton")
    bw = importlib.import_module("fastbert.ops.attention.triton_bwd")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    results = []

    def build(kernel, fn, consts, warps, stages, dt, d, mode):
        row = dict(arch=arch, kernel=kernel, dtype=dt, head_dim=d, mode=mode, warps=warps, stages=stages,
                   blocks=[consts.get("BLOCK_M"), consts.get("BLOCK_N")])
        row.update(_compile(fn, consts, warps, stages, dt, arch))
        results.append(row)

    for dt, d, modes in (case for case in CASES if case[0] in dtype_names):
        dtype, bd = dtypes[dt], fw.head_block(d)
        for mode in modes:
            common = dict(HEAD_DIM=d, BLOCK_D=bd, HAS_MASK=mode.startswith("padded"), DROPOUT=mode.endswith("dropout"),
                          PRECISION=fw.dot_precision(dtype), VARLEN=mode.startswith("varlen"))
            bm, bn, warps, stages = fw._fwd_config(bd, dtype, arch)
            build("fwd", fw._attention_fwd_kernel, dict(common, BLOCK_M=bm, BLOCK_N=bn), warps, stages, dt, d, mode)
            (kv_m, kv_n), (q_m, q_n), warps, stages = bw._bwd_config(bd, dtype, arch)
            bwd = dict(common, PRECISE=dtype == torch.float32)
            build("bwd_dkdv", bw._attention_bwd_dkdv_kernel, dict(bwd, BLOCK_M=kv_m, BLOCK_N=kv_n), warps, stages,
                  dt, d, mode)
            build("bwd_dq", bw._attention_bwd_dq_kernel, dict(bwd, BLOCK_M=q_m, BLOCK_N=q_n), warps, stages, dt, d,
                  mode)
    build("bwd_delta", bw._attention_bwd_delta_kernel, dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=128), 4, 1, "bf16", 64,
          "any")
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else [case[0] for case in CASES])
