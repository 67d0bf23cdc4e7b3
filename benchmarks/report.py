"""Results files of a benchmark: ``OUT.json`` (everything measured), ``OUT.md`` (a line on what and where,
then a markdown table) and ``OUT.png`` (when the benchmark draws one)."""
from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path


def write_report(out: Path, result: dict, header: str, columns: list[str], rows: list[list[str]],
                 plot: Callable[[Path], None] | None = None) -> str:
    """Write ``out`` with the suffixes .json, .md (and .png through ``plot(path)``); print and return the .md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    if plot is not None:
        plot(out.with_suffix(".png"))
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(markdown)
    sys.stdout.write(markdown)
    return markdown


# The packages whose versions every results file records (absent ones are left out).
PACKAGES = ("torch", "triton", "deepspeed", "transformers", "tokenizers", "open_clip_torch", "timm", "webdataset",
            "nvidia-dali-cuda130", "transformer_engine", "flash_attn", "numpy")


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (machines of one kind here differ: Intel Xeon one day, AMD EPYC
    the next, with other vector units), or the architecture where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.machine()


def machine(device: str = "cpu") -> dict:
    """Where a benchmark ran: device, cores, CPU (or GPU) name, memory, Python and the package versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info = {"device": device, "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "torch": torch.__version__, "python": platform.python_version(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    info["versions"] = versions
    return info
