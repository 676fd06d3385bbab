"""benchmarks.regime_study: the grid, the lean loop on real data (tiny), table and resume."""

import json

import pytest

from benchmarks import regime_study
from experiments import config as config_lib
from experiments import input_pipeline


def test_grid_puts_the_priorities_first():
  first = regime_study.STUDY[0]
  assert first.model == "lenet300" and set(first.budgets) == {10, 40, 120}
  assert {"flipout", "flipout_no_noise", "global_magnitude", "global_magnitude_noise"} <= set(
      first.variants
  )
  runs = first.runs()
  assert [run.epochs for run in runs] == sorted(run.epochs for run in runs)  # short ones first
  assert sum(run.variant == "dense" for run in runs) == 3 * 3  # once per budget and seed


@pytest.mark.parametrize(
    "variant,method,noise",
    [
        ("flipout", "flipout", 1.0),
        ("flipout_no_noise", "flipout", 0.0),
        ("global_magnitude", "global_magnitude", 0.0),
        ("global_magnitude_noise", "global_magnitude", 1.0),
    ],
)
def test_run_config_has_the_variants_noise_and_the_papers_lr_shape(variant, method, noise):
  run = regime_study.Run("lenet300", variant, 0.999, 1, 120)
  config = regime_study.run_config(run, "/data")
  config_lib.validate_config(config)
  assert (config.method, config_lib.noise_scale_of(config)) == (method, noise)
  assert config.milestones == (51, 86) and config.data_seed == 0 and config.seed == 1


def test_cubic_variant_runs_the_cubic_schedule():
  config = regime_study.run_config(regime_study.Run("lenet300", "flipout_cubic", 0.999, 0, 40), "")
  assert config.schedule == "cubic" and config_lib.noise_scale_of(config) == 1.0


@pytest.mark.parametrize("argv", [["--shard=2/2"], ["--shard=a"], ["--models=vgg19"]])
def test_bad_flags_exit_2_with_one_line(argv, capsys, tmp_path):
  assert regime_study.main([*argv, f"--workdir={tmp_path}", "--table_only"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("python -m benchmarks.regime_study: error:")


def test_table_marks_the_best_pruned_mean_per_budget(tmp_path):
  runs = {}
  for variant, accuracies in (("flipout", (0.8, 0.9, 0.7)), ("global_magnitude", (0.5, 0.6, 0.7))):
    for seed, accuracy in enumerate(accuracies):
      run = regime_study.Run("lenet300", variant, 0.999, seed, 120)
      runs[run.name] = {**run._asdict(), "test_accuracy": accuracy}
  (tmp_path / "results.shard1.json").write_text(
      json.dumps({"settings": regime_study._SETTINGS, "runs": runs})
  )
  results = regime_study.load_results(tmp_path)
  table = regime_study.accuracy_table(results, regime_study.STUDY).splitlines()
  assert "120 epochs" in table[0]
  flipout_row = next(line for line in table if "| flipout " in line)
  assert "**80.00 ± 10.00**" in flipout_row
  assert "60.00 ± 10.00" in next(line for line in table if "| global_magnitude " in line)


@pytest.mark.skipif(
    not (input_pipeline.default_mnist_t10k_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="needs ../shared/data/mnist-t10k",
)
def test_tiny_study_trains_resumes_and_reprints(tmp_path, capsys):
  argv = ["--tiny", f"--workdir={tmp_path}"]
  assert regime_study.main(argv) == 0
  out = capsys.readouterr().out
  assert "[TINY: not a result]" in out and "0 of 2 runs done" in out
  stored = json.loads((tmp_path / "results.json").read_text())["runs"]
  assert len(stored) == 2
  for record in stored.values():
    assert record["achieved_sparsity"] == pytest.approx(0.9, abs=1e-5)
    assert record["test_accuracy"] > 0.5  # chance is 0.1
  assert regime_study.main(argv) == 0  # nothing left to train
  assert "2 of 2 runs done; 0 to train" in capsys.readouterr().out
  assert (tmp_path / "regime_study.png").read_bytes().startswith(b"\x89PNG")
