"""Wheels for ``make gpu-check`` on a machine without a package index: ``make gpu-wheelhouse`` -> ``.wheelhouse/``.

    python benchmarks/gpu_wheelhouse.py [--out .wheelhouse] [--python 3.12 ...]

What the check needs beyond a CUDA torch (DeepSpeed, open_clip, webdataset, torchdata, transformers and the
Hugging Face packages it requires), at the versions CI pins (``requirements/cpu-pins.txt``), with every
dependency pip resolves for them, except the ones a CUDA torch environment already holds and that are large
(torch, torchvision, triton, numpy, pillow, the ``nvidia-*`` and ``cuda-*`` wheels ...). Binary wheels are
fetched for each ``--python`` (default: 3.12, the lent machine's, and this interpreter's, so a test can install
them here). deepspeed ships only a pure-Python source archive: it is built into a wheel here with
``DS_BUILD_OPS=0`` (its ops JIT-compile where they run). The folder is git-ignored, at most 50 MiB, and
travels with the working tree (the device tool's ``carry``); ``gpu_check.py`` installs it with
``pip install --no-index --no-deps --target``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PINS = REPO / "requirements" / "cpu-pins.txt"
NEEDED = ("deepspeed", "open-clip-torch", "webdataset", "torchdata", "braceexpand", "transformers", "kernels",
          "tokenizers", "safetensors", "filelock", "tqdm")
# In every CUDA torch environment already, and large: never carried.
HELD = re.compile(r"^(torch|torchvision|torchaudio|triton|numpy|pillow|sympy|mpmath|networkx|jinja2|markupsafe|"
                  r"setuptools|nvidia-.*|cuda-.*)$")
LIMIT_BYTES = 50 * 2**20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pinned(names: tuple[str, ...]) -> list[str]:
    """``name==version`` from the CI pins where pinned, else the bare name."""
    pins = dict(line.split("==") for line in PINS.read_text().splitlines() if "==" in line and not line.startswith("#"))
    return [f"{name}=={pins[name]}" if name in pins else name for name in names]


def binary_args(python: str) -> list[str]:
    return ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            *(arg for platform in PLATFORMS for arg in ("--platform", platform))]


def resolve(requirements: list[str], python: str) -> dict[str, str]:
    """{name: version} pip resolves for ``requirements`` on CPython ``python`` / manylinux x86-64."""
    with tempfile.TemporaryDirectory() as target:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                               "--target", target, *binary_args(python), "--report", "-", *requirements],
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"gpu-wheelhouse: pip could not resolve {requirements} for Python {python}:\n"
                         f"{proc.stderr[-2000:]}")
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
            for item in json.loads(proc.stdout)["install"]}


def deepspeed_requirements(version: str) -> list[str]:
    """deepspeed's own requirements, read from the installed distribution of the same version."""
    import importlib.metadata

    if importlib.metadata.version("deepspeed") != version:
        raise SystemExit(f"gpu-wheelhouse: deepspeed {version} is pinned; this environment has "
                         f"{importlib.metadata.version('deepspeed')} (run it from make's .venv)")
    return [r for r in importlib.metadata.requires("deepspeed") or () if "extra ==" not in r]


def build(out: Path, pythons: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    requirements = pinned(NEEDED)
    deepspeed = next(r for r in requirements if r.startswith("deepspeed"))
    others = [r for r in requirements if r != deepspeed] + deepspeed_requirements(deepspeed.split("==")[1])
    carried: dict[str, str] = {}
    for python in pythons:
        versions = {name: version for name, version in resolve(others, python).items() if not HELD.match(name)}
        carried.update(versions)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *binary_args(python),
                        "--dest", str(out), *(f"{n}=={v}" for n, v in sorted(versions.items()))], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), deepspeed], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    carried["deepspeed"] = deepspeed.split("==")[1]
    size = sum(w.stat().st_size for w in out.glob("*.whl"))
    manifest = {"pythons": pythons, "packages": dict(sorted(carried.items())), "bytes": size,
                "wheels": sorted(w.name for w in out.glob("*.whl"))}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if size > LIMIT_BYTES:
        raise SystemExit(f"gpu-wheelhouse: {size / 2**20:.1f} MiB in {out}, over the {LIMIT_BYTES / 2**20:.0f} MiB "
                         "the device tool carries with the tree")
    return manifest


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="make gpu-wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / ".wheelhouse"))
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser.add_argument("--python", nargs="+", default=sorted({"3.12", here}), help="CPython versions to fetch for")
    args = parser.parse_args(argv)
    manifest = build(Path(args.out), args.python)
    print(f"gpu-wheelhouse: {len(manifest['wheels'])} wheels, {manifest['bytes'] / 2**20:.1f} MiB in {args.out} "
          f"(Python {', '.join(args.python)}): {', '.join(manifest['packages'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
