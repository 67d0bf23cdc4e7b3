"""Compile the Triton contrastive kernels for NVIDIA GPUs on a machine without one, and report what
ptxas made of them: registers, spill bytes, shared memory against the target's limit, and whether each
``tl.dot`` became a tensor-core instruction.

    python -m bmc_fast.kernels.compile_report [--arch sm_80 sm_90] [--mode bf16 tf32] [--kernel ...] \\
        [--json report.json] [--md report.md]

Each configuration is what a launch would compile: the launcher's own arguments (``*_launch`` in
``contrastive_triton``, at a paper-scale shape: 1,024 local rows against 16,384 gathered columns, width
768) go through Triton's own binder, so pointers and integers get a real launch's specialisation (16-byte
alignment, divisibility by 16), and the tiles are those ``tiles.tiles_for`` gives the launch. Triton 3.8
compiles to cubin for ``GPUTarget("cuda", cc, 32)`` with its bundled ptxas, whose ``-v`` log gives
registers and spills; ``metadata.shared`` is the shared memory. Run without ``TRITON_INTERPRET`` (the
kernels must be compiled, not interpreted).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

from .tiles import ARCHS, KERNELS, MODES, Tiles

N_ROWS, N_COLS, WIDTH = 1024, 16384, 768  # one rank of the paper's 16K batch on 16 GPUs, 768-d features
CAPABILITY = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
# Largest shared memory one block may use (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability"): 8.0 allows 163 KB but 8.6 / 8.9 (which run the sm_80 tiles) 99 KB, so 99 KB is the sm_80
# family's limit; 9.0 and 10.0 allow 227 KB.
SHARED_LIMIT = {"sm_80": 99 * 1024, "sm_90": 227 * 1024, "sm_100": 227 * 1024}
TENSOR_CORE_OPS = ("tcgen05.mma", "wgmma.mma_async", "mma.sync")  # Blackwell, Hopper, Ampere+ (PTX)


@dataclass
class Compiled:
    kernel: str
    mode: str
    arch: str
    tiles: dict
    registers: int
    spill_bytes: int  # spill stores + spill loads, as ptxas -v counts them
    shared_bytes: int
    shared_limit: int
    tensor_core: str | None  # the PTX instruction tl.dot became, or None (FMA)
    seconds: float

    @property
    def problems(self) -> list[str]:
        """What a shipped configuration must not have: a shared-memory overflow; in a 16-bit or TF32 mode, a
        spill or a dot that missed the tensor cores."""
        found = []
        if self.shared_bytes > self.shared_limit:
            found.append(f"shared memory {self.shared_bytes} B > {self.shared_limit} B")
        if self.mode != "ieee" and self.spill_bytes:
            found.append(f"{self.spill_bytes} B of spills")
        if self.mode != "ieee" and self.tensor_core is None:
            found.append("tl.dot is not a tensor-core instruction")
        return found


def compile_one(kernel: str, mode: str, arch: str, tiles: Tiles | None = None) -> Compiled:
    """Compile ``kernel`` in ``mode`` for ``arch`` with the launch's tiles (or ``tiles``)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from . import contrastive_triton as ct
    from .tiles import tiles_for

    fn, args, options = _launch(kernel, mode, arch, torch, ct)
    if tiles is not None:
        options = {**options, **tiles.launch_options()}
    if not isinstance(fn, JITFunction):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET is set): run the compile report without it")
    target = GPUTarget("cuda", CAPABILITY[arch], 32)
    backend = make_backend(target)
    started = time.perf_counter()
    bound, specialization, parsed = create_function_from_signature(fn.signature, fn.params, backend)(*args, **options)
    parsed, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, parsed)
    log = io.StringIO()
    knobs = triton.knobs
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True  # a fresh ptxas run and its log
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=parsed.__dict__)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    registers, spills = _ptxas_usage(log.getvalue(), f"{kernel} {mode} {arch}")
    ptx = compiled.asm["ptx"]
    used = tiles or tiles_for(kernel, mode, arch)
    return Compiled(kernel, mode, arch, asdict(used), registers, spills, compiled.metadata.shared,
                    SHARED_LIMIT[arch], next((op for op in TENSOR_CORE_OPS if op in ptx), None),
                    time.perf_counter() - started)


