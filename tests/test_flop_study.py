"""benchmarks.flop_study: its command lines, paired comparisons to dense, report and plot."""

import pytest

from benchmarks import flop_study as study


def test_each_run_is_one_experiments_command_line_with_a_flop_target():
  argv = study.flags(study.Run("vgg_small", "taylor@0.7", 3))
  for flag in (
      "--model=vgg_small",
      "--seed=3",
      "--lr=0.01",
      "--method=taylor",
      "--sparsity=0.7",
      "--structure=unit",
      "--unit_cost=flops",
      "--unit_normalize=mean",
      "--unit_round_to=4",
      "--dataset=fashion_mnist",
  ):
    assert flag in argv, argv
  dense = study.flags(study.Run("lenet5", "dense", 0), epochs=1)
  assert "--method=dense" in dense and "--epochs=1" in dense
  assert not any(flag.startswith("--unit_") for flag in dense)


def test_the_study_pairs_every_variant_with_dense_on_each_seed():
  names = {run.name for run in study.STUDY}
  assert len(names) == len(study.STUDY) == 3 * 5 * (1 + 3 * 3)
  for run in study.STUDY:
    assert study.Run(run.model, "dense", run.seed).name in names


def _pruned(accuracy, speedup, removed=0.7):
  return {
      "test_accuracy": accuracy,
      "speedup": speedup,
      "dense_flops": 1000,
      "compact_flops": round(1000 * (1 - removed)),
      "widths": {"conv": [8, 16], "hidden": [32]},
      "compact_parameters": 100,
  }


def _runs():
  return {
      "small_cnn-dense-seed0": {"test_accuracy": 0.90},
      "small_cnn-dense-seed1": {"test_accuracy": 0.91},
      "small_cnn-flipout@0.7-seed0": _pruned(0.89, 2.0),
      "small_cnn-flipout@0.7-seed1": _pruned(0.89, 3.0),
      "small_cnn-taylor@0.7-seed0": _pruned(0.88, 2.5),  # its seed 1 is missing
  }


def test_comparisons_are_paired_differences_to_dense_with_flops_and_speed():
  rows = {(r["model"], r["variant"]): r for r in study.comparisons({"runs": _runs()})}
  flipout = rows[("small_cnn", "flipout@0.7")]
  assert flipout["seeds"] == 2
  assert flipout["difference"] == pytest.approx(-1.5)  # -1 and -2 points
  low, high = flipout["interval"]
  assert low < -1.5 < high
  assert flipout["flops_removed"] == pytest.approx(0.7)
  assert flipout["speedup"] == pytest.approx(2.5)
  assert rows[("small_cnn", "taylor@0.7")]["seeds"] == 1
  assert ("lenet5", "flipout@0.7") not in rows


def test_the_report_and_the_plot(tmp_path):
  text = study.report({"runs": _runs()})
  assert "| small_cnn | flipout@0.7 | 2 | 89.00% | 90.50% | -1.50 [" in text
  assert "| 70.0% | 2.50x |" in text
  study.plot({"runs": _runs()}, tmp_path / "plot.png")
  assert (tmp_path / "plot.png").stat().st_size > 1000


def test_a_bad_shard_exits_2(capsys):
  assert study.main(["--shard=3/2", "--table_only"]) == 2
  assert "--shard must be I/N" in capsys.readouterr().err
