"""experiments.compact on tiny synthetic LeNet-300-100 runs (one pruned, one dense)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import compact

REPORT_KEYS = {
    "dense_parameters",
    "compact_parameters",
    "dense_flops",
    "compact_flops",
    "max_abs_logit_difference",
    "test_accuracy_dense",
    "test_accuracy_compact",
    "dense_ms_per_batch",
    "compact_ms_per_batch",
    "speedup",
}


def test_compact_run_prints_and_writes_the_report(pruned_run, tmp_path, capsys):
  report_file = tmp_path / "compact.json"
  assert compact.main(["--workdir", pruned_run, "--json", str(report_file), "--repeats", "3"]) == 0
  printed = capsys.readouterr().out
  report = json.loads(report_file.read_text())
  assert REPORT_KEYS <= report.keys()
  assert "speedup" in printed and "SYNTHETIC" in printed
  # LeNet-300-100 on 28x28x1, 10 classes: 784*300+300 + 300*100+100 + 100*10+10.
  assert report["dense_parameters"] == 266_610
  assert 0 < report["compact_parameters"] < report["dense_parameters"]
  assert report["dense_flops"] == 2 * (784 * 300 + 300 * 100 + 100 * 10)
  assert 0 < report["compact_flops"] < report["dense_flops"]
  # Same predictions: float32 rounding only (see tests/test_compaction.py for the bound).
  assert report["max_abs_logit_difference"] < 1e-4
  assert report["test_accuracy_compact"] == report["test_accuracy_dense"]
  assert report["batch_size"] == 100 and report["repeats"] == 3
  assert report["dense_ms_per_batch"] > 0 and report["compact_ms_per_batch"] > 0
  assert report["speedup"] > 0
  usage = report["compact_kernels"]
  hidden = report["widths"]["hidden"]
  assert usage["units"] == sum(hidden) + 10
  features = report["widths"]["input_features"]
  entries = (
      (len(features) if features else 784) * hidden[0] + hidden[0] * hidden[1] + hidden[1] * 10
  )
  assert usage["kernel_entries"] == entries
  assert 0 < usage["live_weights"] < usage["kernel_entries"]
  assert "units read one live weight" in printed


def test_program_mode_is_timed_beside_and_removes_at_least_as_much(pruned_run, capsys):
  report = compact.compact_run(pruned_run, repeats=3, program=True)
  assert 0 < report["program_parameters"] <= report["compact_parameters"]
  assert report["program_speedup"] > 0
  print(compact.format_report(report))
  assert "flipout.compact(constants='program')" in capsys.readouterr().out
  assert "program_speedup" not in compact.compact_run(pruned_run, repeats=1)


def test_kernel_usage_counts_live_weights_and_single_input_units():
  layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  # Units 0 and 2 read one live weight, unit 1 reads three, unit 3 none.
  layer.kernel[...] = jnp.array([[1.0, 2, 0, 0], [0, 3, 0, 0], [0, 4, 5, 0]])
  assert compact.kernel_usage(layer) == dict(
      kernel_entries=12, live_weights=5, units=4, single_input_units=2
  )


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--workdir", "{empty}"], "has no checkpoints/ folder"),
        (["--workdir", "{empty}/missing"], "has no checkpoints/ folder"),
        (["--workdir", "{dense}"], "without pruning"),
        (["--workdir", "{pruned}", "--repeats", "0"], "--repeats"),
        (["--workdir", "{pruned}", "--json", "{empty}"], "--json"),
        ([], "--workdir"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(pruned_run, dense_run, tmp_path, capsys, argv, match):
  argv = [arg.format(empty=tmp_path, dense=dense_run, pruned=pruned_run) for arg in argv]
  assert compact.main(argv) == 2
  error = capsys.readouterr().err
  assert len(error.strip().splitlines()) == 1, error
  assert match in error and "Traceback" not in error
  assert error.startswith("python -m experiments.compact: error:")


def test_real_process_prints_one_line_and_no_traceback(dense_run):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.compact", "--workdir", dense_run],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 2
  assert len(result.stderr.splitlines()) == 1 and "without pruning" in result.stderr
