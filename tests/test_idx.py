"""IDX decoding and checks: gzip handling, headers, shapes, label range and counts, with exact messages."""

import gzip

import numpy as np
import pytest

from synthetic import idx_bytes, make_split
from tasks.errors import PipelineError
from tasks.idx import (
    Checks,
    check_idx,
    check_images,
    check_labels,
    check_split,
    decode_payload,
    describe,
    read_payload,
)

IMAGES, LABELS = make_split(30, seed=3)
IMAGES_IDX, LABELS_IDX = idx_bytes(IMAGES), idx_bytes(LABELS)


def fail_message(checks: Checks) -> str:
    with pytest.raises(PipelineError) as info:
        checks.raise_first()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- decode_payload -----------------------------------------------------------------------------------------------


def test_plain_idx_passes_through_unchanged():
    assert decode_payload(IMAGES_IDX, "x") == IMAGES_IDX


def test_gzip_is_decompressed():
    assert decode_payload(gzip.compress(IMAGES_IDX), "x.gz") == IMAGES_IDX


def test_concatenated_gzip_members_are_all_decoded():
    data = gzip.compress(IMAGES_IDX[:100]) + gzip.compress(IMAGES_IDX[100:])
    assert decode_payload(data, "x.gz") == IMAGES_IDX


@pytest.mark.parametrize("keep", [5, 20, 0.5])
def test_truncated_gzip_names_file_and_check(keep):
    whole = gzip.compress(IMAGES_IDX)
    data = whole[: int(len(whole) * keep) if isinstance(keep, float) else keep]
    with pytest.raises(PipelineError) as info:
        decode_payload(data, "train-images-idx3-ubyte.gz")
    assert str(info.value) == (
        f"train-images-idx3-ubyte.gz: gzip: expected a complete gzip stream, found it truncated after {len(data)} bytes"
    )


def test_gzip_with_a_bad_checksum_is_corrupt():
    data = bytearray(gzip.compress(LABELS_IDX))
    data[-8] ^= 0xFF  # the CRC-32 of the trailer
    with pytest.raises(PipelineError, match=r"^l\.gz: gzip: expected a valid gzip stream, found corrupt data \(.+\)$"):
        decode_payload(bytes(data), "l.gz")


@pytest.mark.parametrize("page", [b"<!DOCTYPE html><html><body>Not Found</body></html>", b"\r\n  <html>moved</html>", b"<?xml version='1.0'?><Error/>"])
def test_html_or_xml_where_idx_belongs_is_named(page):
    with pytest.raises(PipelineError) as info:
        decode_payload(page, "t10k-images-idx3-ubyte.gz")
    assert str(info.value) == "t10k-images-idx3-ubyte.gz: format: expected a gzip or IDX file, found an HTML/XML document"


def test_payload_size_is_bounded_for_plain_and_gzip():
    assert decode_payload(IMAGES_IDX, "x", limit=len(IMAGES_IDX)) == IMAGES_IDX
    assert decode_payload(gzip.compress(IMAGES_IDX), "x.gz", limit=len(IMAGES_IDX)) == IMAGES_IDX
    with pytest.raises(PipelineError, match=rf"^x: size: expected a payload of at most 100 bytes, found {len(IMAGES_IDX)}$"):
        decode_payload(IMAGES_IDX, "x", limit=100)
    # A gzip bomb stops at the limit instead of inflating everything.
    bomb = gzip.compress(bytes(10 << 20))
    with pytest.raises(PipelineError, match=r"^x\.gz: size: expected a payload of at most 1000 bytes, found more$"):
        decode_payload(bomb, "x.gz", limit=1000)


def test_read_payload_names_the_file_on_disk(tmp_path):
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(LABELS_IDX))
    assert read_payload(good) == LABELS_IDX
    bad = tmp_path / "bad-labels.gz"
    bad.write_bytes(gzip.compress(LABELS_IDX)[:-10])
    with pytest.raises(PipelineError, match=r"^bad-labels\.gz: gzip: "):
        read_payload(bad)


# --- checks on valid data -------------------------------------------------------------------------------------------


def test_valid_split_returns_the_arrays_and_passes_every_check():
    checks = Checks()
    result = check_split(IMAGES_IDX, LABELS_IDX, "i", "l", checks, expected_count=30)
    assert result is not None
    images, labels = result
    assert images.dtype == np.uint8 and images.shape == (30, 28, 28)
    assert np.array_equal(images, IMAGES) and np.array_equal(labels, LABELS)
    assert checks.failures() == []
    names = [(c["file"], c["check"]) for c in checks.items]
    for expected in [("i", "magic number"), ("i", "type code"), ("i", "payload size"), ("i", "image size"), ("i", "count"),
                     ("l", "magic number"), ("l", "label range"), ("l", "count"), ("l", "count match")]:
        assert expected in names
    checks.raise_first()  # nothing to raise


