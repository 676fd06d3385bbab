"""Fashion-MNIST: the real IDX files when installed, small IDX files for parsing and errors."""

import gzip

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import idx, input_pipeline, mnist
from tests.test_input_pipeline import assert_valid_dataset, write_idx

FASHION_DIR = input_pipeline.DEFAULT_FASHION_MNIST_DIR
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"{FASHION_DIR} is absent (apt-get install dataset-fashion-mnist)",
)
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def write_fashion_files(folder, train_size=30, test_size=10):
  """Image i of a split carries i in pixel (0, 0) and the split in pixel (27, 27) (1 = test);
  its label is i % 10, so a wrong byte order, shape, pairing or split shows up."""
  for images_name, labels_name, size, split in (
      (TRAIN_IMAGES, TRAIN_LABELS, train_size, 0),
      (TEST_IMAGES, TEST_LABELS, test_size, 1),
  ):
    images = np.zeros((size, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(size)
    images[:, 27, 27] = split
    write_idx(folder / images_name, idx.IMAGES_MAGIC, images)
    write_idx(folder / labels_name, idx.LABELS_MAGIC, np.arange(size) % 10)


@needs_fashion_mnist
def test_real_fashion_mnist_has_the_published_sizes_and_balance():
  dataset = input_pipeline.load("fashion_mnist")
  assert_valid_dataset(dataset, "fashion_mnist", train_size=60_000, test_size=10_000)
  np.testing.assert_array_equal(np.bincount(dataset.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(dataset.test_labels), [1000] * 10)
  # Fashion-MNIST's published normalisation constants (0.2860, 0.3530).
  np.testing.assert_allclose([dataset.mean[0], dataset.std[0]], [0.2860, 0.3530], atol=5e-4)


def test_idx_files_parse_row_major_with_labels_paired_and_splits_kept(tmp_path):
  write_fashion_files(tmp_path)
  dataset = input_pipeline.load("fashion_mnist", data_dir=str(tmp_path))
  assert_valid_dataset(dataset, "fashion_mnist", train_size=30, test_size=10)
  for images, labels, split in (
      (dataset.train_images, dataset.train_labels, 0),
      (dataset.test_images, dataset.test_labels, 1),
  ):
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(len(labels)))
    np.testing.assert_array_equal(labels, np.arange(len(labels)) % 10)
    assert (images[:, 27, 27, 0] == split).all()


def test_tfds_is_preferred_when_prepared(tmp_path):
  write_fashion_files(tmp_path)
  with tfds.testing.mock_data(num_examples=6):
    dataset = input_pipeline.load("fashion_mnist", data_dir=str(tmp_path))
  assert len(dataset.train_labels) == len(dataset.test_labels) == 6


def test_absent_files_say_how_to_install_and_the_cli_exits_2(tmp_path, capsys):
  with pytest.raises(input_pipeline.DatasetUnavailableError, match=TRAIN_IMAGES):
    input_pipeline.load("fashion_mnist", data_dir=str(tmp_path))
  argv = ["--dataset=fashion_mnist", f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'run'}"]
  assert mnist.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
  assert not (tmp_path / "run").exists()
  assert not list(tmp_path.iterdir()), "nothing may be written to data_dir"


def write_raw(path, payload: bytes):
  with gzip.open(path, "wb", compresslevel=1) as file:
    file.write(payload)


def header(magic, *shape):
  return np.array([magic, *shape], dtype=">i4").tobytes()


@pytest.mark.parametrize(
    "payload,expected",
    [
        (header(idx.LABELS_MAGIC, 3) + bytes(20), "magic number 2049, expected 2051"),
        (header(idx.IMAGES_MAGIC, 2**31 - 1, 28, 28), "outside 1..78400000 bytes"),
        (header(idx.IMAGES_MAGIC, 0, 28, 28), "outside 1..78400000 bytes"),
        (header(idx.IMAGES_MAGIC, 2, 28, 28) + bytes(100), "ends after 100 of 1568"),
        (header(idx.IMAGES_MAGIC, 1, 28, 28) + bytes(785), "more data bytes"),
        (header(idx.IMAGES_MAGIC, 1, 28)[:6], "ends after 6 of 16"),
    ],
    ids=["labels_magic", "huge", "empty", "truncated", "trailing", "short_header"],
)
def test_damaged_image_files_are_refused_with_the_reason(tmp_path, payload, expected):
  write_fashion_files(tmp_path)
  write_raw(tmp_path / TRAIN_IMAGES, payload)
  with pytest.raises(input_pipeline.DatasetUnavailableError, match=expected):
    input_pipeline.load("fashion_mnist", data_dir=str(tmp_path))


def test_non_gzip_files_and_mismatched_labels_are_refused(tmp_path):
  write_fashion_files(tmp_path)
  (tmp_path / TEST_LABELS).write_bytes(b"not gzip at all")
  with pytest.raises(input_pipeline.DatasetUnavailableError, match="cannot be read as gzip"):
    input_pipeline.load("fashion_mnist", data_dir=str(tmp_path))
  write_idx(tmp_path / TEST_LABELS, idx.LABELS_MAGIC, np.arange(9) % 10)  # 10 images
  with pytest.raises(input_pipeline.DatasetUnavailableError, match=r"labels \(9,\)"):
    input_pipeline.load("fashion_mnist", data_dir=str(tmp_path))
  write_idx(tmp_path / TEST_LABELS, idx.LABELS_MAGIC, np.full(10, 10))
  with pytest.raises(input_pipeline.DatasetUnavailableError, match="up to 10"):
    input_pipeline.load("fashion_mnist", data_dir=str(tmp_path))
