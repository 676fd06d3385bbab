"""Compact export of pruned params: live weights and their positions only.

A pruned network stores mostly exact zeros. ``export`` writes, for every
kernel (a leaf with ``ndim >= 2``), a packed bitmask of its live (nonzero)
positions and the values of the live entries only, either as float32 or as
per-output-channel symmetric int8 with float32 scales; other leaves (biases,
normalization parameters) are stored dense. The file is a single ``.npz``
(a zip of ``.npy`` arrays) with a JSON manifest, read back with
``allow_pickle=False`` so that a file from an untrusted source cannot run
code when it is loaded.

Size of a kernel of ``n`` weights of which ``live`` are nonzero, before
zip compression: ``ceil(n / 8) + 4 * live`` bytes (float32) or
``ceil(n / 8) + live + 4 * channels`` bytes (int8), against ``4 * n`` dense.
"""

from collections.abc import Mapping
import json
import math
import os
import tempfile
from typing import Any
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_NAME = "flipout_jax.export"
FORMAT_VERSION = 1

# Name of the manifest member; leaf members always contain ":" so they
# cannot collide with it.
_MANIFEST_KEY = "__flipout_jax_export__"
_INT8_MAX = 127
_DTYPES = {
    name: np.dtype(dtype)
    for name, dtype in (
        ("float16", jnp.float16),
        ("bfloat16", jnp.bfloat16),
        ("float32", jnp.float32),
        ("float64", jnp.float64),
    )
}
# Encoding of a leaf -> the members (name suffixes) it is stored in.
_ENCODINGS = {
    "dense": ("values",),
    "bitmask": ("mask", "values"),
    "bitmask_int8": ("mask", "values", "scales"),
}
# Bounds on what a member may inflate to, checked against its uncompressed size
# in the zip directory before it is read (zipfile never inflates past that size).
# np.load refuses .npy headers over 10,000 bytes (its max_header_size); the magic
# string, version and header length before the header take at most 12 more.
_NPY_HEADER_MAX_BYTES = 10_000 + 12
# The manifest is JSON in a 0-d unicode array, 4 bytes per character: 64 MiB
# holds some 100,000 leaves with long paths.
_MANIFEST_MAX_BYTES = 64 * 2**20
# Errors numpy and zipfile raise on a damaged, truncated or foreign file. zipfile raises
# NotImplementedError for a header whose bits name a compression method, zip version or
# encryption it does not support (one flipped bit does it), RuntimeError for an encrypted
# member.
_READ_ERRORS = (
    ValueError,
    KeyError,
    EOFError,
    OSError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)


class _FormatError(ValueError):
  """A file that is not a (readable) flipout_jax export; message w/o path."""


def export(
    params: Any, path: str | os.PathLike, *, int8: bool = False, compress: bool = True
) -> int:
  """Writes pruned params compactly to ``path`` (an ``.npz`` file).

  Kernels (leaves with ``ndim >= 2``) are stored as a packed bitmask of their
  nonzero positions plus the nonzero values; 1-D and 0-D leaves are stored
  dense. With ``int8=True`` the kernel values are quantized per output
  channel (last axis), symmetrically::

    scale_c = max_i |w[i, c]| / 127,   q[i, c] = round(w[i, c] / scale_c)

  so ``|w - q * scale| <= scale / 2``. Zero maps to zero, so every pruned
  weight stays exactly zero; a live weight smaller than half a step, which
  would round to zero, is stored as ``q = +-1`` instead (error below one
  step), so the sparsity of an int8 export is exactly that of the params.

  Without ``int8`` the round trip is exact for float16/bfloat16/float32
  leaves (values are stored as float32, float64 leaves as float64); ``-0.0``
  is stored as a pruned ``+0.0``.

  The file is written to a temporary file next to ``path`` and moved into
  place, so ``path`` is never left half written.

  Args:
    params: a nested dict of floating-point arrays (numpy or jax) with str or
      int keys: Linen params, or ``nnx.state(model, nnx.Param).to_pure_dict()``.
    path: the file to write, used as given (no suffix is added).
    int8: store kernel values as per-channel symmetric int8.
    compress: zip-deflate the members (the bitmask of a very sparse kernel
      compresses well).

  Returns:
    The number of bytes written.

  Raises:
    TypeError: ``params`` is not a nested dict of floating-point arrays.
    ValueError: a key contains "/" or two keys of a dict print the same.
  """
  leaves = _flatten(params)
  members = {}
  manifest_leaves = []
  for key_path, array in leaves:
    encoding, arrays = _encode(array, int8=int8)
    base = _member_base(key_path)
    for role, member in arrays.items():
      members[f"{base}:{role}"] = member
    manifest_leaves.append(
        {
            "path": list(key_path),
            "shape": list(array.shape),
            "dtype": array.dtype.name,
            "encoding": encoding,
        }
    )
  manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "leaves": manifest_leaves}
  members[_MANIFEST_KEY] = np.array(json.dumps(manifest))
  return _write_atomically(path, members, compress=compress)