def _launch(kernel: str, mode: str, arch: str, torch, ct):
    """(JIT function, arguments, launch options) of the launcher for ``kernel``, on CPU tensors."""
    dtype = {"ieee": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    image, texts = torch.empty(N_ROWS, WIDTH, dtype=dtype), torch.empty(N_COLS, WIDTH, dtype=dtype)
    scale, bias = torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    rows, cols = torch.empty(N_ROWS), torch.empty(N_COLS)
    if kernel == "forward_softmax":
        launch = ct.softmax_forward_launch(image, texts, scale, None, ct.MAX_GROUPS, mode, arch)
        return ct._forward_kernel, launch.args, launch.options
    if kernel == "forward_sigmoid":
        launch = ct.sigmoid_forward_launch(image, texts, scale, bias, 0, mode, arch)
        return ct._forward_kernel, launch.args, launch.options
    sigmoid = kernel == "backward_sigmoid"
    stats = dict(a_lse=None, a_coef=torch.ones(1), b_lse=None, b_coef=None, diag_coef=None) if sigmoid else \
        dict(a_lse=rows, a_coef=rows, b_lse=cols, b_coef=cols, diag_coef=torch.ones(1))
    launch = ct.backward_launch(image, texts, scale, bias if sigmoid else None, sigmoid, diag_offset=0, mode=mode,
                                arch=arch, **stats)
    return ct._backward_kernel, launch.args, launch.options


def _ptxas_usage(log: str, what: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) of the kernel entry in a ``ptxas -v`` log."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"{what}: no register / spill line in the ptxas log:\n{log[-2000:]}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def markdown(results: list[Compiled]) -> str:
    rows = ["| kernel | mode | arch | tiles (m×n×k, warps, stages) | registers | spills (B) | shared (KB) / limit | "
            "tensor cores | problems |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r.tiles
        rows.append(f"| {r.kernel} | {r.mode} | {r.arch} | {t['block_m']}×{t['block_n']}×{t['block_k']}, "
                    f"{t['num_warps']}, {t['num_stages']} | {r.registers} | {r.spill_bytes} | "
                    f"{r.shared_bytes / 1024:.0f} / {r.shared_limit // 1024} | {r.tensor_core or '— (FMA)'} | "
                    f"{'; '.join(r.problems) or 'none'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[Compiled]:
    parser = argparse.ArgumentParser(prog="python -m bmc_fast.kernels.compile_report",
                                     description="Compile the Triton kernels for sm_80/90/100 and report ptxas usage.")
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--md", default=None, help="write the report as a markdown table here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        parser.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    results = []
    for kernel in args.kernel:
        for mode in args.mode:
            for arch in args.arch:
                results.append(compile_one(kernel, mode, arch))
                sys.stderr.write(f"{kernel} {mode} {arch}: {results[-1].registers} registers, "
                                 f"{results[-1].spill_bytes} B spills ({results[-1].seconds:.1f} s)\n")
    import platform

    import torch
    import triton

    machine = f"{platform.platform()}, {os.cpu_count()} CPU cores, no GPU (compiled, never run)"
    table = markdown(results)
    if args.json:
        payload = {"machine": machine, "versions": {"triton": triton.__version__, "torch": torch.__version__},
                   "shape": {"rows": N_ROWS, "cols": N_COLS, "width": WIDTH},
                   "results": [asdict(r) | {"problems": r.problems} for r in results]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"Triton {triton.__version__} to cubin with its bundled ptxas, on {machine}; launch arguments "
                    f"at {N_ROWS} rows × {N_COLS} columns × {WIDTH}. Problems: a shared-memory overflow, or in "
                    "tf32/bf16/fp16 a spill or a dot off the tensor cores.\n\n" + table + "\n")
    sys.stdout.write(table + "\n")
    return results


if __name__ == "__main__":
    main()
