"""Reading gzipped IDX files (the MNIST and Fashion-MNIST distribution format), checked.

Layout of an IDX file of unsigned bytes: a big-endian int32 magic number (``2051`` for
images of 3 dimensions, ``2049`` for labels of 1), one big-endian int32 size per dimension,
then the bytes in row-major order. The header is read and checked (magic number, sizes
within the caller's bound) before anything the size of the data is allocated, so a damaged
or hostile header cannot make the reader allocate gigabytes.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


class IdxError(ValueError):
  """An IDX file is absent, damaged or not of the expected kind; the message says which."""


def read_idx(path: Path, magic: int, ndim: int, *, max_items: int) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes into a uint8 array.

  Args:
    path: the ``.gz`` file.
    magic: the expected magic number (:data:`IMAGES_MAGIC` or :data:`LABELS_MAGIC`).
    ndim: the expected number of dimensions.
    max_items: the largest number of bytes of data accepted; a header announcing more is
      refused before any allocation.

  Returns:
    uint8 array of the shape the header gives.

  Raises:
    IdxError: not a gzip file, a wrong magic number, a size of 0 or above ``max_items``, or
      fewer or more data bytes than the header announces.
  """
  header_size = 4 * (1 + ndim)
  try:
    with gzip.open(path, "rb") as file:
      header = np.frombuffer(_read_exactly(file, header_size, path), dtype=">i4")
      if header[0] != magic:
        raise IdxError(
            f"{path} is not an IDX file of {ndim} dimensions (magic number {header[0]}, "
            f"expected {magic}): replace it with the original file"
        )
      shape = tuple(int(size) for size in header[1:])
      count = math.prod(shape)
      if min(shape) < 1 or count > max_items:
        raise IdxError(
            f"{path} announces shape {shape}, outside 1..{max_items} bytes: replace it with "
            "the original file"
        )
      data = np.frombuffer(_read_exactly(file, count, path), dtype=np.uint8)
      if file.read(1):
        raise IdxError(
            f"{path} holds more data bytes than its header's shape {shape}: replace it with "
            "the original file"
        )
  except (OSError, EOFError, zlib.error) as error:
    raise IdxError(
        f"{path} cannot be read as gzip ({error}): replace it with the original file"
    ) from error
  return data.reshape(shape)


def _read_exactly(file, size: int, path: Path) -> bytes:
  raw = file.read(size)
  if len(raw) != size:
    raise IdxError(
        f"{path} ends after {len(raw)} of {size} expected bytes: replace it with the "
        "original file"
    )
  return raw
