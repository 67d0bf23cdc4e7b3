# bmc-fast on NVIDIA's NGC PyTorch container, which ships torch, Transformer Engine, DALI and apex prebuilt
# against its CUDA: this image adds the rest of bmc-fast without replacing any of them.
#
#   docker build -t bmc-fast --build-arg NGC_TAG=<YY.MM>-py3 .
#   docker run --gpus all --ipc=host -it --rm -v $PWD/runs:/workspace/bmc-fast/runs bmc-fast make gpu-check
#
# NGC_TAG: a release whose PyTorch is 2.11 or newer (the NGC PyTorch release notes list each tag's versions);
# the build stops with the version it found otherwise. Not yet built here: no Docker or GPU on our machines.
ARG NGC_TAG=26.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

WORKDIR /workspace/bmc-fast
COPY . .

# The container's own builds stay: its accelerator distributions are pinned as constraints, so pip never swaps
# one (torch, torchvision, triton, Transformer Engine, DALI, flash-attn, apex). bmc-fast
# itself goes in without dependency resolution (its torch>=2.14 bound is CI's pin, not a runtime need), its
# dependencies by name. deepspeed installs from its pure-Python source archive without building any op.
RUN python -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('.')[:2]); \
sys.exit(0 if v >= (2, 11) else f'NGC_TAG: torch {torch.__version__} in this container, bmc-fast needs >= 2.11')" \
 && pip list --format=freeze | grep -iE \
      '^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer[-_]engine[-_a-z0-9]*|nvidia[-_]dali[-_a-z0-9]*|flash[-_]attn[-_0-9]*|apex)==' \
      > /tmp/container-constraints.txt \
 && DS_BUILD_OPS=0 PIP_CONSTRAINT=/tmp/container-constraints.txt pip install --no-cache-dir \
      "transformers>=5.25" "tokenizers>=0.23" ftfy safetensors "deepspeed>=0.19" "webdataset>=1.0" "torchdata>=0.11" \
      braceexpand tqdm tensorboard filelock matplotlib "open-clip-torch>=3.3" \
 && pip install --no-cache-dir --no-deps --no-build-isolation -e .

CMD ["bash"]
