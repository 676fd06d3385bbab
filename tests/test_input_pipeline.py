"""Tests of experiments.input_pipeline: loading (mock tfds, sklearn digits, the
real MNIST test set, synthetic), augmentation, normalisation and batch order."""

import gzip
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from experiments import input_pipeline

IMAGE_SHAPES = {
    "cifar10": (32, 32, 3),
    "mnist": (28, 28, 1),
    "imagenette": (224, 224, 3),
    "digits": (8, 8, 1),
    "mnist_t10k": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
}

# Class counts of the official MNIST test set (10,000 images), as published.
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

MNIST_T10K_DIR = input_pipeline.default_mnist_t10k_dir()
needs_mnist_t10k = pytest.mark.skipif(
    not MNIST_T10K_DIR.is_dir(), reason=f"{MNIST_T10K_DIR} is absent"
)


@pytest.fixture
def network_attempts(monkeypatch):
  """Records (and refuses) every DNS lookup and socket connection."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access attempted in a test")

  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(socket.socket, "connect", refuse)
  return attempts


def assert_valid_dataset(dataset, name, train_size, test_size):
  """Shapes, dtypes, label range, and statistics computed independently."""
  shape = IMAGE_SHAPES[name]
  assert dataset.train_images.shape == (train_size, *shape)
  assert dataset.test_images.shape == (test_size, *shape)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.test_images.dtype == np.uint8
  assert dataset.train_labels.shape == (train_size,)
  assert dataset.test_labels.shape == (test_size,)
  assert dataset.train_labels.dtype == np.int32
  assert dataset.test_labels.dtype == np.int32
  assert dataset.num_classes == 10
  for labels in (dataset.train_labels, dataset.test_labels):
    assert labels.min() >= 0 and labels.max() < dataset.num_classes
  scaled = dataset.train_images.astype(np.float64) / 255.0
  assert dataset.mean.dtype == np.float32 and dataset.std.dtype == np.float32
  np.testing.assert_allclose(dataset.mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dataset.std, scaled.std(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


# --- tfds data sets ----------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "mnist", "imagenette"])
def test_tfds_dataset_loads_from_mock_data(name, network_attempts):
  with tfds.testing.mock_data(num_examples=6):
    dataset = input_pipeline.load(name)
  assert_valid_dataset(dataset, name, train_size=6, test_size=6)
  assert not network_attempts


@pytest.mark.parametrize("name", ["cifar10", "mnist", "imagenette"])
def test_missing_tfds_dataset_raises_one_actionable_line(name, tmp_path, network_attempts):
  with pytest.raises(input_pipeline.DatasetUnavailableError) as raised:
    input_pipeline.load(name, data_dir=str(tmp_path))
  message = str(raised.value)
  assert "\n" not in message
  assert str(tmp_path) in message
  assert f"tfds build {name}" in message
  assert "--synthetic" in message
  assert isinstance(raised.value, ValueError)
  assert not network_attempts
  assert not list(tmp_path.iterdir()), "nothing may be written to data_dir"


def test_resize_keeps_aspect_and_crops_centre():
  # A wide image: left third 0, middle third 100, right third 200. Resizing
  # its shorter side to 16 makes it 16x48, whose central 16 columns are the
  # middle third.
  image = np.zeros((32, 96, 3), np.uint8)
  image[:, 32:64] = 100
  image[:, 64:] = 200
  resized = input_pipeline._resize_shorter_side_and_center_crop(image, 16)
  assert resized.shape == (16, 16, 3) and resized.dtype == np.uint8
  np.testing.assert_array_equal(resized[:, 2:-2], 100)


# --- digits ------------------------------------------------------------------


def test_digits_shapes_values_and_seeded_split():
  dataset = input_pipeline.load("digits", seed=0)
  assert_valid_dataset(dataset, "digits", train_size=1437, test_size=360)
  allowed_values = np.round(np.arange(17) * 255 / 16)
  assert np.isin(dataset.train_images, allowed_values).all()
  assert dataset.train_images.max() == 255
  all_labels = np.concatenate([dataset.train_labels, dataset.test_labels])
  np.testing.assert_array_equal(np.bincount(all_labels), np.bincount(load_digits().target))

  again = input_pipeline.load("digits", seed=0)
  np.testing.assert_array_equal(again.test_images, dataset.test_images)
  np.testing.assert_array_equal(again.test_labels, dataset.test_labels)
  other = input_pipeline.load("digits", seed=1)
  assert not np.array_equal(other.test_images, dataset.test_images)


# --- mnist_t10k ----------------------------------------------------------------


@needs_mnist_t10k
def test_mnist_t10k_real_split():
  dataset = input_pipeline.load("mnist_t10k", seed=0)
  assert_valid_dataset(dataset, "mnist_t10k", train_size=8000, test_size=2000)
  all_labels = np.concatenate([dataset.train_labels, dataset.test_labels])
  np.testing.assert_array_equal(np.bincount(all_labels), MNIST_TEST_CLASS_COUNTS)
  # 2,000 of ~1,000 per class: about 200 each; a sorted or unshuffled split
  # would leave classes out.
  test_counts = np.bincount(dataset.test_labels, minlength=10)
  assert test_counts.min() > 140 and test_counts.max() < 270
  # Real digits: mostly background, ink at the centre.
  assert 0.1 < dataset.mean[0] < 0.16

  again = input_pipeline.load("mnist_t10k", seed=0)
  np.testing.assert_array_equal(again.test_images, dataset.test_images)
  other = input_pipeline.load("mnist_t10k", seed=1)
  assert not np.array_equal(other.test_labels, dataset.test_labels)


def write_idx(path, magic, array):
  header = np.array([magic, *array.shape], dtype=">i4").tobytes()
  with gzip.open(path, "wb", compresslevel=1) as file:
    file.write(header + array.astype(np.uint8).tobytes())


def encoded_index(images):
  """Inverse of the encoding below: pixel (0, 0) + 256 * pixel (27, 27)."""
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 27, 27, 0].astype(int)


def test_mnist_t10k_parses_idx_row_major_and_pairs_labels(tmp_path):
  # Image i carries i in two far-apart pixels and has label i % 10, so a
  # wrong byte order, shape or image/label pairing shows up.
  count = 8010
  index = np.arange(count)
  images = np.zeros((count, 28, 28), np.uint8)
  images[:, 0, 0] = index % 256
  images[:, 27, 27] = index // 256
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, images)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, index % 10)

  dataset = input_pipeline.load("mnist_t10k", data_dir=str(tmp_path), seed=3)

  assert dataset.train_images.shape == (8000, 28, 28, 1)
  assert dataset.test_images.shape == (10, 28, 28, 1)
  train_index = encoded_index(dataset.train_images)
  test_index = encoded_index(dataset.test_images)
  np.testing.assert_array_equal(train_index % 10, dataset.train_labels)
  np.testing.assert_array_equal(test_index % 10, dataset.test_labels)
  np.testing.assert_array_equal(np.sort(np.concatenate([train_index, test_index])), index)


def test_mnist_t10k_missing_or_corrupt_files_raise(tmp_path):
  with pytest.raises(input_pipeline.DatasetUnavailableError, match="t10k-images-idx3-ubyte.gz"):
    input_pipeline.load("mnist_t10k", data_dir=str(tmp_path))

  # Image and label files swapped: each has the other's magic number.
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2049, np.zeros(8010))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, np.zeros((8010, 28, 28)))
  with pytest.raises(input_pipeline.DatasetUnavailableError, match="magic number"):
    input_pipeline.load("mnist_t10k", data_dir=str(tmp_path))


# --- synthetic and argument checks ---------------------------------------------


@pytest.mark.parametrize("name", input_pipeline.DATASET_NAMES)
def test_synthetic_has_true_shapes_and_reads_no_file(name, tmp_path):
  absent = str(tmp_path / "absent")
  dataset = input_pipeline.load(
      name, data_dir=absent, synthetic=True, synthetic_train=12, synthetic_test=5, seed=4
  )
  assert_valid_dataset(dataset, name, train_size=12, test_size=5)
  again = input_pipeline.load(
      name, data_dir=absent, synthetic=True, synthetic_train=12, synthetic_test=5, seed=4
  )
  np.testing.assert_array_equal(again.train_images, dataset.train_images)
  assert set(input_pipeline.AUGMENTATION) == set(input_pipeline.DATASET_NAMES)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(name="svhn"), "name"),
        (dict(name="digits", seed=-1), "seed"),
        (dict(name="digits", synthetic=True, synthetic_train=0), "synthetic_train"),
    ],
)
def test_load_rejects_bad_arguments(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    input_pipeline.load(**kwargs)


# --- augment -------------------------------------------------------------------


def random_images(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def candidate_views(image, pad):
  """Every crop of the zero-padded image, each with and without a flip."""
  height, width, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy : dy + height, dx : dx + width]
      yield (dy, dx, False), crop
      yield (dy, dx, True), crop[:, ::-1]


def test_augment_crops_are_shifts_of_the_padded_image():
  pad = 2
  images = random_images(0, (16, 6, 7, 3))
  out = np.asarray(
      input_pipeline.augment(jnp.asarray(images), jax.random.key(0), pad=pad, flip=True)
  )
  assert out.shape == images.shape and out.dtype == np.uint8
  chosen = []
  for image, augmented in zip(images, out):
    matches = [
        view
        for view, candidate in candidate_views(image, pad)
        if np.array_equal(candidate, augmented)
    ]
    assert matches, "output is not a padded crop (or its mirror) of the input"
    chosen.append(matches[0])
  offsets = {(dy, dx) for dy, dx, _ in chosen}
  assert len(offsets) > 1, "every image got the same crop"
  assert any(flipped for _, _, flipped in chosen)
  assert not all(flipped for _, _, flipped in chosen)


def test_augment_reaches_every_offset():
  pad = 1
  # Distinct non-zero pixels: each crop of the padded image is unique.
  image = np.arange(1, 10, dtype=np.uint8).reshape(3, 3, 1)
  images = np.broadcast_to(image, (256, 3, 3, 1))
  out = np.asarray(
      input_pipeline.augment(jnp.asarray(images), jax.random.key(2), pad=pad, flip=False)
  )
  views = {
      (dy, dx): candidate
      for (dy, dx, flipped), candidate in candidate_views(image, pad)
      if not flipped
  }
  reached = {
      offset
      for augmented in out
      for offset, candidate in views.items()
      if np.array_equal(candidate, augmented)
  }
  assert reached == set(views), "some offsets in {0, ..., 2 pad}^2 never occur"


def test_augment_without_padding_or_flip_is_identity():
  images = jnp.asarray(random_images(1, (4, 5, 5, 1)))
  out = input_pipeline.augment(images, jax.random.key(3), pad=0, flip=False)
  np.testing.assert_array_equal(out, images)


def test_augment_flip_only_mirrors_some_images():
  images = random_images(2, (32, 4, 5, 2))
  out = np.asarray(input_pipeline.augment(jnp.asarray(images), jax.random.key(1), pad=0, flip=True))
  mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
  unchanged = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
  assert (mirrored | unchanged).all()
  assert mirrored.any() and unchanged.any()


def test_augment_is_deterministic_per_key_and_jits_inside_a_step():
  images = jnp.asarray(random_images(3, (8, 6, 6, 3)))

  @jax.jit
  def step(images, key):
    return input_pipeline.augment(images, key, pad=1, flip=True)

  first = step(images, jax.random.key(7))
  np.testing.assert_array_equal(first, step(images, jax.random.key(7)))
  np.testing.assert_array_equal(
      first, input_pipeline.augment(images, jax.random.key(7), pad=1, flip=True)
  )
  assert not np.array_equal(first, step(images, jax.random.key(8)))


def test_augment_rejects_bad_input():
  images = jnp.zeros((2, 4, 4, 1), jnp.uint8)
  with pytest.raises(ValueError, match="pad"):
    input_pipeline.augment(images, jax.random.key(0), pad=-1, flip=False)
  with pytest.raises(TypeError, match="uint8"):
    input_pipeline.augment(images.astype(jnp.float32), jax.random.key(0), pad=1, flip=False)
  with pytest.raises(ValueError, match="shape"):
    input_pipeline.augment(images[0], jax.random.key(0), pad=1, flip=False)


# --- normalize -----------------------------------------------------------------


def test_normalize_standardises_each_channel():
  np.testing.assert_allclose(
      input_pipeline.normalize(jnp.full((1, 1, 1, 2), 255, jnp.uint8), [0.5, 1.0], [0.25, 2.0]),
      np.array([2.0, 0.0]).reshape(1, 1, 1, 2),
  )
  dataset = input_pipeline.load("digits")
  normalized = input_pipeline.normalize(
      jnp.asarray(dataset.train_images), dataset.mean, dataset.std
  )
  assert normalized.dtype == jnp.float32
  np.testing.assert_allclose(normalized.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(normalized.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


# --- batch_indices -------------------------------------------------------------


def test_batch_indices_is_a_truncated_permutation_of_seed_and_epoch():
  batches = input_pipeline.batch_indices(5, 2, 103, 10)
  assert batches.shape == (10, 10) and batches.dtype == np.int32
  flat = batches.ravel()
  assert len(np.unique(flat)) == flat.size
  assert flat.min() >= 0 and flat.max() < 103
  # The order the interface specifies, so that any tool can replay it.
  expected = np.random.default_rng((5, 2)).permutation(103)[:100]
  np.testing.assert_array_equal(flat, expected)

  np.testing.assert_array_equal(batches, input_pipeline.batch_indices(5, 2, 103, 10))
  assert not np.array_equal(batches, input_pipeline.batch_indices(5, 3, 103, 10))
  assert not np.array_equal(batches, input_pipeline.batch_indices(6, 2, 103, 10))


@pytest.mark.parametrize(
    "args, argument",
    [
        ((0, 0, 10, 0), "batch_size"),
        ((0, 0, 10, 11), "batch_size"),
        ((0, -1, 10, 2), "epoch"),
        ((-1, 0, 10, 2), "seed"),
    ],
)
def test_batch_indices_rejects_bad_arguments(args, argument):
  with pytest.raises(ValueError, match=argument):
    input_pipeline.batch_indices(*args)
