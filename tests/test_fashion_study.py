"""benchmarks.fashion_study: the grid, paired intervals, the report, and a tiny resumable run."""

import json

import numpy as np
import pytest
from scipy import stats

from benchmarks import fashion_study, regime_study
from experiments import config as config_lib
from tests.test_fashion_mnist import write_fashion_files


def test_grid_starts_with_flipout_and_global_magnitude_paired_seed_by_seed():
  runs = [run for block in fashion_study.STUDY for run in block.runs()]
  assert len({run.name for run in runs}) == len(runs)  # no run twice
  first = runs[:10]
  assert {(run.model, run.sparsity, run.epochs) for run in first} == {("lenet300", 0.999, 40)}
  # Each seed's pair is complete before the next seed starts: a cut leaves whole pairs.
  assert [(run.seed, run.variant) for run in first] == [
      (seed, variant) for seed in range(5) for variant in ("flipout", "global_magnitude")
  ]
  covered = {(run.variant, run.sparsity, run.epochs) for run in runs}
  for variant in fashion_study.ABLATION:
    for sparsity in (0.999, 1 - 2**-8):
      assert (variant, sparsity, 40) in covered and (variant, sparsity, 120) in covered
  assert {run.seed for run in runs} == set(fashion_study.SEEDS)


@pytest.mark.parametrize(
    "variant,method,noise,init",
    [
        ("flipout", "flipout", 1.0, "torch"),
        ("global_magnitude_noise", "global_magnitude", 1.0, "torch"),
        ("flipout_flax_init", "flipout", 1.0, "flax"),
        ("global_magnitude_flax_init", "global_magnitude", 0.0, "flax"),
    ],
)
def test_run_config_is_the_variant_on_fashion_mnist(variant, method, noise, init):
  config = fashion_study.run_config(regime_study.Run("lenet300", variant, 0.999, 3, 120), None)
  config_lib.validate_config(config)
  assert (config.dataset, config.method, config.init) == ("fashion_mnist", method, init)
  assert config_lib.noise_scale_of(config) == noise
  assert config.milestones == (51, 86) and config.seed == 3


def test_paired_interval_is_the_one_sample_t_interval():
  differences = [0.3, -0.1, 0.8, 0.4, 0.2]
  mean, low, high = fashion_study.paired_interval(differences)
  expected = stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
  np.testing.assert_allclose([mean, low, high], [np.mean(differences), *expected])
  assert np.isnan(fashion_study.paired_interval([1.0])[1])


def test_holm_steps_down_keeps_order_and_skips_nan():
  # Sorted: 0.005 x4, 0.01 x3, 0.03 x2, 0.04 x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06.
  adjusted = fashion_study.holm([0.01, 0.04, float("nan"), 0.03, 0.005])
  np.testing.assert_allclose(adjusted, [0.03, 0.06, np.nan, 0.06, 0.02])
  assert fashion_study.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
  assert fashion_study.holm([]) == []


def test_paired_p_value_is_the_one_sample_t_test():
  differences = [0.3, -0.1, 0.8, 0.4, 0.2]
  assert fashion_study.paired_p_value(differences) == pytest.approx(
      stats.ttest_rel(np.add(differences, 1.0), np.ones(5)).pvalue
  )
  assert np.isnan(fashion_study.paired_p_value([1.0]))


def results_of(accuracies):
  """``{variant: [accuracy per seed]}`` at 99.9%, 40 epochs, as stored results."""
  runs = {}
  for variant, values in accuracies.items():
    for seed, accuracy in enumerate(values):
      if accuracy is not None:
        run = regime_study.Run("lenet300", variant, 0.999, seed, 40)
        runs[run.name] = {**run._asdict(), "test_accuracy": accuracy}
  return {"settings": fashion_study._SETTINGS, "runs": runs}


