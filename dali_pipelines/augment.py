"""DALI graph helpers: encoded image bytes -> CLIP-normalised CHW pixels. Used inside a pipeline only.

The same graph runs on CPU (``decoder_device="cpu"``) and on GPU (``"mixed"``: nvJPEG / nvImageCodec
decode on the device, everything after it on the GPU). Semantics follow ``bmc_fast.data.pil_loader``:

- train: RandomResizedCrop(image_size, scale (0.9, 1.0), ratio (3/4, 4/3)), fused into the decoder so
  only the crop is decoded; cubic resize with antialiasing; no flip unless ``flip`` (captions state
  laterality); CLIP mean/std.
- eval: resize the shorter side to ``image_size`` (cubic, antialiased), centre crop, CLIP mean/std.

EXIF orientation is ignored (``adjust_orientation=False``), as PIL, torchvision and open_clip ignore it.
"""
from __future__ import annotations

from bmc_fast.data.transforms import CLIP_MEAN, CLIP_STD, TRAIN_RATIO, TRAIN_SCALE


def shorter_side_size(encoded, image_size: int):
    """(height, width) with the shorter side at ``image_size``, the longer truncated as torchvision's
    ``Resize(int)`` does (DALI's own ``resize_shorter`` rounds, which shifts the centre crop a pixel)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    # (H, W, C) of the encoded image as stored (EXIF orientation ignored, as by the decoders here)
    shape = fn.cast(fn.peek_image_shape(encoded, adjust_orientation=False), dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    shorter = dmath.min(height, width)
    return dmath.floor(image_size * height / shorter), dmath.floor(image_size * width / shorter)


def centre_crop_pos(length, crop: int):
    """Relative crop position whose anchor is torchvision's ``int(round((length - crop) / 2))``.

    Python's round sends halves to the even integer; DALI would round them up, a pixel apart.
    """
    import nvidia.dali.math as dmath

    slack = length - crop  # >= 0
    half = dmath.floor(slack / 2)
    odd_slack, odd_half = slack - 2 * half, half - 2 * dmath.floor(half / 2)
    return (half + odd_slack * odd_half) / dmath.max(slack, 1.0)


def decode_whole(encoded, *, decoder_device: str):
    """The whole image, HWC uint8 RGB, as stored (EXIF orientation ignored)."""
    from nvidia.dali import fn, types

    return fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB, adjust_orientation=False)


def decode_train_crop(encoded, *, decoder_device: str, seed: int = -1):
    """RandomResizedCrop's random window, fused into the decoder (only the crop is decoded): HWC uint8 RGB."""
    from nvidia.dali import fn, types

    return fn.decoders.image_random_crop(encoded, device=decoder_device, output_type=types.RGB,
                                         random_area=list(TRAIN_SCALE), random_aspect_ratio=list(TRAIN_RATIO),
                                         num_attempts=10, seed=seed, adjust_orientation=False)


def decode_window(encoded, anchor, shape, *, decoder_device: str):
    """The window at ``anchor`` (x, y) of ``shape`` (width, height), in pixels, fused into the decoder: HWC uint8
    RGB. The stream reader's twin of ``decode_train_crop``: the window was drawn on the host."""
    from nvidia.dali import fn, types

    return fn.decoders.image_slice(encoded, anchor, shape, device=decoder_device, output_type=types.RGB,
                                   normalized_anchor=False, normalized_shape=False, axis_names="WH",
                                   adjust_orientation=False)


def resize_cubic(images, *, width, height):
    """Antialiased bicubic resize to (height, width), as torchvision's BICUBIC with ``antialias=True``."""
    from nvidia.dali import fn, types

    return fn.resize(images, resize_x=width, resize_y=height, interp_type=types.INTERP_CUBIC, antialias=True)


def clip_augment(encoded, *, image_size: int, train: bool, decoder_device: str, flip: bool = False,
                 half: bool = False, seed: int = -1, window=None):
    """``encoded``: DALI node of image bytes -> (3, image_size, image_size) float (fp16 with ``half``).
    ``window``: (anchor, shape) nodes of each image's train crop, drawn by the caller instead of by the decoder."""
    from nvidia.dali import fn, types

    if train:
        images = (decode_train_crop(encoded, decoder_device=decoder_device, seed=seed) if window is None else
                  decode_window(encoded, *window, decoder_device=decoder_device))
        images = resize_cubic(images, width=image_size, height=image_size)
        crop_pos = (0.5, 0.5)  # already image_size square: the crop is the whole image
    else:
        images = decode_whole(encoded, decoder_device=decoder_device)
        height, width = shorter_side_size(encoded, image_size)
        images = resize_cubic(images, width=width, height=height)
        crop_pos = (centre_crop_pos(height, image_size), centre_crop_pos(width, image_size))
    mirror = fn.random.coin_flip(probability=0.5, seed=seed) if (train and flip) else 0
    return fn.crop_mirror_normalize(
        images, crop=(image_size, image_size), crop_pos_x=crop_pos[1], crop_pos_y=crop_pos[0], mirror=mirror,
        mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD], output_layout="CHW",
        dtype=types.FLOAT16 if half else types.FLOAT)
