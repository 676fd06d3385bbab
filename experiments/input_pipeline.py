"""Data sets as NumPy arrays, and the on-device augmentation of the experiments.

Every data set is loaded whole into host memory as uint8 images ``(N, H, W, C)``
and int32 labels, so that training can keep it on the accelerator and crop,
flip and normalise inside the compiled step (the host never feeds batches).

Sources:

* ``cifar10``, ``mnist``, ``imagenette``: ``tensorflow_datasets.data_source``
  (random-access ArrayRecord files; reading them needs no TensorFlow). Nothing
  is ever downloaded: a data set that is not prepared in ``data_dir`` raises
  :class:`DatasetUnavailableError` saying how to prepare it elsewhere.
* ``digits``: scikit-learn's bundled 8x8 digits (no file, no network).
* ``mnist_t10k``: the real MNIST test set (IDX files) in
  ``../shared/data/mnist-t10k``, split 8,000 train / 2,000 test.
* ``fashion_mnist``: Fashion-MNIST, 60,000 train / 10,000 test, from tfds when it is
  prepared, else from the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``).
* ``synthetic=True``: random images of the data set's true shape, for smoke
  tests and speed measurements only.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import idx, validation

DATASET_NAMES = ("cifar10", "mnist", "imagenette", "digits", "mnist_t10k", "fashion_mnist")

# (pad, flip): the paper's crop+flip for natural images, nothing for digits.
AUGMENTATION = {
    "cifar10": (4, True),
    "imagenette": (28, True),
    "mnist": (0, False),
    "digits": (0, False),
    "mnist_t10k": (0, False),
    "fashion_mnist": (0, False),
}


class DatasetUnavailableError(ValueError):
  """A data set cannot be read offline; the one-line message says what to do."""


class Dataset(NamedTuple):
  """A whole data set in host memory.

  Attributes:
    train_images: ``(N, H, W, C)`` uint8.
    train_labels: ``(N,)`` int32 in ``[0, num_classes)``.
    test_images: ``(M, H, W, C)`` uint8.
    test_labels: ``(M,)`` int32.
    num_classes: number of classes.
    mean: ``(C,)`` float32, per-channel mean of ``train_images / 255``.
    std: ``(C,)`` float32, per-channel standard deviation of the same.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray


class _ImageSpec(NamedTuple):
  shape: tuple[int, int, int]
  num_classes: int


_IMAGE_SPECS = {
    "cifar10": _ImageSpec((32, 32, 3), 10),
    "mnist": _ImageSpec((28, 28, 1), 10),
    "imagenette": _ImageSpec((224, 224, 3), 10),
    "digits": _ImageSpec((8, 8, 1), 10),
    "mnist_t10k": _ImageSpec((28, 28, 1), 10),
    "fashion_mnist": _ImageSpec((28, 28, 1), 10),
}


class _TfdsSource(NamedTuple):
  tfds_name: str
  train_split: str
  test_split: str


# Imagenette v2 is the current 70/30 split; 320px (shorter side) is the smallest
# variant with more pixels than the 224x224 the models see, so it loses nothing
# against full-size and is a tenth of the download.
_TFDS_SOURCES = {
    "cifar10": _TfdsSource("cifar10", "train", "test"),
    "mnist": _TfdsSource("mnist", "train", "test"),
    "imagenette": _TfdsSource("imagenette/320px-v2", "train", "validation"),
    "fashion_mnist": _TfdsSource("fashion_mnist", "train", "test"),
}

_MNIST_T10K_IMAGES = "t10k-images-idx3-ubyte.gz"
_MNIST_T10K_LABELS = "t10k-labels-idx1-ubyte.gz"
_MNIST_T10K_TRAIN_SIZE = 8000
# The Debian package dataset-fashion-mnist's folder and file names (those of the original
# distribution), train split first.
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
# Bound on the images an IDX file may announce, checked before allocating: above the 70,000
# of MNIST and Fashion-MNIST, the largest 28x28 sets read here.
_IDX_MAX_IMAGES = 100_000

_DIGITS_TRAIN_FRACTION = 0.8
_DIGITS_MAX_VALUE = 16

# Below this many records a progress bar is noise (tests, mock data).
_PROGRESS_BAR_MIN_RECORDS = 1000


def default_mnist_t10k_dir() -> Path:
  """Where ``mnist_t10k`` is read from by default.

  Returns:
    ``<project root>/../shared/data/mnist-t10k``.
  """
  project_root = Path(__file__).resolve().parents[1]
  return project_root.parent / "shared" / "data" / "mnist-t10k"


