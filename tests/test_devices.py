"""Data parallel training: 4 host CPU devices make the same pruning decisions as 1 device.

The 4-device run is a subprocess, because XLA_FLAGS must be set before JAX starts. Both runs
see the same global batches (sharded 16 images per device on 4 devices), the same
augmentation and noise (the random bits do not depend on the sharding), so they compute the
same function; only the order in which the gradient sums over the batch are rounded
differs (per-device partial sums, then an all-reduce). The masks must be identical; metrics
and weights agree to float32 rounding, which over a longer run could drift further (the
differences feed back through training), so the run is kept short and the tolerance stated.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import cli, digits
from tests import saved_runs

_ARGS = [
    "--method=flipout",
    "--sparsity=0.9",
    "--epochs=3",
    "--batch_size=64",
    "--no-progress",
    "--no-tensorboard",
]
_FOUR_DEVICES = """
import sys
import jax
from experiments import checkpoints, cli, digits
assert jax.device_count() == 4, jax.devices()
argv = sys.argv[1:]
# 62 images cannot be split evenly over 4 devices: a one-line error, exit status 2.
assert cli.main([*argv, "--batch_size=62"], digits.DEFAULTS, ("lenet300",)) == 2
sys.exit(cli.main(argv, digits.DEFAULTS, ("lenet300",)))
"""
# Rounding-level agreement of a 3-epoch (66-step) float32 run.
_WEIGHT_RTOL, _WEIGHT_ATOL = 1e-4, 1e-5
_LOSS_RTOL = 1e-4


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_four_devices_prune_like_one(tmp_path):
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": (
          os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
      ).strip(),
  }
  four = tmp_path / "four"
  # The 4-device run goes alongside the 1-device run of this process.
  process = subprocess.Popen(
      [sys.executable, "-c", _FOUR_DEVICES, *_ARGS, f"--workdir={four}"],
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  assert jax.device_count() == 1
  one = tmp_path / "one"
  assert cli.main([*_ARGS, f"--workdir={one}"], digits.DEFAULTS, ("lenet300",)) == 0
  _, errors = process.communicate(timeout=600)
  assert process.returncode == 0, errors
  assert "--batch_size=62 must be divisible by the 4 devices" in errors

  summaries = [json.loads((run / "summary.json").read_text()) for run in (one, four)]
  assert [summary["devices"] for summary in summaries] == [1, 4]
  arrays_one, arrays_four = saved_runs.final_arrays(one), saved_runs.final_arrays(four)
  params_one, masks_one = arrays_one["params"], arrays_one["masks"]
  params_four, masks_four = arrays_four["params"], arrays_four["masks"]
  assert len(masks_one) == 3
  for mask_one, mask_four in zip(masks_one, masks_four):
    np.testing.assert_array_equal(mask_one, mask_four)
  assert summaries[0]["sparsity"] == summaries[1]["sparsity"] == 0.9
  for weights_one, weights_four in zip(params_one, params_four):
    np.testing.assert_allclose(weights_four, weights_one, rtol=_WEIGHT_RTOL, atol=_WEIGHT_ATOL)
  for record_one, record_four in zip(_metrics(one), _metrics(four), strict=True):
    assert record_four["train_loss"] == pytest.approx(record_one["train_loss"], rel=_LOSS_RTOL)
    assert record_four["test_loss"] == pytest.approx(record_one["test_loss"], rel=_LOSS_RTOL)
    # At most one of the 360 test images may change its predicted class.
    assert abs(record_four["test_accuracy"] - record_one["test_accuracy"]) <= 1 / 360 + 1e-9
    assert record_four["sparsity"] == record_one["sparsity"]
