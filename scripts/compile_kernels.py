"""Compiles the Triton kernels for a Hopper GPU (sm_90) on any machine, no GPU needed.

    python scripts/compile_kernels.py [--dtype bf16] [--head-dims 64,128] [--key-mask] [--attend-current]

For each kernel at the block sizes the launcher picks, prints shared memory, registers and
spills (from the ptxas that ships with triton) and the count of the instructions that matter:
wgmma (tensor cores), ex2/lg2 (special-function unit), cp.async (pipelined loads). Catches
compile errors and register spills before any GPU time is spent.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sb_eval.kernels.backward import (
    stickbreaking_backward_dkv_kernel,
    stickbreaking_backward_dq_kernel,
    stickbreaking_backward_totals_kernel,
)
from sb_eval.kernels.decode import stickbreaking_combine_kernel, stickbreaking_split_kernel
from sb_eval.kernels.forward import stickbreaking_forward_kernel
from sb_eval.kernels.triton_backend import backward_config, forward_config, span_block, split_config

TARGET = GPUTarget("cuda", 90, 32)
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INPUT_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
FLOAT_ARGS = {"qk_scale", "halt_bits", "scale"}
# Arguments Triton's launcher would find divisible by 16 for contiguous inputs.
ALIGNED = re.compile(
    r"^(Q|K|V|O|DO|DQ|DK|DV|REM|DIST|O_PART|USED_PART|DIST_PART|REMAINDER|DREM_IN|DREM|TOTAL|BOUND"
    r"|USED_SNAP|A_SNAP|DR_PART|stride_(?:[qkvo]|do|dq|dk|dv)[bht])$"
)


def compile_kernel(kernel, dtype: torch.dtype, constants: dict, num_warps: int, num_stages: int,
                   max_registers: int | None = None):
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name == "KEY_MASK":
            signature[name] = "*u8"
        elif name in ("KEY_SPANS", "NUM_KEYS"):
            signature[name] = "*i32"
        elif name.isupper():
            signature[name] = f"*{TRITON_TYPES[dtype]}" if name in INPUT_POINTERS else "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if ALIGNED.match(n)}
    source = ASTSource(kernel, signature, constants, attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, maxnreg=max_registers)
    return triton.compile(source, target=TARGET, options=options)


def ptxas_report(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"registers {registers.group(1) if registers else '?'}, spill stores {spills.group(1) if spills else '?'} B"


def describe(name: str, compiled) -> None:
    ptx = compiled.asm["ptx"]
    counts = {op: ptx.count(op) for op in ("wgmma.mma_async", "ex2.approx", "lg2.approx", "cp.async.cg")}
    print(f"{name}: shared {compiled.metadata.shared} B, {ptxas_report(ptx)}, " +
          ", ".join(f"{op} {n}" for op, n in counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--key-mask", action="store_true", help="the kernels' key_mask variants")
    parser.add_argument("--attend-current", action="store_true", help="their attend_current variants")
    parser.add_argument("--spans", type=int, default=0, help="the split-key kernels with span mass over this many spans")
    args = parser.parse_args()
    spans = dict(NUM_SPANS=args.spans, BLOCK_SPANS=span_block(args.spans))
    dtype = {v: k for k, v in TRITON_TYPES.items()}[args.dtype]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    common = dict(ATTEND_CURRENT=int(args.attend_current), HAS_KEY_MASK=args.key_mask,
                  RETURN_STATS=False, DOT_PRECISION=precision)
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        block_d = max(16, triton.next_power_of_2(head_dim))
        cfg = forward_config(head_dim, dtype)
        forward = compile_kernel(stickbreaking_forward_kernel, dtype, dict(
            common, HAS_REMAINDER=False, EARLY_HALTING=True, HALTING_WINDOW=cfg.halting_window,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, HEAD_DIM=head_dim,
            NUM_STAGES=cfg.num_stages,
        ), cfg.num_warps, cfg.num_stages, cfg.max_registers)
        describe(f"forward d={head_dim} {cfg}", forward)
        cfg = split_config(head_dim, dtype)
        split = compile_kernel(stickbreaking_split_kernel, dtype, dict(
            common, **spans, HAS_NUM_KEYS=False, BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_D=block_d, HEAD_DIM=head_dim,
            NUM_STAGES=cfg.num_stages,
        ), cfg.num_warps, cfg.num_stages)
        describe(f"split   d={head_dim} {cfg}", split)
        combine = compile_kernel(stickbreaking_combine_kernel, dtype, dict(
            HAS_REMAINDER=False, RETURN_STATS=False, **spans, BLOCK_S=64, BLOCK_D=block_d, HEAD_DIM=head_dim,
        ), 4, 1)
        describe(f"combine d={head_dim}", combine)
        cfg = backward_config(head_dim, dtype, args.key_mask)
        backward_common = dict(
            ATTEND_CURRENT=int(args.attend_current), HAS_KEY_MASK=args.key_mask,
            DOT_PRECISION=precision, BLOCK_D=block_d, HEAD_DIM=head_dim,
        )
        queries = dict(backward_common, BLOCK_M=cfg.queries.block_m, BLOCK_N=cfg.queries.block_n,
                       NUM_STAGES=cfg.queries.num_stages)
        totals = compile_kernel(stickbreaking_backward_totals_kernel, dtype, dict(
            queries, HAS_REMAINDER=True,
        ), cfg.queries.num_warps, cfg.queries.num_stages, cfg.queries.max_registers)
        describe(f"backward totals d={head_dim} {cfg.queries}", totals)
        dq = compile_kernel(stickbreaking_backward_dq_kernel, dtype, queries, cfg.queries.num_warps,
                            cfg.queries.num_stages, cfg.queries.max_registers)
        describe(f"backward dq     d={head_dim} {cfg.queries}", dq)
        dkv = compile_kernel(stickbreaking_backward_dkv_kernel, dtype, dict(
            backward_common, BLOCK_M=cfg.keys.block_m, BLOCK_N=cfg.keys.block_n,
            NUM_STAGES=cfg.keys.num_stages,
        ), cfg.keys.num_warps, cfg.keys.num_stages, cfg.keys.max_registers)
        describe(f"backward dkv    d={head_dim} {cfg.keys}", dkv)


if __name__ == "__main__":
    main()
