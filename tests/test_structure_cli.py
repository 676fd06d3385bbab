"""The experiments' --structure and --group_score: one-line errors, and runs that prune by
units (the output layer untouched) and by 2:4 (a first conv on one channel left dense)."""

import json

import numpy as np
import pytest

from experiments import mnist
from tests.test_cli import one_error_line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--structure=units"], "--structure must be 'weight', 'unit', 'N:M'"),
        (["--structure=4:2", "--sparsity=0.5"], "0 < N < M"),
        (["--structure=2:4", "--sparsity=0.9"], "give --sparsity=0.5"),
        (["--structure=unit", "--group_score=max"], "--group_score must be one of"),
        (["--structure=unit", "--method=snip"], "applies to the scheduled methods"),
        (["--structure=unit", "--unit_cost=macs"], "--unit_cost must be one of"),
        (["--structure=unit", "--unit_normalize=lamp"], "--unit_normalize must be one of"),
        (["--unit_cost=flops"], "apply to --structure=unit"),
        (["--structure=unit", "--unit_round_to=0"], "--unit_round_to"),
        (["--structure=2:4", "--sparsity=0.5", "--method=dense"], "scheduled methods"),
    ],
)
def test_bad_structure_flags_exit_2_with_one_line(capsys, argv, expected):
  assert mnist.main(["--synthetic", "--epochs=1", *argv]) == 2
  assert expected in one_error_line(capsys)


def _layers(workdir):
  summary = json.loads((workdir / "summary.json").read_text())
  return {layer["path"]: layer for layer in summary["layers"]}, summary


def _run(tmp_path, *flags):
  argv = [
      "--synthetic",
      "--synthetic_train=128",
      "--synthetic_test=64",
      "--batch_size=32",
      "--epochs=3",
      "--no-progress",
      "--no-tensorboard",
      f"--workdir={tmp_path}",
      *flags,
  ]
  assert mnist.main(argv) == 0
  return _layers(tmp_path)


def test_a_unit_run_prunes_whole_hidden_units_and_keeps_the_outputs(tmp_path):
  layers, summary = _run(tmp_path, "--model=lenet300", "--sparsity=0.9", "--structure=unit")
  assert summary["sparsity"] >= 0.9
  kernels = [layer for path, layer in layers.items()]
  head = kernels[-1]
  assert head["outputs"] == 10 and head["dead_outputs"] == 0
  hidden = kernels[:-1]
  assert sum(layer["dead_outputs"] for layer in hidden) > 0
  # Whole units: every live weight of a hidden layer sits in a fully live column.
  for layer in hidden:
    live_units = layer["outputs"] - layer["dead_outputs"]
    assert layer["live"] == live_units * int(np.prod(layer["shape"][:-1]))


def test_a_flop_target_run_prunes_units_of_every_conv_and_empties_none(tmp_path):
  layers, _ = _run(
      tmp_path,
      "--model=lenet5",
      "--sparsity=0.6",
      "--structure=unit",
      "--unit_cost=flops",
      "--unit_normalize=mean",
      "--unit_round_to=2",
      "--method=taylor",
  )
  kernels = list(layers.values())
  assert kernels[-1]["dead_outputs"] == 0  # the logits
  convs = [layer for layer in kernels if len(layer["shape"]) == 4]
  assert len(convs) == 2 and all(layer["dead_outputs"] > 0 for layer in convs)
  assert all(layer["outputs"] > layer["dead_outputs"] for layer in kernels)
  assert all((layer["outputs"] - layer["dead_outputs"]) % 2 == 0 for layer in kernels)


def test_a_two_of_four_run_leaves_a_one_channel_first_conv_dense(tmp_path):
  layers, _ = _run(tmp_path, "--model=lenet5", "--sparsity=0.5", "--structure=2:4")
  first, *others = layers.values()
  assert first["shape"][-2] == 1 and first["sparsity"] == 0.0
  for layer in others:
    assert layer["sparsity"] == 0.5