def test_comparisons_pair_by_seed_and_call_ahead_only_outside_zero():
  # Seeds differ by 10 points, flipout is 0.5-0.7 points above global magnitude on each:
  # unpaired, the seeds' spread would hide it; paired, the interval excludes zero.
  base = [0.60, 0.70, 0.80, 0.65, 0.75]
  results = results_of(
      {
          "global_magnitude": base,
          "flipout": [b + d for b, d in zip(base, (0.005, 0.007, 0.006, 0.005))] + [None],
          "flipout_no_noise": [b + d for b, d in zip(base, (0.01, -0.01, 0.02, -0.015, 0.0))],
          "global_magnitude_noise": [b - d for b, d in zip(base, (0.03, 0.02, 0.04, 0.03, 0.02))],
      }
  )
  found = {c.variant: c for c in fashion_study.comparisons(results, fashion_study.STUDY)}
  assert found["flipout"].seeds == 4  # seed 4 has no flipout run: not paired
  np.testing.assert_allclose(found["flipout"].mean, np.mean([0.5, 0.7, 0.6, 0.5]))
  assert found["flipout"].verdict == "ahead"
  assert found["flipout_no_noise"].verdict == "level"
  assert found["global_magnitude_noise"].verdict == "behind"
  assert "global_magnitude" not in found  # the baseline itself
  assert found["flipout"].p_value == pytest.approx(
      stats.ttest_1samp([0.5, 0.7, 0.6, 0.5], 0.0).pvalue
  )
  # Holm over this family (lenet300, 40 epochs: these three comparisons).
  p_values = [found[v].p_value for v in ("flipout", "flipout_no_noise", "global_magnitude_noise")]
  np.testing.assert_allclose(
      [found[v].holm_p for v in ("flipout", "flipout_no_noise", "global_magnitude_noise")],
      fashion_study.holm(p_values),
  )
  assert found["flipout"].holm_p > found["flipout"].p_value
  table = fashion_study.comparison_table(list(found.values()))
  assert "| flipout " in table and "ahead" in table and "[" in table
  assert "Holm p" in table.splitlines()[0]


def test_holm_families_are_one_model_at_one_budget():
  p = {("a", 40): 0.01, ("a", 120): 0.02, ("b", 40): 0.03}
  found = [
      fashion_study.Comparison(
          model, 0.999, epochs, "flipout", "global_magnitude", 5, 1, 0, 2, p_value
      )
      for (model, epochs), p_value in p.items()
  ] + [fashion_study.Comparison("a", 0.99, 40, "snip", "global_magnitude", 5, 1, 0, 2, 0.04)]
  adjusted = [c.holm_p for c in fashion_study._with_holm(found)]
  np.testing.assert_allclose(adjusted, [0.02, 0.02, 0.03, 0.04])


def test_bad_flags_and_absent_data_exit_2_with_one_line(tmp_path, capsys):
  assert fashion_study.main(["--shard=3/2", f"--workdir={tmp_path}"]) == 2
  assert fashion_study.main(["--demo", "--tiny", f"--workdir={tmp_path}"]) == 2
  assert fashion_study.main([f"--workdir={tmp_path}", f"--data_dir={tmp_path / 'none'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3 and all(
      line.startswith("python -m benchmarks.fashion_study") for line in err
  )
  assert "apt-get install dataset-fashion-mnist" in err[2]
  assert not list(tmp_path.glob("results*.json"))


def test_tiny_study_trains_resumes_and_reports(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  write_fashion_files(data, train_size=1280, test_size=64)  # 10 steps of 128
  argv = ["--tiny", f"--workdir={tmp_path / 'study'}", f"--data_dir={data}"]
  assert fashion_study.main(argv) == 0
  out = capsys.readouterr().out
  assert "0 of 4 runs done" in out and "[TINY: not a result]" in out
  stored = json.loads((tmp_path / "study" / "results.json").read_text())
  assert stored["settings"] == fashion_study._SETTINGS and len(stored["runs"]) == 4
  row = next(line for line in out.splitlines() if line.startswith("| lenet300 | 90.00%   | 1 "))
  cells = [cell.strip() for cell in row.strip("|").split("|")]
  assert cells[3:6] == ["flipout", "global_magnitude", "2"]
  verdict, p_value, holm_p = cells[8:]
  assert verdict in ("level", "ahead", "behind")
  assert holm_p == p_value  # a family of one comparison: Holm changes nothing
  assert (tmp_path / "study" / "fashion_study.png").stat().st_size > 0
  assert f"flipout - global_magnitude = {cells[6]} points over 2 paired seeds" in out
  assert ("not distinguishable" if verdict == "level" else verdict) in out

  assert fashion_study.main(argv) == 0  # nothing left to train: the report again
  assert "4 of 4 runs done; 0 to train" in capsys.readouterr().out