def load(
    name: str,
    *,
    data_dir: str | None = None,
    synthetic: bool = False,
    seed: int = 0,
    synthetic_train: int = 512,
    synthetic_test: int = 256,
) -> Dataset:
  """Loads a whole data set into host memory.

  Args:
    name: one of :data:`DATASET_NAMES`.
    data_dir: for ``cifar10``, ``mnist`` and ``imagenette`` the tfds data
      directory (default: tfds' own, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``); for ``mnist_t10k`` the folder holding the
      two IDX ``.gz`` files (default :func:`default_mnist_t10k_dir`); for
      ``fashion_mnist`` a tfds data directory where it is prepared, else the
      folder of its four IDX ``.gz`` files (default
      :data:`DEFAULT_FASHION_MNIST_DIR`); unused by ``digits`` and by
      ``synthetic``.
    synthetic: random uint8 images and labels of the data set's true image
      shape and class count (imagenette: 224x224x3, 10 classes); reads no file.
    seed: seeds the train/test split of ``digits`` and ``mnist_t10k``, and
      the synthetic data.
    synthetic_train: number of synthetic train examples.
    synthetic_test: number of synthetic test examples.

  Returns:
    A :class:`Dataset`. Imagenette images are resized (shorter side to 224,
    aspect kept) and centre-cropped to 224x224.

  Raises:
    ValueError: unknown ``name``, or a bad seed or size.
    DatasetUnavailableError: the data set cannot be read offline.
  """
  if name not in DATASET_NAMES:
    raise ValueError(f"name must be one of {', '.join(DATASET_NAMES)}; got {name!r}")
  validation.check_int("seed", seed, minimum=0)
  if synthetic:
    validation.check_int("synthetic_train", synthetic_train, minimum=1)
    validation.check_int("synthetic_test", synthetic_test, minimum=1)
    splits = _synthetic_splits(_IMAGE_SPECS[name], seed, synthetic_train, synthetic_test)
  elif name == "digits":
    splits = _digits_splits(seed)
  elif name == "mnist_t10k":
    folder = default_mnist_t10k_dir() if data_dir is None else Path(data_dir)
    splits = _mnist_t10k_splits(folder, seed)
  elif name == "fashion_mnist":
    splits = _fashion_mnist_splits(data_dir)
  else:
    splits = _tfds_splits(name, data_dir)
  train_images, train_labels, test_images, test_labels = splits
  mean, std = _channel_stats(train_images)
  return Dataset(
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=_IMAGE_SPECS[name].num_classes,
      mean=mean,
      std=std,
  )


