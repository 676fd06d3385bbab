"""Tests of the compact export of pruned params (flipout_jax/_src/export.py)."""

import io
import json
import os
import pickle
import tempfile
import time
import tracemalloc
import zipfile

from hypothesis import given, settings, strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from flipout_jax._src import export as export_lib

# Set by _Exploit.__reduce__ when unpickled: must stay empty.
_EXPLOITED = []


def _run_exploit():
  _EXPLOITED.append("code from the file ran")


class _Exploit:

  def __reduce__(self):
    return _run_exploit, ()


def _sparse(rng, shape, sparsity, dtype=np.float32):
  """Normal weights with exactly round(sparsity * size) zeros."""
  weights = rng.normal(size=shape).astype(dtype)
  flat = weights.reshape(-1)
  flat[rng.permutation(flat.size)[: round(sparsity * flat.size)]] = 0
  return weights


def _params(rng, sparsity=0.95):
  """A Linen-like tree plus an nnx-like branch with int keys."""
  return {
      "conv": {
          "kernel": _sparse(rng, (3, 3, 4, 8), sparsity),
          "bias": rng.normal(size=(8,)).astype(np.float32),
      },
      "bn": {"scale": np.ones(8, np.float32), "mean": np.zeros(8, np.float32)},
      "layers": {
          0: {"kernel": _sparse(rng, (32, 10), sparsity)},
          1: {"kernel": jnp.asarray(_sparse(rng, (10, 10), sparsity), jnp.bfloat16)},
      },
  }


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _assert_bit_equal(expected, actual):
  expected_leaves, actual_leaves = dict(_flat(expected)), dict(_flat(actual))
  assert expected_leaves.keys() == actual_leaves.keys()
  for path, leaf in expected_leaves.items():
    leaf = np.asarray(leaf)
    assert actual_leaves[path].dtype == leaf.dtype, path
    assert actual_leaves[path].shape == leaf.shape, path
    assert actual_leaves[path].tobytes() == leaf.tobytes(), path


def test_float32_round_trip_is_bit_exact(tmp_path):
  params = _params(np.random.default_rng(0))
  path = tmp_path / "model.npz"
  written = export_lib.export(params, path)
  assert written == os.path.getsize(path)
  _assert_bit_equal(params, export_lib.load(path))


def test_round_trip_keeps_int_keys_and_str_keys_apart(tmp_path):
  params = {
      "layers": {0: {"w": np.ones((2, 2), np.float32)}},
      "0": {"w": np.zeros((2, 2), np.float32)},
  }
  export_lib.export(params, tmp_path / "m.npz")
  loaded = export_lib.load(tmp_path / "m.npz")
  assert list(loaded["layers"]) == [0] and "0" in loaded


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    int8=st.booleans(),
)
def test_round_trip_over_shapes_and_sparsities(shape, sparsity, seed, int8):
  weights = _sparse(np.random.default_rng(seed), tuple(shape), sparsity)
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "m.npz")
    export_lib.export({"w": weights}, path, int8=int8)
    loaded = export_lib.load(path)["w"]
  assert loaded.shape == weights.shape and loaded.dtype == weights.dtype
  if not int8:
    np.testing.assert_array_equal(loaded, weights)
  else:
    _assert_within_half_step(weights, loaded)


def _assert_within_half_step(weights, loaded):
  """|w - w_int8| <= scale_c / 2 with scale_c = max|w[..., c]| / 127.

  A live weight below half a step is kept at +-1 step instead of rounding to
  zero, so its error is below one step and the zeros are exactly the same.
  """
  reduce_axes = tuple(range(weights.ndim - 1)) if weights.ndim >= 2 else ()
  scale = np.abs(weights).max(axis=reduce_axes, keepdims=True) / 127 if reduce_axes else 0
  error = np.abs(loaded.astype(np.float64) - weights)
  bound = np.where(np.abs(weights) < scale / 2, scale, scale / 2)
  # 1e-6 relative slack for the float32 rounding of q * scale.
  assert np.all(error <= bound * (1 + 1e-6) + 1e-30)
  np.testing.assert_array_equal(loaded == 0, weights == 0)


