"""The preprocess stage: exact float32 values, the parquet schema and metadata, and byte-identical reruns."""

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthetic import make_split, payloads, write_source
from tasks.download import download_files
from tasks.errors import PipelineError
from tasks.preprocess import (
    METADATA_KEY,
    PIXEL_COLUMNS,
    SCHEMA_VERSION,
    load_split,
    preprocess_files,
    read_metadata,
    to_table,
)
from tasks.validate import ValidateConfig, validate_files

SPLITS = {"train": make_split(200, 0), "test": make_split(50, 1)}  # what write_source() writes


def stage_inputs(root, files=None):
    digests = write_source(root / "src", files)
    raw = download_files(str(root / "src"), root / "raw", expected_sha256=digests)
    validation = validate_files(raw, root / "validation", ValidateConfig(train_count=None, test_count=None))
    return raw, validation, digests


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One preprocess run over the synthetic data, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("preprocess")
    raw, validation, digests = stage_inputs(root)
    ref = preprocess_files(raw, validation, root / "processed")
    return raw, validation, digests, ref


def scaled(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), 784).astype(np.float32) / 255


@pytest.mark.parametrize("split", ["train", "test"])
def test_rows_are_the_images_divided_by_255_as_float32(done, split):
    *_, ref = done
    images, labels = SPLITS[split]
    table = pq.read_table(ref.path(f"{split}.parquet"))
    pixels = np.column_stack([table.column(name).to_numpy() for name in PIXEL_COLUMNS])
    assert pixels.dtype == np.float32 and pixels.shape == (len(images), 784)
    assert np.array_equal(pixels, scaled(images))
    assert np.array_equal(table.column("label").to_numpy(), labels)
    assert pixels.min() >= 0.0 and pixels.max() == 1.0


@pytest.mark.parametrize("split", ["train", "test"])
def test_schema_is_784_float32_pixels_and_a_uint8_label_none_nullable(done, split):
    *_, ref = done
    schema = pq.read_schema(ref.path(f"{split}.parquet"))
    assert schema.names == [f"pixel_{i:03d}" for i in range(784)] + ["label"]
    assert schema.names[:3] == ["pixel_000", "pixel_001", "pixel_002"] and schema.names[783] == "pixel_783"
    assert all(schema.field(i).type == pa.float32() for i in range(784))
    assert schema.field("label").type == pa.uint8()
    assert not any(field.nullable for field in schema)
    parquet_meta = pq.ParquetFile(ref.path(f"{split}.parquet")).metadata
    assert parquet_meta.num_rows == len(SPLITS[split][1]) and parquet_meta.num_row_groups == 1


@pytest.mark.parametrize("split", ["train", "test"])
def test_metadata_names_the_schema_split_rows_and_sources(done, split):
    raw, validation, digests, ref = done
    meta = read_metadata(ref.path(f"{split}.parquet"))
    assert meta["schema_version"] == SCHEMA_VERSION == 1
    assert meta["split"] == split
    assert meta["rows"] == len(SPLITS[split][1])
    assert meta["source_sha256"] == digests
    assert meta["raw_digest"] == raw.digest
    assert meta["validation_digest"] == validation.digest


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_split_returns_what_was_written(done, split):
    *_, ref = done
    images, labels = SPLITS[split]
    x, y = load_split(ref.path(f"{split}.parquet"))
    assert x.dtype == np.float32 and x.shape == (len(images), 784)
    assert y.dtype == np.uint8 and y.shape == (len(labels),)
    assert np.array_equal(x, scaled(images))
    assert np.array_equal(y, labels)
    assert np.array_equal(x[7].reshape(28, 28), images[7].astype(np.float32) / 255)  # row-major 28x28


def test_reference_lists_both_files_and_row_counts(done):
    *_, ref = done
    assert ref.stage == "preprocess"
    assert sorted(ref.files) == ["test.parquet", "train.parquet"]
    assert ref.meta == {"rows": {"train": 200, "test": 50}, "schema_version": SCHEMA_VERSION}
    assert ref.problem() is None
    folder = ref.path("train.parquet").parent
    assert folder.name == ref.digest[:16]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_second_run_gives_the_same_digest_and_rewrites_nothing(tmp_path):
    raw, validation, _ = stage_inputs(tmp_path)
    first = preprocess_files(raw, validation, tmp_path / "processed")
    before = {name: (f.path, first.path(name).stat().st_ino, first.path(name).stat().st_mtime_ns) for name, f in first.files.items()}

    second = preprocess_files(raw, validation, tmp_path / "processed")

    assert second.digest == first.digest and second.files == first.files
    after = {name: (f.path, second.path(name).stat().st_ino, second.path(name).stat().st_mtime_ns) for name, f in second.files.items()}
    assert after == before
    assert sorted(p.name for p in (tmp_path / "processed").iterdir()) == [first.digest[:16]]


def test_output_bytes_depend_only_on_the_input(tmp_path):
    raw, validation, _ = stage_inputs(tmp_path)
    a = preprocess_files(raw, validation, tmp_path / "out-a")
    b = preprocess_files(raw, validation, tmp_path / "out-b")
    assert a.digest == b.digest
    for name in a.files:
        assert a.path(name).read_bytes() == b.path(name).read_bytes()


def test_other_input_gives_other_output(tmp_path):
    raw, validation, _ = stage_inputs(tmp_path / "a")
    other_raw, other_validation, _ = stage_inputs(tmp_path / "b", payloads(n_train=100, n_test=20, seed=3))
    a = preprocess_files(raw, validation, tmp_path / "processed")
    b = preprocess_files(other_raw, other_validation, tmp_path / "processed")
    assert a.digest != b.digest
    assert read_metadata(b.path("test.parquet"))["rows"] == 20
    assert a.problem() is None and b.problem() is None


def test_a_failure_leaves_no_work_folder(tmp_path):
    raw, validation, _ = stage_inputs(tmp_path)
    raw.path("t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"")[:5])  # damaged after validation
    with pytest.raises(PipelineError, match=r"^t10k-labels-idx1-ubyte\.gz: gzip: "):
        preprocess_files(raw, validation, tmp_path / "processed")
    assert list((tmp_path / "processed").iterdir()) == []


def test_to_table_scales_and_records_metadata():
    images = np.array([[[0] * 28] * 28, [[255] * 28] * 28], dtype=np.uint8)
    images[0, 0, 1] = 51
    table = to_table(images, np.array([3, 9], np.uint8), {"split": "x"})
    assert table.num_rows == 2 and table.num_columns == 785
    assert table.column("pixel_001").to_pylist() == [np.float32(51) / np.float32(255), 1.0]
    assert table.column("pixel_000").type == pa.float32()
    assert table.column("label").to_pylist() == [3, 9]
    assert table.schema.metadata[METADATA_KEY] == b'{"split": "x"}'
