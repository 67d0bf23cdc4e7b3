"""Image transforms of both loaders: open_clip's CLIP augmentation, and the constants DALI's graph shares.

Train: RandomResizedCrop(image_size, scale ``TRAIN_SCALE``, ratio ``TRAIN_RATIO``), bicubic, no flip
(captions state laterality); eval: shorter side to ``image_size`` (bicubic) and centre crop; then CLIP
mean/std. ``image_transform`` is the torchvision twin of ``bmc_fast.dali_pipelines.augment``; this
module imports torchvision only when a transform is built.
"""
from __future__ import annotations

from collections.abc import Callable

from bmc_fast.data.samples import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.9, 1.0)  # open_clip's RandomResizedCrop area range
TRAIN_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range


def image_transform(image_size: int, train: bool) -> Callable:
    """open_clip's transform: RGB, RandomResizedCrop or resize + centre crop, CLIP normalise."""
    from torchvision import transforms as T

    if train:
        resize = [T.RandomResizedCrop(image_size, scale=TRAIN_SCALE, ratio=TRAIN_RATIO,
                                      interpolation=T.InterpolationMode.BICUBIC)]
    else:
        resize = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose([to_rgb, *resize, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