def test_int8_round_trip_within_half_a_step_and_zeros_kept(tmp_path):
  rng = np.random.default_rng(1)
  # Live magnitudes in [0.1, 1] and channel maxima <= 1: no live weight is
  # below half a step (1 / 254), so the sparsity must be exactly identical.
  magnitudes = rng.uniform(0.1, 1.0, size=(5, 5, 16, 32)).astype(np.float32)
  weights = magnitudes * rng.choice([-1, 1], size=magnitudes.shape).astype(np.float32)
  weights[rng.random(weights.shape) < 0.9] = 0
  export_lib.export({"conv": {"kernel": weights}}, tmp_path / "q.npz", int8=True)
  loaded = export_lib.load(tmp_path / "q.npz")["conv"]["kernel"]
  _assert_within_half_step(weights, loaded)
  np.testing.assert_array_equal(loaded == 0, weights == 0)
  # Not a float32 copy: values really went through 255 levels per channel.
  assert len(np.unique(np.abs(loaded[..., 0]))) <= 128
  assert not np.array_equal(loaded, weights)


def test_int8_keeps_tiny_live_weights_live(tmp_path):
  weights = np.zeros((4, 3), np.float32)
  weights[0] = 1.0
  weights[1] = [1e-4, -1e-6, 3e-3]  # far below half a step (1 / 254)
  export_lib.export({"w": weights}, tmp_path / "t.npz", int8=True)
  loaded = export_lib.load(tmp_path / "t.npz")["w"]
  np.testing.assert_array_equal(loaded == 0, weights == 0)
  np.testing.assert_allclose(loaded[1], np.sign(weights[1]) / 127, rtol=1e-6)


def test_int8_keeps_dense_leaves_exact_and_all_zero_channels_zero(tmp_path):
  weights = np.zeros((4, 3), np.float32)
  weights[:, 1] = [0.5, -1.0, 0.0, 0.25]
  bias = np.array([0.1, -0.2, 0.3], np.float32)
  export_lib.export({"w": weights, "b": bias}, tmp_path / "q.npz", int8=True)
  loaded = export_lib.load(tmp_path / "q.npz")
  np.testing.assert_array_equal(loaded["b"], bias)
  assert np.all(np.isfinite(loaded["w"]))
  np.testing.assert_array_equal(loaded["w"][:, [0, 2]], 0)
  _assert_within_half_step(weights, loaded["w"])


@pytest.mark.parametrize("int8", [False, True])
def test_file_size_follows_the_live_count_at_99_percent(tmp_path, int8):
  rng = np.random.default_rng(2)
  size = 400 * 1000
  weights = _sparse(rng, (400, 1000), 0.99)
  live = int((weights != 0).sum())
  dense_bytes = 4 * size
  written = export_lib.export({"w": weights}, tmp_path / "m.npz", int8=int8, compress=False)
  value_bytes = live * (1 if int8 else 4) + (4 * 1000 if int8 else 0)
  # Uncompressed: bitmask + values (+ scales) + a few KiB of zip and npy headers.
  assert written <= size / 8 + value_bytes + 4096
  compressed = export_lib.export({"w": weights}, tmp_path / "c.npz", int8=int8)
  assert compressed < 0.05 * dense_bytes
  assert compressed <= written


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
  path = tmp_path / "m.npz"
  path.write_bytes(b"old contents")
  with pytest.raises(TypeError):
    export_lib.export({"w": "not an array"}, path)
  assert path.read_bytes() == b"old contents"
  export_lib.export({"w": np.ones((2, 2), np.float32)}, path)
  assert sorted(os.listdir(tmp_path)) == ["m.npz"]


@pytest.mark.parametrize(
    "params, match",
    [
        ([np.ones(2)], "params must be a nested dict"),
        ({"w": [1.0, 2.0]}, "leaf 'w' is a list"),
        ({"w": np.ones((2, 2), np.int32)}, "leaf 'w' has dtype int32"),
        ({"a": {(1, 2): np.ones(2)}}, "must be a str or an int"),
    ],
)
def test_export_refuses_other_structures_with_type_error(tmp_path, params, match):
  with pytest.raises(TypeError, match=match):
    export_lib.export(params, tmp_path / "m.npz")


@pytest.mark.parametrize(
    "params, match",
    [
        ({"a/b": np.ones(2)}, "contains '/'"),
        ({"layers": {0: np.ones(2), "0": np.ones(2)}}, "two keys print as '0'"),
    ],
)
def test_export_refuses_ambiguous_keys(tmp_path, params, match):
  with pytest.raises(ValueError, match=match):
    export_lib.export(params, tmp_path / "m.npz")


