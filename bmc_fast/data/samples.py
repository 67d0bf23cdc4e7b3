"""One image–caption sample: every image kind to RGB, every broken sample to a named skip kind.

Biomedical shards hold grayscale, palette, RGBA/LA and 16-bit PNGs, CMYK JPEGs, thumbnails and 4K+
figures; all of them decode to 3-channel 8-bit RGB here exactly as DALI's ``fn.decoders.image``
(``output_type=RGB``) decodes them (16-bit scaled by 1/257, alpha dropped). A sample that cannot
become one (image, caption) pair is skipped with one of ``SKIP_KINDS``; the index scan
(``bmc_fast.data.index``) and the webdataset + PIL loader both classify through ``check_sample``,
after ``bmc_fast.data.tar_samples`` grouped the tar's members.
"""
from __future__ import annotations

import io

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# What those members may hold: the formats DALI's decoder reads behind these extensions. PIL opens
# ~30 more (GIF, ICO, TGA, ...); a GIF named .png would pass PIL and stop a DALI run.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
CAPTION_EXTENSION = "txt"
SKIP_KINDS = (
    "missing_image",  # no image member
    "two_images",  # more than one image member: which one the caption describes is unknown
    "duplicate_member",  # the same member name twice in one sample: which copy is meant is unknown
    "space_in_name",  # whitespace in a member name: DALI's index format (space-separated) cannot hold it
    "empty_file",  # a zero-byte image member
    "not_an_image",  # bytes that are not JPEG, PNG or WebP
    "truncated_image",  # a recognised image whose data ends early or is corrupt
    "too_large_image",  # over PIL's decompression-bomb limit (2 × Image.MAX_IMAGE_PIXELS)
    "missing_caption",  # no .txt member
    "invalid_utf8",  # caption bytes that are not UTF-8
    "empty_caption",  # caption empty or whitespace only
)


class SampleError(Exception):
    """A sample that must be skipped; ``kind`` is one of ``SKIP_KINDS``."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def to_rgb(image):
    """Any PIL mode -> 8-bit RGB: 16/32-bit integer gray scaled to 0–255 (DALI's rule), alpha dropped."""
    from PIL import Image

    if image.mode.startswith("I"):  # "I;16", "I;16B", "I" (16-bit PNG) -> 8-bit, rounding as DALI does
        gray = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray(((gray + 128) // 257).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(data: bytes):
    """The lazily opened PIL image of ``data`` (its header read, no pixel decoded), or ``SampleError`` (empty_file,
    not_an_image, too_large_image)."""
    from PIL import Image

    if not data:
        raise SampleError("empty_file")
    # Decoder plugins raise many types on malformed files (OSError, SyntaxError, struct.error, ...);
    # any of them means this one sample is unusable, never that the run must stop.
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise SampleError("too_large_image", str(error)) from None
    except Exception as error:
        raise SampleError("not_an_image", f"{type(error).__name__}: {error}") from None


def decode_image(data: bytes):
    """Image bytes -> RGB PIL image, or ``SampleError`` (empty_file, not_an_image, truncated_image, too_large_image)."""
    from PIL import Image

    image = open_image(data)
    try:
        if image.format == "PNG":  # load() skips chunk checksums; libpng (DALI) stops on a bad one
            Image.open(io.BytesIO(data), formats=IMAGE_FORMATS).verify()
        image.load()  # decodes every byte: truncation and corrupt data surface here
    except Image.DecompressionBombError as error:
        raise SampleError("too_large_image", str(error)) from None
    except Exception as error:
        raise SampleError("truncated_image", f"{type(error).__name__}: {error}") from None
    return to_rgb(image)


def check_encoded(sample: dict) -> tuple[bytes, str, tuple[int, int]]:
    """(image bytes, caption, (width, height)) of a sample whose image another decoder (DALI's) will decode, or
    ``SampleError``. Cheaper than ``check_sample``, which decodes every pixel: the names, the caption, the image's
    format and size from its header, and that its data reaches the format's end marker (a cut-off file, the common
    corruption). Data corrupt in the middle of the file is not found here (``python -m bmc_fast.data.index`` finds
    it)."""
    from PIL import Image

    check_names([member["fname"] for member in sample["__members__"]], repeated=bool(sample.get("__duplicate__")))
    data, caption = split_sample({k: v for k, v in sample.items() if not k.startswith("__")})
    with open_image(data) as image:
        form, size = image.format, image.size
    if size[0] * size[1] > 2 * Image.MAX_IMAGE_PIXELS:
        raise SampleError("too_large_image", f"{size[0]}x{size[1]}")
    ends = {"JPEG": lambda: b"\xff\xd9" in data[-1024:], "PNG": lambda: b"IEND" in data[-16:],
            "WEBP": lambda: int.from_bytes(data[4:8], "little") + 8 <= len(data)}
    if not ends[form]():
        raise SampleError("truncated_image", f"{form} data ends before its end marker")
    return data, caption, size


def check_names(names: list[str], repeated: bool) -> None:
    """``SampleError`` for a sample whose member names (or key) hold whitespace, which DALI's
    space-separated index cannot list, or that repeats a member (``repeated``); both loaders use it."""
    if any(ch.isspace() for name in names for ch in name):
        raise SampleError("space_in_name", ", ".join(map(repr, names)))
    if repeated:
        raise SampleError("duplicate_member", ", ".join(names))


def split_sample(sample: dict) -> tuple[bytes, str]:
    """A WebDataset sample dict (extension -> bytes) -> (image bytes, stripped caption), or ``SampleError``.

    Only the members' presence and the caption are checked here; ``decode_image`` checks the image.
    """
    images = [ext for ext in sample if ext.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise SampleError("missing_image")
    if len(images) > 1:
        raise SampleError("two_images", ",".join(images))
    if CAPTION_EXTENSION not in sample:
        raise SampleError("missing_caption")
    try:
        caption = sample[CAPTION_EXTENSION].decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise SampleError("invalid_utf8", str(error)) from None
    if not caption:
        raise SampleError("empty_caption")
    return sample[images[0]], caption


def check_sample(sample: dict):
    """(RGB PIL image, caption) of a good sample, or ``SampleError`` naming its skip kind.

    ``sample``: as ``bmc_fast.data.tar_samples`` groups it (``__key__``, ``__members__``, extension ->
    bytes); the member names are checked, then the image and the caption.
    """
    check_names([member["fname"] for member in sample["__members__"]], repeated=bool(sample.get("__duplicate__")))
    data, caption = split_sample({k: v for k, v in sample.items() if not k.startswith("__")})
    return decode_image(data), caption