def load(path: str | os.PathLike) -> dict:
  """Reads params written by :func:`export` back as a nested dict.

  Leaves are numpy arrays of the exported shapes and dtypes (use
  ``jax.device_put`` or ``nnx.update`` to put them on a device); int8
  kernels are dequantized, ``q * scale``. The file is read with
  ``allow_pickle=False``: no code in it can run.

  A hostile file cannot make ``load`` inflate more than it should: before a
  member is read, its uncompressed size in the zip directory is checked
  against what the manifest says it holds (shape times item size, plus at
  most 10,012 bytes of ``.npy`` header), and the manifest against a 64 MiB
  bound; zipfile never inflates a member past that size. Each member belongs
  to one leaf. The dense arrays returned are as large as the manifest's
  shapes (a kernel with no live weight is stored as a bitmask, 1/32 of its
  float32 size before compression).

  Args:
    path: a file written by :func:`export`.

  Returns:
    The params as a nested dict with the original keys (str or int).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: ``"<path>: not a flipout_jax export: <reason>"`` for a file of
      another kind, a damaged or truncated file, an unknown format version,
      or members that are missing, larger than the manifest allows, shared by
      two leaves or otherwise disagree with the manifest.
  """
  with open(path, "rb") as file:
    try:
      return _read_archive(file)
    except _FormatError as error:
      raise ValueError(f"{os.fspath(path)}: not a flipout_jax export: {error}") from None
    except _READ_ERRORS as error:
      raise ValueError(
          f"{os.fspath(path)}: not a flipout_jax export: unreadable "
          f"({type(error).__name__}: {error})"
      ) from None


def _flatten(params) -> list[tuple[tuple, np.ndarray]]:
  """(key path, numpy array) of every leaf, in insertion order."""
  if not isinstance(params, Mapping):
    raise TypeError(
        "params must be a nested dict of arrays (Linen params or "
        "nnx.state(model, nnx.Param).to_pure_dict()), got "
        f"{type(params).__name__}"
    )
  leaves: list[tuple[tuple, np.ndarray]] = []
  _collect_leaves(params, (), leaves)
  return leaves


def _collect_leaves(node: Mapping, prefix: tuple, leaves: list) -> None:
  printed_keys: set[str] = set()
  for key, value in node.items():
    key_path = (*prefix, key)
    _check_key(key, key_path, printed_keys)
    if isinstance(value, Mapping):
      _collect_leaves(value, key_path, leaves)
    else:
      leaves.append((key_path, _as_float_array(value, key_path)))


def _check_key(key, key_path: tuple, printed_keys: set) -> None:
  if isinstance(key, bool) or not isinstance(key, (str, int)):
    raise TypeError(
        f"params: key {key!r} at {_member_base(key_path[:-1])!r} " "must be a str or an int"
    )
  if isinstance(key, str) and "/" in key:
    raise ValueError(f"params: key {key!r} contains '/', which separates " "levels in the file")
  if str(key) in printed_keys:
    raise ValueError(
        f"params: two keys print as {str(key)!r} at " f"{_member_base(key_path[:-1])!r}"
    )
  printed_keys.add(str(key))


def _as_float_array(value, key_path: tuple) -> np.ndarray:
  if not isinstance(value, (np.ndarray, np.generic, jax.Array)):
    raise TypeError(
        f"params: leaf {_member_base(key_path)!r} is a {type(value).__name__}, "
        "not an array; pass a pure dict, e.g. "
        "nnx.state(model, nnx.Param).to_pure_dict()"
    )
  array = np.asarray(value)
  if array.dtype.name not in _DTYPES:
    raise TypeError(
        f"params: leaf {_member_base(key_path)!r} has dtype {array.dtype}; "
        f"only {sorted(_DTYPES)} can be exported"
    )
  return array