def _assert_refused(path, reason):
  with pytest.raises(ValueError, match=f"not a flipout_jax export: .*{reason}") as info:
    export_lib.load(path)
  assert str(info.value).startswith(str(path))


def test_truncated_and_corrupted_files_are_refused(tmp_path):
  good = tmp_path / "good.npz"
  export_lib.export(_params(np.random.default_rng(3)), good)
  contents = good.read_bytes()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(contents[: len(contents) // 2])
  _assert_refused(truncated, "")
  corrupted = tmp_path / "corrupted.npz"
  middle = len(contents) // 3
  corrupted.write_bytes(contents[:middle] + bytes(64) + contents[middle + 64 :])
  _assert_refused(corrupted, "")
  empty = tmp_path / "empty.npz"
  empty.write_bytes(b"")
  _assert_refused(empty, "")


def test_pickle_files_are_refused_without_running_code(tmp_path):
  path = tmp_path / "evil.npz"
  with open(path, "wb") as file:
    pickle.dump({"w": _Exploit()}, file)
  _assert_refused(path, "pickle")
  assert not _EXPLOITED


def test_object_arrays_inside_the_archive_are_never_unpickled(tmp_path):
  path = tmp_path / "evil.npz"
  manifest = {
      "format": export_lib.FORMAT_NAME,
      "version": export_lib.FORMAT_VERSION,
      "leaves": [{"path": ["b"], "shape": [1], "dtype": "float32", "encoding": "dense"}],
  }
  payload = np.empty(1, dtype=object)
  payload[0] = _Exploit()
  np.savez(path, **{"__flipout_jax_export__": np.array(json.dumps(manifest)), "b:values": payload})
  _assert_refused(path, "")
  assert not _EXPLOITED


def test_other_npz_and_npy_files_are_refused(tmp_path):
  other = tmp_path / "other.npz"
  np.savez(other, weights=np.ones((3, 3)))
  _assert_refused(other, "manifest")
  single = tmp_path / "single.npy"
  np.save(single, np.ones(3))
  _assert_refused(single, "npy")


def _rewrite(path, edit_manifest=None, edit_members=None):
  """Loads the raw members of an export, edits them and writes them back."""
  with np.load(path) as archive:
    members = {name: archive[name] for name in archive.files}
  manifest = json.loads(str(members["__flipout_jax_export__"]))
  if edit_manifest:
    edit_manifest(manifest)
  if edit_members:
    edit_members(members)
  members["__flipout_jax_export__"] = np.array(json.dumps(manifest))
  np.savez(path, **members)


def _set(key, value):
  return lambda manifest: manifest["leaves"][0].__setitem__(key, value)


@pytest.mark.parametrize(
    "edit_manifest, edit_members, reason",
    [
        (lambda m: m.__setitem__("version", 99), None, "unsupported format version 99"),
        (lambda m: m.__setitem__("format", "else"), None, "does not name the format"),
        (None, lambda a: a.pop("w:values"), "missing entry 'w:values'"),
        (None, lambda a: a.__setitem__("w:values", a["w:values"][:-1]), "w: values is float32"),
        (None, lambda a: a.__setitem__("w:mask", a["w:mask"][:-1]), "w: mask is uint8"),
        (_set("shape", [5, 7]), None, "w: mask is uint8"),
        (_set("shape", [4, -1]), None, "bad shape"),
        (_set("dtype", "object"), None, "unsupported dtype 'object'"),
        (_set("encoding", "dense"), None, "bad encoding 'dense'"),
        (_set("path", []), None, "bad leaf path"),
    ],
)
def test_manifest_and_member_mismatches_are_refused(tmp_path, edit_manifest, edit_members, reason):
  path = tmp_path / "m.npz"
  export_lib.export({"w": _sparse(np.random.default_rng(4), (4, 6), 0.5)}, path)
  _rewrite(path, edit_manifest, edit_members)
  _assert_refused(path, reason)


def test_missing_file_is_a_file_not_found_error(tmp_path):
  with pytest.raises(FileNotFoundError):
    export_lib.load(tmp_path / "absent.npz")


def _npy_header(dtype: str, shape: tuple) -> bytes:
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {"descr": dtype, "fortran_order": False, "shape": shape}
  )
  return header.getvalue()


def _write_bomb(path, member: str, header: bytes, num_bytes: int, manifest=None) -> None:
  """An .npz whose `member` inflates to `num_bytes` of zeros, written in chunks.

  The archive stays small (zeros deflate ~200:1 even at level 1) and so does the
  memory of writing it.
  """
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
    if manifest is not None:
      text = io.BytesIO()
      np.save(text, np.array(json.dumps(manifest)))
      archive.writestr(f"{export_lib._MANIFEST_KEY}.npy", text.getvalue())
    with archive.open(f"{member}.npy", "w", force_zip64=True) as file:
      file.write(header)
      chunk = bytes(1 << 22)
      for start in range(0, num_bytes, len(chunk)):
        file.write(chunk[: num_bytes - start])


class _OpenedMembers:
  """Records the names of the zip members opened for reading."""

  def __init__(self, monkeypatch):
    self.names = []
    original = zipfile.ZipFile.open

    def open_and_record(archive, name, mode="r", *args, **kwargs):
      if mode == "r":
        self.names.append(getattr(name, "filename", name))
      return original(archive, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_and_record)


def _load_measured(path):
  """(the ValueError load raised, peak traced bytes, seconds)."""
  tracemalloc.start()
  started = time.perf_counter()
  try:
    with pytest.raises(ValueError, match="not a flipout_jax export") as info:
      export_lib.load(path)
    return info.value, tracemalloc.get_traced_memory()[1], time.perf_counter() - started
  finally:
    tracemalloc.stop()


def test_a_member_larger_than_its_manifest_entry_is_refused_before_inflating(tmp_path, monkeypatch):
  # The manifest says b holds one float32; its member claims (and inflates to) 400 MB.
  path = tmp_path / "bomb.npz"
  manifest = {
      "format": export_lib.FORMAT_NAME,
      "version": export_lib.FORMAT_VERSION,
      "leaves": [{"path": ["b"], "shape": [1], "dtype": "float32", "encoding": "dense"}],
  }
  _write_bomb(path, "b:values", _npy_header("<f4", (100_000_000,)), 400_000_000, manifest)
  assert os.path.getsize(path) < 4_000_000
  opened = _OpenedMembers(monkeypatch)
  error, peak, seconds = _load_measured(path)
  assert "b:values.npy" not in opened.names  # refused from the zip directory, unread
  assert peak < 20_000_000, f"{peak / 1e6:.0f} MB allocated to refuse it"
  assert seconds < 5
  assert "b: values" in str(error) and "bytes uncompressed" in str(error)


def test_an_oversized_manifest_is_refused_before_inflating(tmp_path, monkeypatch):
  path = tmp_path / "bomb.npz"
  size = 100_000_000  # 25M UCS-4 characters, over the manifest bound
  _write_bomb(path, export_lib._MANIFEST_KEY, _npy_header("<U25000000", ()), size)
  opened = _OpenedMembers(monkeypatch)
  error, peak, _ = _load_measured(path)
  assert f"{export_lib._MANIFEST_KEY}.npy" not in opened.names
  assert peak < 20_000_000, f"{peak / 1e6:.0f} MB allocated to refuse it"
  assert "manifest entry is 100000" in str(error) and "bytes uncompressed" in str(error)


@pytest.mark.parametrize("source, alias", [(0, ["a/b"]), (1, ["x", "0"])], ids=["slash", "int"])
def test_leaves_naming_the_same_members_are_refused(tmp_path, source, alias):
  # ["a", "b"] and ["a/b"], or ["x", 0] and ["x", "0"], name the same members: one
  # member must not load as several leaves (a small file would load many times its size).
  path = tmp_path / "m.npz"
  kernel = _sparse(np.random.default_rng(5), (4, 6), 0.5)
  export_lib.export({"a": {"b": kernel}, "x": {0: np.ones(3, np.float32)}}, path)
  _rewrite(path, lambda m: m["leaves"].append({**m["leaves"][source], "path": alias}))
  _assert_refused(path, "stored twice")


def test_a_member_that_is_not_an_npy_array_is_refused(tmp_path):
  path = tmp_path / "m.npz"
  manifest = {
      "format": export_lib.FORMAT_NAME,
      "version": export_lib.FORMAT_VERSION,
      "leaves": [{"path": ["b"], "shape": [2], "dtype": "float32", "encoding": "dense"}],
  }
  with zipfile.ZipFile(path, "w") as archive:
    text = io.BytesIO()
    np.save(text, np.array(json.dumps(manifest)))
    archive.writestr(f"{export_lib._MANIFEST_KEY}.npy", text.getvalue())
    archive.writestr("b:values.npy", b"eight by")
  _assert_refused(path, "")
