"""Decode and check IDX files (the MNIST format) without trusting their headers."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import PipelineError

# The largest MNIST payload (train images) is 47,040,016 bytes; a payload far beyond is refused before it is inflated.
MAX_PAYLOAD_BYTES = 64 << 20
IMAGE_SHAPE = (28, 28)
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]  # values per image once flattened (784)
# The most images of a dataset read from image files or arrays, and so the largest payload of the raw artifact.
MAX_IMAGES = 1_000_000
RAW_PAYLOAD_BYTES = max(MAX_PAYLOAD_BYTES, 16 + MAX_IMAGES * PIXELS)  # 16: the header of an images file
NUM_CLASSES = 10
UBYTE = 0x08
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def decode_payload(data: bytes, name: str, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """Return the IDX payload of a file's bytes: gunzipped (bounded) if gzip, as is if plain IDX."""
    if data[:2] == b"\x1f\x8b":
        out = bytearray()
        rest = data
        while rest:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out += inflater.decompress(rest, limit + 1 - len(out))
            except zlib.error as exc:
                raise PipelineError(f"{name}: gzip: expected a valid gzip stream, found corrupt data ({exc})") from None
            if len(out) > limit:
                raise PipelineError(f"{name}: size: expected a payload of at most {limit} bytes, found more")
            if not inflater.eof:
                raise PipelineError(f"{name}: gzip: expected a complete gzip stream, found it truncated after {len(data)} bytes")
            rest = inflater.unused_data  # a further gzip member, if any
        return bytes(out)
    if data.lstrip()[:1] == b"<":
        raise PipelineError(f"{name}: format: expected a gzip or IDX file, found an HTML/XML document")
    if len(data) > limit:
        raise PipelineError(f"{name}: size: expected a payload of at most {limit} bytes, found {len(data)}")
    return data


def read_payload(path: Path) -> bytes:
    """Read a file of the raw artifact and return its IDX payload."""
    return decode_payload(path.read_bytes(), path.name, limit=RAW_PAYLOAD_BYTES)


def pixel_digests(images: np.ndarray) -> list[bytes]:
    """Return a 16-byte digest of each image's pixels: equal for identical images (duplicates, leakage)."""
    return [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]


def encode_idx(array: np.ndarray) -> bytes:
    """Return a uint8 array as an IDX payload: magic (type unsigned byte, its dimensions), big-endian sizes, data."""
    header = bytes([0, 0, UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


@dataclass
class Checks:
    """An ordered list of named checks, each with expected and found values."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def check(self, file: str, name: str, ok: bool, expected: Any, found: Any) -> bool:
        """Record one check and return whether it passed."""
        self.items.append({"file": file, "check": name, "passed": bool(ok), "expected": expected, "found": found})
        return bool(ok)

    def failures(self) -> list[dict[str, Any]]:
        """Return the failed checks in the order they were made."""
        return [item for item in self.items if not item["passed"]]

    def raise_first(self) -> None:
        """Raise a PipelineError describing the first failed check, if any."""
        failed = self.failures()
        if failed:
            raise PipelineError(describe(failed[0]))


def describe(item: dict[str, Any]) -> str:
    """Return the one-line message for a check: file, check, expected, found."""
    return f"{item['file']}: {item['check']}: expected {item['expected']}, found {item['found']}"


def header_size(ndim: int) -> int:
    """Return the bytes of an IDX header with `ndim` dimensions: magic, then one 32-bit size per dimension."""
    return 4 + 4 * ndim


def dims_of(header: bytes, ndim: int) -> tuple[int, ...]:
    """Return the sizes an IDX header declares (`header` holds at least `header_size(ndim)` bytes)."""
    return tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def idx_array(payload: bytes) -> np.ndarray:
    """Return a checked IDX payload (see `check_idx`) as uint8 data of the shape its header declares, without a copy."""
    ndim = payload[3]
    return np.frombuffer(payload, np.uint8, offset=header_size(ndim)).reshape(dims_of(payload, ndim))


def check_idx(payload: bytes, file: str, magic: int, checks: Checks) -> np.ndarray | None:
    """Check an IDX header against `magic` and the payload length; return the data as an array, or None."""
    ndim = magic & 0xFF
    size = header_size(ndim)
    if not checks.check(file, "header", len(payload) >= size, f">= {size} bytes", f"{len(payload)} bytes"):
        return None
    found = int.from_bytes(payload[:4], "big")
    if found != magic:
        if payload[:2] != b"\0\0" or payload[3] != ndim:
            checks.check(file, "magic number", False, f"0x{magic:08x}", f"0x{found:08x}")
        else:
            checks.check(file, "type code", False, f"0x{UBYTE:02x} (unsigned byte)", f"0x{payload[2]:02x}")
        return None
    checks.check(file, "magic number", True, f"0x{magic:08x}", f"0x{found:08x}")
    checks.check(file, "type code", True, f"0x{UBYTE:02x} (unsigned byte)", f"0x{payload[2]:02x}")
    dims = dims_of(payload, ndim)
    body = len(payload) - size
    # Compare the declared size with the bytes present before touching the data, so a lying header costs nothing.
    declared = int(np.prod(dims, dtype=object))
    if not checks.check(file, "payload size", declared == body, f"{declared} bytes for shape {dims}", f"{body} bytes"):
        return None
    return idx_array(payload)


def check_images(payload: bytes, file: str, checks: Checks, expected_count: int | None = None) -> np.ndarray | None:
    """Check an images file: magic, type, 28x28 size, count; return the images as uint8 (n, 28, 28)."""
    images = check_idx(payload, file, IMAGES_MAGIC, checks)
    if images is None:
        return None
    size = images.shape[1:]
    if not checks.check(file, "image size", size == IMAGE_SHAPE, "x".join(map(str, IMAGE_SHAPE)), "x".join(map(str, size))):
        return None
    if expected_count is not None and not checks.check(file, "count", len(images) == expected_count, expected_count, len(images)):
        return None
    checks.check(file, "dtype", images.dtype == np.uint8, "uint8", str(images.dtype))
    return images


def check_labels(
    payload: bytes, file: str, checks: Checks, expected_count: int | None = None, num_classes: int | None = NUM_CLASSES
) -> np.ndarray | None:
    """Check a labels file: magic, type, count, labels in 0..num_classes-1 (None: any byte); return them as uint8 (n,)."""
    labels = check_idx(payload, file, LABELS_MAGIC, checks)
    if labels is None:
        return None
    if expected_count is not None and not checks.check(file, "count", len(labels) == expected_count, expected_count, len(labels)):
        return None
    if num_classes is None:
        return labels
    low, high = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    if not checks.check(file, "label range", high < num_classes, f"0..{num_classes - 1}", f"{low}..{high}"):
        return None
    return labels


def check_split(
    images_payload: bytes,
    labels_payload: bytes,
    images_file: str,
    labels_file: str,
    checks: Checks,
    expected_count: int | None = None,
    num_classes: int | None = NUM_CLASSES,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Check one split (images + labels files) and that their counts agree; return both arrays, or None."""
    images = check_images(images_payload, images_file, checks, expected_count)
    labels = check_labels(labels_payload, labels_file, checks, expected_count, num_classes)
    if images is None or labels is None:
        return None
    if not checks.check(labels_file, "count match", len(labels) == len(images), f"{len(images)} labels (one per image)", len(labels)):
        return None
    return images, labels
