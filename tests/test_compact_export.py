"""A compact model on disk: ``experiments.model_export`` round trips, and
``experiments.quantize --compact`` on a tiny synthetic pruned LeNet-300-100 run.

Models for the round trips are built abstractly and filled with random pruned weights, dead
units and non-trivial BatchNorm statistics (``tests/test_compaction.py``), then compacted.
"""

import json

import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

import flipout_jax as flipout
from experiments import compaction
from experiments import model_export
from experiments import models
from experiments import quantize
from tests.test_compaction import images_for, logits, named, random_model

TOLERANCE = 1e-5
FAMILIES = [
    ("lenet5", (28, 28, 1), 0.95),
    ("conv6", (8, 8, 3), 0.9),
    ("resnet18", (8, 8, 3), 0.9),
]


def compact_export(tmp_path, name, input_shape, sparsity, int8=False):
  """A random pruned ``name``, its compact form, and the folder it was exported to."""
  dense = random_model(named(name, input_shape), sparsity)
  compacted = compaction.compact(dense, input_shape)
  model_export.write_description(
      tmp_path, name=name, input_shape=input_shape, num_classes=3, widths=compacted.widths
  )
  file = "sparse_int8.npz" if int8 else "sparse_float32.npz"
  flipout.export(model_export.inference_state(compacted.model), tmp_path / file, int8=int8)
  return dense, compacted, file


@pytest.mark.parametrize("name, input_shape, sparsity", FAMILIES)
def test_compact_export_loads_back_with_the_same_logits(tmp_path, name, input_shape, sparsity):
  dense, compacted, file = compact_export(tmp_path, name, input_shape, sparsity)
  loaded = model_export.load_model(tmp_path, file)
  assert model_export.read_description(tmp_path).widths == compacted.widths
  assert compaction.parameter_count(loaded) == compaction.parameter_count(compacted.model)
  assert compaction.parameter_count(loaded) < compaction.parameter_count(dense)
  images = images_for(input_shape)
  expected = logits(dense, images)
  np.testing.assert_allclose(
      logits(loaded, images), expected, rtol=0, atol=TOLERANCE * max(1.0, np.abs(expected).max())
  )


def test_int8_compact_export_keeps_zeros_and_is_close(tmp_path):
  dense, compacted, file = compact_export(tmp_path, "lenet5", (28, 28, 1), 0.9, int8=True)
  loaded = model_export.load_model(tmp_path, file)
  flat = lambda model: traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  exact, int8 = flat(compacted.model), flat(loaded)
  for path, leaf in exact.items():
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(np.asarray(int8[path]) == 0, leaf == 0, err_msg=str(path))
  images = images_for((28, 28, 1))
  expected, got = logits(dense, images), logits(loaded, images)
  # Each weight moves by at most one per-channel step (1/127 of the channel's largest).
  assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
  assert np.abs(got - expected).max() > 0  # it is int8, not the float32 file


def test_export_that_does_not_fit_the_description_is_refused(tmp_path):
  compact_export(tmp_path, "lenet5", (28, 28, 1), 0.95)
  # The reference widths do not fit the compact arrays: named, not a shape error from deep down.
  model_export.write_description(tmp_path, name="lenet5", input_shape=(28, 28, 1), num_classes=3)
  with pytest.raises(ValueError, match="head/layers/0/kernel|blocks/0/conv"):
    model_export.load_model(tmp_path, "sparse_float32.npz")


@pytest.mark.parametrize(
    "content, match",
    [
        ("not json", "not JSON"),
        ('{"format": "other"}', "not a model description"),
        (
            '{"format": "flipout_jax.experiments.model", "version": 1, "model": "lenet300", '
            '"input_shape": [28, 28, 1], "num_classes": 10, "widths": {"conv": [], "wide": [3]}}',
            "widths of lenet300",
        ),
    ],
)
def test_malformed_description_is_refused(tmp_path, content, match):
  (tmp_path / model_export.DESCRIPTION_FILE).write_text(content)
  with pytest.raises(ValueError, match=match):
    model_export.read_description(tmp_path)


def test_description_that_builds_no_model_is_not_written(tmp_path):
  with pytest.raises(ValueError):
    model_export.write_description(
        tmp_path,
        name="lenet300",
        input_shape=(28, 28, 1),
        num_classes=10,
        widths=models.PlainWidths(conv=(), hidden=(0, 3)),
    )
  assert not (tmp_path / model_export.DESCRIPTION_FILE).exists()


def test_quantize_compact_reports_the_compact_model(pruned_run, capsys):
  argv = ["--workdir", pruned_run, "--calibration_batches", "2"]
  assert quantize.main(argv) == 0
  assert quantize.main([*argv, "--compact"]) == 0
  printed = capsys.readouterr().out
  full = json.loads(open(f"{pruned_run}/quantize.json").read())
  small = json.loads(open(f"{pruned_run}/quantize_compact.json").read())
  assert "compact:" in printed and not full["compact"] and small["compact"]
  assert small["export"].endswith("export_compact") and full["export"].endswith("export")
  # The compact model is what was quantized and exported: fewer parameters, smaller files.
  assert small["parameters"] < full["parameters"] == 266_610
  for kind in ("dense_float32", "sparse_float32", "sparse_int8"):
    assert small["bytes"][kind] < full["bytes"][kind], kind
  # Same float32 predictions; the int8 accuracy is the compact model's own.
  assert small["float32_accuracy"] == full["float32_accuracy"]
  assert abs(small["int8_accuracy"] - small["float32_accuracy"]) <= 0.05
  assert small["pruned_weights_kept_zero"]
  # Compaction removed units that were all zeros: the compact kernels are denser.
  assert small["float32_sparsity"] < full["float32_sparsity"]
  # The export rebuilds the compact model: its widths are recorded and it loads back.
  description = model_export.read_description(small["export"])
  assert model_export.widths_to_json(description.widths) == small["widths"]
  reloaded = model_export.load_model(small["export"], "sparse_float32.npz")
  assert compaction.parameter_count(reloaded) == small["parameters"]
  assert abs(small["export_int8_accuracy"] - small["float32_accuracy"]) <= 0.05


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--workdir", "{dense}", "--compact"], "needs a pruned run"),
        (["--workdir", "{empty}", "--compact"], "checkpoints"),
    ],
)
def test_quantize_compact_bad_input_is_one_line_and_exit_2(
    dense_run, tmp_path, capsys, argv, match
):
  argv = [arg.format(empty=tmp_path, dense=dense_run) for arg in argv]
  assert quantize.main(argv) == 2
  error = capsys.readouterr().err
  assert len(error.strip().splitlines()) == 1, error
  assert match in error and "Traceback" not in error