@functools.partial(jax.jit, static_argnames=("pad", "flip"))
def augment(images: jax.Array, key: jax.Array, *, pad: int, flip: bool) -> jax.Array:
  """Random crop after zero padding, and random horizontal flip, per image.

  Each image ``x`` of shape ``(H, W, C)`` is zero-padded to
  ``(H + 2 pad, W + 2 pad, C)`` and cropped back to ``(H, W, C)`` at an offset
  ``(dy, dx)`` drawn uniformly from ``{0, ..., 2 pad}^2``:

      y[i, j] = x[i + dy - pad, j + dx - pad]   (0 outside x),

  then, if ``flip``, mirrored left-right with probability 1/2. ``pad=0`` with
  ``flip=False`` is the identity. Pure JAX and jit-able (``pad`` and ``flip``
  are static), so it runs inside the compiled (and sharded) train step.

  Args:
    images: ``(B, H, W, C)`` uint8.
    key: a JAX PRNG key; the same key gives the same output.
    pad: non-negative padding in pixels on each side.
    flip: whether to flip at random.

  Returns:
    ``(B, H, W, C)`` uint8.
  """
  if images.ndim != 4:
    raise ValueError(f"images must have shape (B, H, W, C); got shape {images.shape}")
  if images.dtype != jnp.uint8:
    raise TypeError(f"images must be uint8; got {images.dtype}")
  validation.check_int("pad", pad, minimum=0)
  crop_key, flip_key = jax.random.split(key)
  batch, height, width, channels = images.shape
  if pad > 0:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    flipped = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :], images)
  return images


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """Maps uint8 images to float32 ``(x / 255 - mean) / std`` per channel.

  Args:
    images: ``(..., C)`` uint8 images.
    mean: ``(C,)`` per-channel mean of the images scaled to [0, 1].
    std: ``(C,)`` per-channel standard deviation of the same.

  Returns:
    float32 array of the shape of ``images``.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def batch_indices(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
  """The example order of one epoch, as batches of indices.

  The order is ``np.random.default_rng((seed, epoch)).permutation(n)``: it
  depends on ``(seed, epoch)`` only, so a resumed run replays the same order.
  The last ``n mod batch_size`` indices of the permutation are dropped so that
  every batch is full (and the step compiles once).

  Args:
    seed: non-negative run seed.
    epoch: non-negative epoch number.
    num_examples: size ``n`` of the train set.
    batch_size: examples per batch, at most ``num_examples``.

  Returns:
    ``(n // batch_size, batch_size)`` int32 of distinct indices in ``[0, n)``.
  """
  validation.check_int("seed", seed, minimum=0)
  validation.check_int("epoch", epoch, minimum=0)
  validation.check_int("num_examples", num_examples, minimum=1)
  validation.check_int("batch_size", batch_size, minimum=1)
  if batch_size > num_examples:
    raise ValueError(
        f"batch_size must be at most num_examples={num_examples}; " f"got {batch_size}"
    )
  steps = num_examples // batch_size
  order = np.random.default_rng((seed, epoch)).permutation(num_examples)
  return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of ``images / 255``, as float32.

  Sums run in float64 over chunks so that a large uint8 set (Imagenette) is
  never copied whole to float.
  """
  channels = images.shape[-1]
  total = np.zeros(channels, np.float64)
  total_squares = np.zeros(channels, np.float64)
  chunk = 1024
  for start in range(0, len(images), chunk):
    scaled = images[start : start + chunk].reshape(-1, channels) / 255.0
    total += scaled.sum(axis=0)
    total_squares += np.square(scaled).sum(axis=0)
  count = images.size // channels
  mean = total / count
  variance = np.maximum(total_squares / count - np.square(mean), 0.0)
  # A constant channel would make normalize divide by zero; keep it finite.
  std = np.maximum(np.sqrt(variance), 1e-6)
  return mean.astype(np.float32), std.astype(np.float32)


def _split_by_permutation(images, labels, train_size: int, seed: int):
  order = np.random.default_rng(seed).permutation(len(labels))
  train, test = order[:train_size], order[train_size:]
  return images[train], labels[train], images[test], labels[test]


def _synthetic_splits(spec: _ImageSpec, seed: int, train_size: int, test_size: int):
  rng = np.random.default_rng(seed)
  total = train_size + test_size
  images = rng.integers(0, 256, (total, *spec.shape), dtype=np.uint8)
  labels = rng.integers(0, spec.num_classes, total, dtype=np.int32)
  return (images[:train_size], labels[:train_size], images[train_size:], labels[train_size:])


def _digits_splits(seed: int):
  from sklearn.datasets import load_digits

  digits = load_digits()
  scaled = np.round(digits.images * (255.0 / _DIGITS_MAX_VALUE))
  images = np.clip(scaled, 0, 255).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train_size = int(_DIGITS_TRAIN_FRACTION * len(labels))
  return _split_by_permutation(images, labels, train_size, seed)


def _mnist_t10k_splits(folder: Path, seed: int):
  missing = [
      file for file in (_MNIST_T10K_IMAGES, _MNIST_T10K_LABELS) if not (folder / file).is_file()
  ]
  if missing:
    raise DatasetUnavailableError(
        f"mnist_t10k needs {' and '.join(missing)} (the MNIST test set in IDX "
        f"format) in {folder}: put them there or pass data_dir=<folder with "
        "them>, or use --synthetic for smoke tests"
    )
  images = _read_idx(folder / _MNIST_T10K_IMAGES, idx.IMAGES_MAGIC, ndim=3)
  labels = _read_idx(folder / _MNIST_T10K_LABELS, idx.LABELS_MAGIC, ndim=1)
  if (
      images.shape[1:] != (28, 28)
      or len(images) != len(labels)
      or len(labels) <= _MNIST_T10K_TRAIN_SIZE
      or labels.max() >= 10
  ):
    raise DatasetUnavailableError(
        f"mnist_t10k in {folder} has images {images.shape} and labels "
        f"{labels.shape} up to {labels.max()}; expected (N, 28, 28) and (N,) "
        f"with N > {_MNIST_T10K_TRAIN_SIZE} and labels 0..9: replace the "
        "files with the originals"
    )
  return _split_by_permutation(
      images[..., None], labels.astype(np.int32), _MNIST_T10K_TRAIN_SIZE, seed
  )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
  """:func:`idx.read_idx` of at most :data:`_IDX_MAX_IMAGES` 28x28 images' bytes."""
  try:
    return idx.read_idx(path, magic, ndim, max_items=_IDX_MAX_IMAGES * 28 * 28)
  except idx.IdxError as error:
    raise DatasetUnavailableError(str(error)) from error


def _fashion_mnist_splits(data_dir: str | None):
  """From tfds when prepared in ``data_dir`` (or tfds' default), else from the IDX files."""
  try:
    return _tfds_splits("fashion_mnist", data_dir)
  except DatasetUnavailableError:
    pass
  folder = DEFAULT_FASHION_MNIST_DIR if data_dir is None else Path(data_dir)
  names = [name for pair in _FASHION_MNIST_FILES for name in pair]
  missing = [name for name in names if not (folder / name).is_file()]
  if missing:
    raise DatasetUnavailableError(
        f"fashion_mnist is not prepared for tfds and {folder} lacks {', '.join(missing)}: "
        "install it with `apt-get install dataset-fashion-mnist` (IDX files in "
        f"{DEFAULT_FASHION_MNIST_DIR}) or pass --data_dir=<folder with the IDX files>"
    )
  splits = []
  for images_name, labels_name in _FASHION_MNIST_FILES:
    images = _read_idx(folder / images_name, idx.IMAGES_MAGIC, ndim=3)
    labels = _read_idx(folder / labels_name, idx.LABELS_MAGIC, ndim=1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= 10:
      raise DatasetUnavailableError(
          f"{folder / images_name} and {labels_name} hold images {images.shape} and labels "
          f"{labels.shape} up to {labels.max()}; expected (N, 28, 28) and (N,) with labels "
          "0..9: replace the files with the originals"
      )
    splits += [images[..., None], labels.astype(np.int32)]
  return tuple(splits)


def _tfds_splits(name: str, data_dir: str | None):
  source = _TFDS_SOURCES[name]
  image_shape = _IMAGE_SPECS[name].shape
  train = _read_tfds_split(source.tfds_name, source.train_split, data_dir, image_shape)
  test = _read_tfds_split(source.tfds_name, source.test_split, data_dir, image_shape)
  return (*train, *test)


def _read_tfds_split(
    tfds_name: str, split: str, data_dir: str | None, image_shape: tuple[int, int, int]
):
  """Reads every record of one split into NumPy, resizing odd-sized images."""
  from tqdm.auto import tqdm

  records = _open_tfds_split(tfds_name, split, data_dir)
  count = len(records)
  images = np.empty((count, *image_shape), np.uint8)
  labels = np.empty(count, np.int32)
  progress = tqdm(
      range(count),
      desc=f"reading {tfds_name} {split}",
      unit="img",
      disable=count < _PROGRESS_BAR_MIN_RECORDS,
  )
  for index in progress:
    example = records[index]
    image = np.asarray(example["image"], np.uint8)
    if image.shape != image_shape:
      image = _resize_shorter_side_and_center_crop(image, image_shape[0])
    images[index] = image
    labels[index] = example["label"]
  return images, labels


def _open_tfds_split(tfds_name: str, split: str, data_dir: str | None):
  """``tfds.data_source`` with ``download=False``: never uses the network."""
  # Imported here, not at the top: tfds takes a second to import and the
  # digits, mnist_t10k and synthetic paths do not need it.
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  # tfds says "not prepared" with KeyError (no splits), NotImplementedError
  # (no random-access files), AssertionError or a file error, depending on
  # what it finds on disk.
  except (KeyError, NotImplementedError, AssertionError, OSError) as error:
    raise DatasetUnavailableError(_tfds_unavailable_message(tfds_name, data_dir, error)) from error


def _tfds_unavailable_message(tfds_name: str, data_dir: str | None, error: Exception) -> str:
  """One line: what is missing, where tfds looked, how to prepare it."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import file_adapters

  builder = tfds.builder(tfds_name, data_dir=data_dir)
  where = builder.data_dir
  how = (
      "on a machine with internet run `pip install tensorflow "
      f"tensorflow-datasets && tfds build {tfds_name} "
      "--file_format=array_record --data_dir=DIR` (preparing needs "
      "TensorFlow, reading does not), copy DIR here and pass it as data_dir "
      "(or set TFDS_DATA_DIR); use --synthetic for smoke tests"
  )
  if not builder.is_prepared():
    return f"{tfds_name} is not prepared at {where} and nothing is " f"downloaded here: {how}"
  file_format = builder.info.file_format
  if file_format not in file_adapters.FileFormat.with_random_access():
    return (
        f"{tfds_name} at {where} is stored as {file_format.value}, which "
        f"tfds.data_source cannot read: {how}"
    )
  reason = " ".join(f"{type(error).__name__}: {error}".split())
  return f"{tfds_name} at {where} cannot be read ({reason}): {how}"


def _resize_shorter_side_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes ``(H, W, 3)`` uint8 so its shorter side is ``size``, aspect kept,
  then crops the central ``size x size`` (the usual ImageNet eval transform;
  no distortion)."""
  from PIL import Image

  height, width = image.shape[:2]
  scale = size / min(height, width)
  new_height = max(size, round(height * scale))
  new_width = max(size, round(width * scale))
  resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR)
  top = (new_height - size) // 2
  left = (new_width - size) // 2
  return np.asarray(resized)[top : top + size, left : left + size]
