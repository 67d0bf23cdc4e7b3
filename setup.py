"""bmc-fast: long-context biomedical CLIP training (BMC-LongCLIP) on DeepSpeed.

Import names live under ``bmc_fast``: the folders ``kernels/`` and ``dali_pipelines/`` install as
``bmc_fast.kernels`` and ``bmc_fast.dali_pipelines``, because a top-level ``kernels`` module would
collide with Hugging Face's ``kernels`` package.
"""
from setuptools import setup

# What CI pins lives in requirements/cpu-pins.txt; these are the compatible ranges.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "deepspeed>=0.16",
    # The tested release: older ones lack ModernBERT's layer_types, AttentionInterface,
    # set_attn_implementation or activation_checkpointing_enable, all used by text_tower.py.
    "transformers>=5.23",
    "tokenizers>=0.21",
    "webdataset>=0.2.86",
    "torchdata>=0.11",  # StatefulDataLoader: the PIL loader's exact resume
    "braceexpand",
    "pillow",
    "numpy",
    "torchvision",
    "tqdm",
    "tensorboard",
    "filelock",
    "packaging",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "pytest-xdist>=3", "open-clip-torch>=2.24", "ruff"],
    "bench": ["matplotlib", "open-clip-torch>=2.24"],
    # GPU-only accelerators, not installable on the CPU machines this project is developed on.
    # NVIDIA apex is never listed: the PyPI `apex` is an unrelated package (build NVIDIA apex from source).
    # DALI: pick the wheel matching the CUDA major version (nvidia-dali-cuda120 for CUDA 12).
    "gpu": ["transformer-engine[pytorch]", "flash-attn>=2.6", "nvidia-dali-cuda130", "triton"],
}

setup(
    name="bmc-fast",
    version="0.1.0",
    description="NVIDIA-optimized training stack for long-context biomedical CLIP (BMC-LongCLIP)",
    python_requires=">=3.10",
    packages=[
        "bmc_fast",
        "bmc_fast.data",
        "bmc_fast.eval",
        "bmc_fast.trainer",
        "bmc_fast.kernels",
        "bmc_fast.dali_pipelines",
    ],
    package_dir={
        "bmc_fast": "bmc_fast",
        "bmc_fast.kernels": "kernels",
        "bmc_fast.dali_pipelines": "dali_pipelines",
    },
    package_data={"bmc_fast": ["model_configs/*.json"], "bmc_fast.data": ["*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