def test_checks_record_expected_and_found_values():
    checks = Checks()
    check_labels(LABELS_IDX, "l", checks)
    by_name = {c["check"]: c for c in checks.items}
    assert by_name["magic number"]["expected"] == "0x00000801" == by_name["magic number"]["found"]
    assert by_name["label range"]["found"] == f"{LABELS.min()}..{LABELS.max()}"
    assert describe(by_name["label range"]) == f"l: label range: expected 0..9, found {LABELS.min()}..{LABELS.max()}"


def test_an_empty_label_file_is_structurally_valid():
    checks = Checks()
    labels = check_labels(idx_bytes(np.zeros(0, np.uint8)), "l", checks)
    assert labels is not None and labels.shape == (0,)
    assert checks.failures() == []


# --- checks on malformed data: one failure each, with file, check, expected and found -------------------------------


def test_wrong_magic_number():
    checks = Checks()
    assert check_images(b"\x12\x34\x56\x78" + IMAGES_IDX[4:], "train-images-idx3-ubyte", checks) is None
    assert fail_message(checks) == "train-images-idx3-ubyte: magic number: expected 0x00000803, found 0x12345678"


def test_labels_file_given_as_images_is_a_wrong_magic_number():
    checks = Checks()
    assert check_images(LABELS_IDX, "train-images-idx3-ubyte", checks) is None
    assert fail_message(checks) == "train-images-idx3-ubyte: magic number: expected 0x00000803, found 0x00000801"


def test_wrong_type_code():
    checks = Checks()
    assert check_images(b"\x00\x00\x0d\x03" + IMAGES_IDX[4:], "i", checks) is None
    assert fail_message(checks) == "i: type code: expected 0x08 (unsigned byte), found 0x0d"


def test_short_header():
    checks = Checks()
    assert check_images(IMAGES_IDX[:10], "i", checks) is None
    assert fail_message(checks) == "i: header: expected >= 16 bytes, found 10 bytes"


def test_header_that_claims_more_data_than_present():
    checks = Checks()
    assert check_images(IMAGES_IDX[:-1], "i", checks) is None
    assert fail_message(checks) == f"i: payload size: expected {30 * 784} bytes for shape (30, 28, 28), found {30 * 784 - 1} bytes"


def test_images_of_28x27():
    checks = Checks()
    assert check_images(idx_bytes(IMAGES[:, :, :27]), "train-images-idx3-ubyte", checks) is None
    assert fail_message(checks) == "train-images-idx3-ubyte: image size: expected 28x28, found 28x27"


def test_a_label_of_10():
    labels = LABELS.copy()
    labels[7] = 10
    checks = Checks()
    assert check_labels(idx_bytes(labels), "train-labels-idx1-ubyte", checks) is None
    assert fail_message(checks) == f"train-labels-idx1-ubyte: label range: expected 0..9, found {labels.min()}..10"


@pytest.mark.parametrize("num_classes", [3, 9])
def test_labels_beyond_num_classes(num_classes):
    checks = Checks()
    assert check_labels(LABELS_IDX, "train-labels-idx1-ubyte", checks, num_classes=num_classes) is None
    assert fail_message(checks) == (
        f"train-labels-idx1-ubyte: label range: expected 0..{num_classes - 1}, found {LABELS.min()}..{LABELS.max()}"
    )


def test_labels_within_num_classes_pass():
    labels = (np.arange(30) % 3).astype(np.uint8)
    checks = Checks()
    assert check_split(IMAGES_IDX, idx_bytes(labels), "i", "l", checks, num_classes=3) is not None
    assert [c["expected"] for c in checks.items if c["check"] == "label range"] == ["0..2"]
    assert checks.failures() == []


def test_num_classes_none_checks_the_structure_only():
    labels = np.full(30, 255, np.uint8)
    checks = Checks()
    assert check_split(IMAGES_IDX, idx_bytes(labels), "i", "l", checks, num_classes=None) is not None
    assert "label range" not in [c["check"] for c in checks.items]
    assert checks.failures() == []


def test_fewer_labels_than_images():
    checks = Checks()
    assert check_split(IMAGES_IDX, idx_bytes(LABELS[:-1]), "t10k-images", "t10k-labels", checks) is None
    assert [c["check"] for c in checks.failures()] == ["count match"]
    assert fail_message(checks) == "t10k-labels: count match: expected 30 labels (one per image), found 29"


def test_unexpected_count():
    checks = Checks()
    assert check_split(IMAGES_IDX, LABELS_IDX, "i", "l", checks, expected_count=60000) is None
    assert fail_message(checks) == "i: count: expected 60000, found 30"
    assert ("l", "count") in [(c["file"], c["check"]) for c in checks.failures()]


def test_the_first_failure_is_reported_when_several_fail():
    checks = Checks()
    check_split(b"\xff" * 40, idx_bytes(np.full(30, 11, np.uint8)), "i", "l", checks)
    assert [c["file"] for c in checks.failures()] == ["i", "l"]
    assert fail_message(checks).startswith("i: magic number: ")


def test_check_idx_with_the_labels_magic():
    checks = Checks()
    array = check_idx(LABELS_IDX, "l", 0x00000801, checks)
    assert array is not None and np.array_equal(array, LABELS)