def _member_base(key_path: tuple) -> str:
  return "/".join(map(str, key_path))


def _value_dtype(dtype: np.dtype) -> np.dtype:
  # float32 holds float16 and bfloat16 exactly; float64 needs itself.
  return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _encode(array: np.ndarray, *, int8: bool) -> tuple[str, dict[str, np.ndarray]]:
  """(encoding, {role: array}) of one leaf."""
  values = array.astype(_value_dtype(array.dtype))
  if array.ndim < 2:
    return "dense", {"values": values.reshape(-1)}
  if not int8:
    live = values != 0
    return "bitmask", {"mask": np.packbits(live.reshape(-1)), "values": values[live]}
  quantized, scales = _quantize_int8(values)
  live = quantized != 0
  return "bitmask_int8", {
      "mask": np.packbits(live.reshape(-1)),
      "values": quantized[live],
      "scales": scales,
  }


def _quantize_int8(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-last-axis-channel symmetric int8: (q, scale), w ~= q * scale."""
  channel_max = np.abs(weights).max(axis=tuple(range(weights.ndim - 1)), initial=0.0)
  scales = (channel_max / _INT8_MAX).astype(np.float32)
  # An all-zero channel keeps scale 0; dividing by 1 there keeps its q at 0.
  safe_scales = np.where(scales > 0, scales, np.float32(1.0))
  quantized = np.clip(np.rint(weights / safe_scales), -_INT8_MAX, _INT8_MAX)
  # A live weight must not become a pruned one: keep it at the smallest step.
  quantized = np.where((weights != 0) & (quantized == 0), np.sign(weights), quantized)
  return quantized.astype(np.int8), scales


def _write_atomically(path, members: dict[str, np.ndarray], *, compress: bool) -> int:
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  save = np.savez_compressed if compress else np.savez
  handle, temp_path = tempfile.mkstemp(
      dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  try:
    with os.fdopen(handle, "wb") as file:
      save(file, **members)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
      file.flush()
      os.fsync(file.fileno())
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise
  return os.path.getsize(path)


def _read_archive(file) -> dict:
  # np.load tells an .npz (whose members it does not read yet) from .npy and
  # pickle files; the members are then read from its zip directly, each after
  # its size in the zip directory is checked.
  archive = np.load(file, allow_pickle=False)
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise _FormatError("a single .npy array, not an .npz archive")
  with archive:
    zip_file = archive.zip
    assert zip_file is not None  # an open NpzFile has its zip
    manifest = _read_manifest(zip_file)
    params: dict = {}
    members: set[str] = set()
    for leaf in manifest["leaves"]:
      key_path, array = _decode_leaf(zip_file, leaf, members)
      _insert(params, key_path, array)
  return params


def _read_manifest(archive: zipfile.ZipFile) -> dict:
  if f"{_MANIFEST_KEY}.npy" not in archive.namelist():
    raise _FormatError(f"no {_MANIFEST_KEY!r} manifest entry (an .npz of something else?)")
  text = _read_member(archive, _MANIFEST_KEY, _MANIFEST_MAX_BYTES, "the manifest entry")
  if text.dtype.kind != "U" or text.shape != ():
    raise _FormatError("the manifest entry is not a string")
  try:
    manifest = json.loads(str(text))
  except json.JSONDecodeError as error:
    raise _FormatError(f"the manifest is not valid JSON ({error})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
    raise _FormatError(f"the manifest does not name the format {FORMAT_NAME!r}")
  if manifest.get("version") != FORMAT_VERSION:
    raise _FormatError(
        f"unsupported format version {manifest.get('version')!r} "
        f"(this version of flipout_jax reads {FORMAT_VERSION})"
    )
  if not isinstance(manifest.get("leaves"), list):
    raise _FormatError("the manifest has no list of leaves")
  return manifest


def _decode_leaf(archive: zipfile.ZipFile, leaf, members: set) -> tuple[tuple, np.ndarray]:
  key_path, shape, dtype, encoding = _check_leaf_entry(leaf)
  name = _member_base(key_path)
  # Paths [0] and ["0"] (or ["a", "b"] and ["a/b"]) name the same members: one
  # member read for many leaves would multiply what a small file loads.
  if name in members:
    raise _FormatError(f"{name}: stored twice")
  members.add(name)
  size = math.prod(shape)
  value_dtype = _value_dtype(dtype)
  if encoding == "dense":
    values = _read_leaf_member(archive, name, "values", value_dtype, (size,))
    return key_path, values.reshape(shape).astype(dtype)
  mask = _read_leaf_member(archive, name, "mask", np.dtype(np.uint8), ((size + 7) // 8,))
  live = np.unpackbits(mask, count=size).astype(bool)
  live_count = int(live.sum())
  if encoding == "bitmask":
    dense_values = _read_leaf_member(archive, name, "values", value_dtype, (live_count,))
  else:
    values = _read_leaf_member(archive, name, "values", np.dtype(np.int8), (live_count,))
    scales = _read_leaf_member(archive, name, "scales", np.dtype(np.float32), (shape[-1],))
    channel = np.flatnonzero(live) % shape[-1]
    dense_values = values.astype(np.float32) * scales[channel]
  weights = np.zeros(size, value_dtype)
  weights[live] = dense_values
  return key_path, weights.reshape(shape).astype(dtype)


def _check_leaf_entry(leaf) -> tuple[tuple, tuple, np.dtype, str]:
  """Validated (key path, shape, dtype, encoding) of a manifest leaf."""
  if not isinstance(leaf, dict):
    raise _FormatError(f"a manifest leaf is not an object: {leaf!r}")
  key_path, shape = leaf.get("path"), leaf.get("shape")
  if (
      not isinstance(key_path, list)
      or not key_path
      or not all(isinstance(key, (str, int)) and not isinstance(key, bool) for key in key_path)
  ):
    raise _FormatError(f"bad leaf path {key_path!r}")
  name = _member_base(tuple(key_path))
  if not isinstance(shape, list) or not all(
      isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
  ):
    raise _FormatError(f"{name}: bad shape {shape!r}")
  if leaf.get("dtype") not in _DTYPES:
    raise _FormatError(f"{name}: unsupported dtype {leaf.get('dtype')!r}")
  encoding = leaf.get("encoding")
  allowed = ("dense",) if len(shape) < 2 else ("bitmask", "bitmask_int8")
  if encoding not in allowed:
    raise _FormatError(f"{name}: bad encoding {encoding!r} for shape {shape}")
  return tuple(key_path), tuple(shape), _DTYPES[leaf["dtype"]], str(encoding)


def _read_member(archive: zipfile.ZipFile, member: str, max_bytes: int, what: str) -> np.ndarray:
  """The array in ``member``, refused unread if it would inflate past ``max_bytes``.

  ``max_bytes`` bounds the array data; the .npy header may add up to
  ``_NPY_HEADER_MAX_BYTES``.
  """
  try:
    info = archive.getinfo(f"{member}.npy")
  except KeyError:
    raise _FormatError(f"missing entry {member!r}") from None
  if info.file_size > max_bytes + _NPY_HEADER_MAX_BYTES:
    raise _FormatError(
        f"{what} is {info.file_size} bytes uncompressed, more than the {max_bytes} bytes "
        f"(+ {_NPY_HEADER_MAX_BYTES} of .npy header) it may hold; not read"
    )
  # Opened by its ZipInfo, so the entry read is the entry checked.
  with archive.open(info) as data:
    return np.lib.format.read_array(data, allow_pickle=False)


def _read_leaf_member(
    archive: zipfile.ZipFile, name: str, role: str, dtype: np.dtype, shape: tuple[int, ...]
) -> np.ndarray:
  """The ``role`` member of leaf ``name``, checked to be ``dtype[shape]``."""
  expected = f"{dtype}{list(shape)}"
  array = _read_member(
      archive,
      f"{name}:{role}",
      math.prod(shape) * dtype.itemsize,
      f"{name}: {role} (expected {expected})",
  )
  if array.dtype != dtype or array.shape != shape:
    raise _FormatError(f"{name}: {role} is {array.dtype}{list(array.shape)}, expected {expected}")
  return array


def _insert(params: dict, key_path: tuple, array: np.ndarray) -> None:
  node = params
  for key in key_path[:-1]:
    node = node.setdefault(key, {})
    if not isinstance(node, dict):
      raise _FormatError(f"{_member_base(key_path)}: a leaf and a subtree share a path")
  if key_path[-1] in node:
    raise _FormatError(f"{_member_base(key_path)}: stored twice")
  node[key_path[-1]] = array
