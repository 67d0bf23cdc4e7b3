"""bmc-fast: long-context biomedical CLIP training (BMC-LongCLIP) on DeepSpeed.

Import names live under ``bmc_fast``: the folders ``kernels/`` and ``dali_pipelines/`` install as
``bmc_fast.kernels`` and ``bmc_fast.dali_pipelines``. ``kernels/`` has no ``__init__.py`` (Hugging Face's
``kernels`` package, which transformers >= 5.25 imports, owns that top-level name, and ``python -m`` from the
repository root puts the root first on ``sys.path``): ``bmc_fast/_kernels/__init__.py`` is the package's
``__init__``, and the wheel gets the folder's modules beside it.

    pip install .                  # the library: fused losses, model, load_model of an export
    pip install '.[train]'         # + the trainer (DeepSpeed, webdataset, torchdata, DALI)
    pip install '.[train,eval]'    # + evaluation's plots
    pip install '.[gpu]'           # a GPU node: the trainer + FlashAttention-4, from wheels
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# Lower bounds are the versions CI pins (requirements/cpu-pins.txt) and tests; older releases are untested.
INSTALL_REQUIRES = [
    "torch>=2.14",
    "torchvision>=0.29",  # the eval transform load_model returns
    # ModernBERT's layer_types, AttentionInterface, set_attn_implementation (text_tower.py); 5.25 requires HF
    # `kernels`, whose top-level name the repository's kernels/ folder must never shadow (tests/test_package.py).
    "transformers>=5.25",
    "tokenizers>=0.23",
    "ftfy",  # captions cleaned as open_clip's HFTokenizer cleans them (bmc_fast/data/text_tokenizer.py)
    "safetensors",
    "pillow",
    "numpy",
    "packaging",
]

# The trainer and what reads its runs (export and evaluation of a run read DeepSpeed checkpoints).
# DALI: the wheel for CUDA 13; take nvidia-dali-cuda120 instead for CUDA 12 (its CPU pipelines run on either).
TRAIN = ["deepspeed>=0.19", "webdataset>=1.0", "torchdata>=0.11", "braceexpand", "tqdm", "tensorboard", "filelock",
         "nvidia-dali-cuda130>=2.4"]

EXTRAS_REQUIRE = {
    "train": TRAIN,
    "eval": ["matplotlib", "open-clip-torch>=3.3"],  # confusion plots; open_clip models in zero-shot
    "test": ["pytest>=8", "pytest-xdist>=3", "open-clip-torch>=3.3", "ruff", "wandb>=0.31"],
    "wandb": ["wandb>=0.31"],  # --report-to wandb
    "bench": ["matplotlib", "open-clip-torch>=3.3"],
    # A GPU node, from wheels alone (deepspeed's pure-Python source archive, built with DS_BUILD_OPS=0, is the
    # one exception): the trainer's stack and FlashAttention-4, which torch switches to on compute capability
    # 9.x / 10.x (attn_backend=fa4). torch's own FlashAttention-2 needs no package (attn_backend=torch_flash).
    "gpu": [*TRAIN, "flash-attn-4[cu13]>=4.0.0b40"],
    # Transformer Engine compiles transformer_engine_torch against the installed torch and CUDA (toolkit and
    # cuDNN headers, tens of minutes): pip install --no-build-isolation '.[te]', or use the NGC PyTorch
    # container, which ships it prebuilt (Dockerfile). flash-attn 2 (attn_backend=flash) is a source build too
    # and stays out of every extra. NVIDIA apex is never listed: the PyPI `apex` is an unrelated package.
    "te": ["transformer-engine[pytorch]>=2.0"],
}


class BuildPyWithKernels(build_py):
    """Put the modules of the top-level ``kernels/`` folder into ``bmc_fast/kernels/`` of the wheel."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        if package == "bmc_fast.kernels":
            modules += [(package, path.stem, str(path)) for path in sorted(Path("kernels").glob("*.py"))]
        return modules


setup(
    name="bmc-fast",
    version="0.1.0",
    description="NVIDIA-optimized training stack for long-context biomedical CLIP (BMC-LongCLIP)",
    python_requires=">=3.10",
    packages=[
        "bmc_fast",
        "bmc_fast.checkpoint",
        "bmc_fast.data",
        "bmc_fast.eval",
        "bmc_fast.model",
        "bmc_fast.trainer",
        "bmc_fast.kernels",
        "bmc_fast.dali_pipelines",
    ],
    package_dir={
        "bmc_fast": "bmc_fast",
        "bmc_fast.kernels": "bmc_fast/_kernels",
        "bmc_fast.dali_pipelines": "dali_pipelines",
    },
    package_data={"bmc_fast.model": ["presets/*.json"], "bmc_fast.data": ["*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    cmdclass={"build_py": BuildPyWithKernels},
)
