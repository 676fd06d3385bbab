"""Property-based fuzzing of the readers of files a user hands in: ``flipout.load``, the
model-export reader (``model.json``) and ``metrics.jsonl``.

Truncated, bit-flipped, overwritten, oversized and structurally odd files must raise
ValueError (the trainer's ConfigError for the metrics log, one line and exit 2 through the
command line), never another exception; ``flipout.load`` of a damaged few-kB file allocates
under 4 MiB (its size checks bound every inflation). Each property runs a fixed, derandomized
set of examples, so CI cannot flake.
"""

import json
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flipout_jax as flipout
from experiments import config as config_lib
from experiments import logs, model_export, models

_FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_ALLOCATION_BOUND = 4 * 2**20

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _export_bytes(tmp_path, int8: bool, compress: bool) -> bytes:
  grid = np.arange(48).reshape(6, 8)
  params = {
      "dense": {
          "kernel": (np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8) * (grid % 3 == 0)),
          "bias": np.ones(8, np.float32),
      },
      "head": {"kernel": np.zeros((8, 2), np.float32)},
  }
  path = tmp_path / f"export-{int8}-{compress}.npz"
  flipout.export(params, path, int8=int8, compress=compress)
  return path.read_bytes()


@st.composite
def _damaged(draw, good: bytes) -> bytes:
  """``good`` truncated, bit-flipped (anywhere, or in a zip header), overwritten, or with
  bytes appended."""
  data = bytearray(good)
  kind = draw(st.sampled_from(["truncate", "flip", "flip_header", "overwrite", "append"]))
  if kind == "flip_header":  # the version, flag and method fields zipfile dispatches on
    headers = [i for i in range(len(data) - 46) if data[i : i + 2] == b"PK"]
    start = draw(st.sampled_from(headers))
    data[start + draw(st.integers(4, 11))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)
  if kind == "truncate":
    return bytes(data[: draw(st.integers(0, len(data) - 1))])
  if kind == "flip":
    for _ in range(draw(st.integers(1, 4))):
      data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)
  if kind == "overwrite":
    start = draw(st.integers(0, len(data) - 1))
    patch = draw(st.binary(min_size=1, max_size=16))[: len(data) - start]
    data[start : start + len(patch)] = patch
    return bytes(data)
  return bytes(data) + draw(st.binary(min_size=1, max_size=64))


def _load_bounded(path):
  """``flipout.load(path)``, asserting it allocated under the bound."""
  tracemalloc.start()
  try:
    return flipout.load(path)
  finally:
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < _ALLOCATION_BOUND, peak


@pytest.mark.parametrize("int8, compress", [(False, True), (True, False)])
def test_a_damaged_export_is_a_value_error(tmp_path, int8, compress):
  good = _export_bytes(tmp_path, int8, compress)
  path = tmp_path / "damaged.npz"

  @_FUZZ
  @given(_damaged(good))
  def load_damaged(data):
    path.write_bytes(data)
    try:
      _load_bounded(path)  # a harmless change (an appended tail) may still load
    except ValueError as error:
      assert str(error).startswith(f"{os.fspath(path)}: not a flipout_jax export")

  load_damaged()


def _npz_with_manifest(path, manifest, members):
  np.savez(path, __flipout_jax_export__=np.asarray(manifest), **members)


@_FUZZ
@given(
    manifest=st.one_of(
        _JSON.map(json.dumps),
        st.fixed_dictionaries(
            {"format": st.just("flipout_jax.export"), "version": st.integers(0, 3)},
            optional={"leaves": st.lists(_JSON, max_size=3)},
        ).map(json.dumps),
        st.text(max_size=40),
    ),
    members=st.dictionaries(
        st.sampled_from(["a.values", "a.mask", "dense.kernel.values"]),
        st.sampled_from(
            [np.zeros(3, np.float32), np.zeros((2, 2), np.int8), np.asarray("x"), np.zeros(0)]
        ),
        max_size=2,
    ),
)
def test_an_archive_with_an_odd_manifest_is_a_value_error(tmp_path, manifest, members):
  path = tmp_path / "odd.npz"
  _npz_with_manifest(path, manifest, members)
  try:
    _load_bounded(path)
  except ValueError:
    pass


@_FUZZ
@given(content=st.one_of(_JSON.map(json.dumps), st.binary(max_size=64).map(repr)))
def test_an_odd_model_description_is_a_value_error(tmp_path, content):
  (tmp_path / model_export.DESCRIPTION_FILE).write_text(content)
  with pytest.raises(ValueError):
    model_export.read_description(tmp_path)


@_FUZZ
@given(
    fields=st.fixed_dictionaries(
        {
            "format": st.just(model_export._FORMAT),
            "version": st.just(model_export._FORMAT_VERSION),
            "model": st.sampled_from(models.MODEL_NAMES),
        },
        optional={
            "input_shape": st.one_of(_JSON, st.lists(st.integers(-3, 40), max_size=4)),
            "num_classes": st.one_of(_JSON, st.floats()),
            "widths": _JSON,
        },
    )
)
def test_a_description_with_odd_fields_is_a_value_error_or_a_description(tmp_path, fields):
  (tmp_path / model_export.DESCRIPTION_FILE).write_text(json.dumps(fields))
  try:
    model_export.read_description(tmp_path)
  except ValueError:
    pass


def test_deeply_nested_json_is_a_value_error(tmp_path):
  deep = "[" * 100_000 + "]" * 100_000
  (tmp_path / model_export.DESCRIPTION_FILE).write_text(deep)
  with pytest.raises(ValueError):
    model_export.read_description(tmp_path)
  (tmp_path / logs.METRICS_FILE).write_text(deep + "\n" + '{"epoch": 1}\n')
  with pytest.raises(config_lib.ConfigError):
    logs.read_records(tmp_path / logs.METRICS_FILE)


_RECORD = {"epoch": 1, "step": 8, "train_loss": 0.5, "test_accuracy": 0.25}


@_FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.just(json.dumps(_RECORD).encode()),
            _JSON.map(lambda value: json.dumps(value).encode()),
            st.fixed_dictionaries({"epoch": _JSON}).map(lambda value: json.dumps(value).encode()),
            st.binary(max_size=24),
        ),
        max_size=5,
    )
)
def test_a_damaged_metrics_log_is_records_or_one_config_error(tmp_path, lines):
  path = tmp_path / logs.METRICS_FILE
  path.write_bytes(b"\n".join(lines))
  try:
    records = logs.read_records(path)
  except config_lib.ConfigError as error:
    assert "\n" not in config_lib.one_line(error)
    return
  for record in records:
    assert isinstance(record, dict) and type(record["epoch"]) is int
    logs._truncate_metrics(path, last_epoch=1)  # what a resumed run does with them
