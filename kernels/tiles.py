"""Launch tiles of the Triton contrastive kernels, per kernel, GPU generation and dot precision.

The launchers in ``contrastive_triton`` read their block sizes, warps and pipeline stages from
``tiles_for``; ``compile_report`` compiles exactly these for sm_80 / sm_90 / sm_100 without a GPU and
checks registers, spills, shared memory and tensor-core instructions (``python -m
bmc_fast.kernels.compile_report``). Pure Python: importable without triton.

Kernels: ``forward_softmax`` (CLIP's statistics and partial columns), ``forward_sigmoid`` (SigLIP's),
``backward_softmax`` / ``backward_sigmoid`` (feature gradients, one call per side). Modes: ``ieee`` (fp32
inputs, exact dots), ``tf32`` (fp32 inputs under torch's TF32 setting), ``bf16``, ``fp16``.
"""
from __future__ import annotations

from dataclasses import dataclass

KERNELS = ("forward_softmax", "forward_sigmoid", "backward_softmax", "backward_sigmoid")
MODES = ("ieee", "tf32", "bf16", "fp16")
ARCHS = ("sm_80", "sm_90", "sm_100")  # Ampere/Ada, Hopper, Blackwell


@dataclass(frozen=True)
class Tiles:
    block_m: int = 64  # rows of A per program (and per logit tile)
    block_n: int = 64  # columns of the logit tile (rows of B)
    block_k: int = 32  # feature slice of each tl.dot
    num_warps: int = 4
    num_stages: int = 3

    def launch_options(self) -> dict[str, int]:
        """Keyword arguments of a kernel launch: the block constexprs and Triton's ``num_warps`` /
        ``num_stages``."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


INTERPRETER = Tiles()  # CPU tests: warps and stages mean nothing there, the blocks are the GPU's


def arch_of(capability: tuple[int, int]) -> str:
    """The ``ARCHS`` entry of a CUDA compute capability (``torch.cuda.get_device_capability``)."""
    major = capability[0]
    return "sm_100" if major >= 10 else "sm_90" if major == 9 else "sm_80"


def tiles_for(kernel: str, mode: str, arch: str | None) -> Tiles:
    """The tiles a launch of ``kernel`` in ``mode`` uses on ``arch`` (None: the interpreter).

    64x64 logit tiles in 32-wide feature slices everywhere; the warps are chosen so that ptxas (Triton 3.8)
    spills in no configuration (benchmarks/results/kernel_compile.md has every one). With 4 warps (128
    threads holding a 64x64 fp32 tile and its accumulators) it spilled the sigmoid forward on sm_80 (320 B
    in bf16/fp16, 376 B in tf32), the softmax forward on sm_100 (16 B bf16/fp16, 112 B tf32) and every
    exact-fp32 backward (560-796 B); 8 warps fix those, but spill the tf32 sigmoid backward (12-16 B),
    which 4 warps did not, and the exact-fp32 backward on sm_80 (16 B), which 16-wide slices fix.
    """
    if kernel not in KERNELS or mode not in MODES or (arch is not None and arch not in ARCHS):
        raise ValueError(f"no tiles for kernel {kernel!r}, mode {mode!r}, arch {arch!r}: kernels {KERNELS}, "
                         f"modes {MODES}, archs {ARCHS}")
    if arch is None:
        return INTERPRETER
    if kernel.startswith("forward"):
        return Tiles(num_warps=8)
    if mode == "ieee":
        return Tiles(block_k=16 if arch == "sm_80" else 32, num_warps=8)
    return Tiles(num_warps=4)  # 16-bit and tf32 backward
