"""experiments.quantize on a briefly trained, 90%-sparse digits run."""

import dataclasses
import json

import pytest

from experiments import digits
from experiments import quantize
from experiments import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits_run")
  config = dataclasses.replace(
      digits.DEFAULTS, epochs=6, sparsity=0.9, method="flipout", workdir=str(workdir)
  )
  summary = train.train(config)
  return workdir, summary


def test_quantized_run_keeps_accuracy_and_sparsity(trained_run, capsys):
  workdir, summary = trained_run
  assert quantize.main(["--workdir", str(workdir), "--calibration_batches", "4"]) == 0
  printed = capsys.readouterr().out
  report = json.loads((workdir / "quantize.json").read_text())
  assert "test accuracy" in printed and "sparse int8" in printed
  assert report["float32_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
  assert abs(report["int8_accuracy"] - report["float32_accuracy"]) <= 0.01
  # Every pruned weight stays an exact zero after quantization.
  assert report["pruned_weights_kept_zero"]
  assert report["prunable_sparsity"] == pytest.approx(summary["sparsity"])
  assert report["int8_sparsity"] >= report["float32_sparsity"] > 0.85
  sizes = report["bytes"]
  assert sizes["sparse_int8"] < sizes["sparse_float32"] < sizes["dense_float32"]
  assert report["calibration_batches"] == 4


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--workdir", "{empty}"], "checkpoints"),
        (["--workdir", "{run}", "--calibration_batches", "0"], "calibration_batches"),
        ([], "--workdir"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained_run, tmp_path, capsys, argv, match):
  workdir, _ = trained_run
  argv = [a.format(empty=tmp_path, run=workdir) for a in argv]
  assert quantize.main(argv) == 2
  error = capsys.readouterr().err
  assert match in error and len(error.strip().splitlines()) == 1 and "Traceback" not in error
