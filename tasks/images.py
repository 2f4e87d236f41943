"""Image files as the model sees them: 28x28 uint8, grayscale, light digit on dark.

One function brings every image to that form, for training data (class folders, manifests, `.npz` arrays of another
size) and for the images that `predict` scores alike: what training sees and what scoring sees cannot drift apart.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.errors import PipelineError
from tasks.idx import IMAGE_SHAPE

Invert = Literal["auto", "yes", "no"]
# Refused from the header, before decoding: 40 megapixels is a large photo; a decoded bomb would take gigabytes.
MAX_IMAGE_PIXELS = 40_000_000
# A file of one image larger than this is refused unread (a 28x28 PNG is about 300 bytes; a large photo a few MB).
MAX_IMAGE_FILE_BYTES = 64 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# A dark-on-light image has a light border: MNIST's digits sit on black, their border is 0.
LIGHT_BORDER = 127


class Changes(NamedTuple):
    """What bringing one image to the model's form changed: its mode (colour, palette, 16 bit), size, polarity."""

    converted: bool
    resized: bool
    inverted: bool


def read_image(path: Path | str, invert: Invert = "auto") -> np.ndarray:
    """Return one image file as the model sees it: 28x28 uint8, grayscale, light digit on dark (see `load_image`)."""
    return load_image(path, invert)[0]


def load_image(path: Path | str, invert: Invert = "auto") -> tuple[np.ndarray, Changes]:
    """Return one image file as the model sees it, and what was changed to get there.

    Any size and mode: colour is converted to grayscale, a dark-on-light image (light border) is inverted unless
    `invert` says otherwise, a non-square image is padded to a square with black (the background once light on dark),
    then it is resized to 28x28 (a 28x28 image keeps its pixels as they are). The size in the header is checked
    before anything is decoded.
    """
    try:
        with open(path, "rb") as fh, Image.open(fh) as image:
            if (size := os.fstat(fh.fileno()).st_size) > MAX_IMAGE_FILE_BYTES:
                raise PipelineError(f"{path}: size: expected at most {MAX_IMAGE_FILE_BYTES} bytes, found {size}")
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS or width < 1 or height < 1:
                raise PipelineError(f"{path}: image size: expected at most {MAX_IMAGE_PIXELS:,} pixels, found "
                                    f"{width}x{height} in its header; refused before decoding")
            converted = image.mode != "L"
            if image.format == "JPEG":
                image.draft("L", (max(28, width // 8), max(28, height // 8)))  # decode a large JPEG at reduced size
            if image.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte (convert("L") would clip)
                gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            else:
                gray = np.asarray(image.convert("L") if converted else image)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours: raised by open()
        raise PipelineError(f"{path}: image size: expected at most {MAX_IMAGE_PIXELS:,} pixels, found more in its "
                            f"header ({exc}); refused before decoding") from None
    except UnidentifiedImageError:
        raise PipelineError(f"{path}: format: expected an image file ({', '.join(IMAGE_SUFFIXES)}), an IDX or a "
                            "parquet file, found none of these") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for truncated or corrupt data
        raise PipelineError(f"{path}: image: expected a complete, valid image, found corrupt or truncated data "
                            f"({exc})") from None
    image, resized, inverted = to_model_form(gray, invert)
    return image, Changes(converted, resized, inverted)


def to_model_form(gray: np.ndarray, invert: Invert = "auto") -> tuple[np.ndarray, bool, bool]:
    """Return a 2-D uint8 grayscale image light on dark (inverted as `invert` says) and 28x28; and whether it was
    resized, and inverted."""
    inverted = dark_on_light(gray) if invert == "auto" else invert == "yes"
    if inverted:
        gray = 255 - gray
    return to_model_size(gray), gray.shape != IMAGE_SHAPE, inverted


def dark_on_light(gray: np.ndarray) -> bool:
    """Return whether a grayscale image looks like ink on paper: its border is light on average."""
    border = _border(gray.shape)
    return int(gray.ravel()[border].sum()) > LIGHT_BORDER * len(border)


@cache
def _border(shape: tuple[int, int]) -> np.ndarray:
    """Return the flat indexes of the border pixels of an image of this shape (each once)."""
    mask = np.zeros(shape, dtype=bool)
    mask[[0, -1], :] = mask[:, [0, -1]] = True
    return np.flatnonzero(mask)


def to_model_size(gray: np.ndarray) -> np.ndarray:
    """Return a light-on-dark grayscale image padded to a square (with black) and resized to 28x28."""
    if gray.shape == IMAGE_SHAPE:
        return gray
    height, width = gray.shape
    side = max(height, width)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = gray
    return np.asarray(Image.fromarray(square).resize(IMAGE_SHAPE[::-1], Image.Resampling.LANCZOS, reducing_gap=3.0))
