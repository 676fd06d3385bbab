"""benchmarks.structured_study: its command lines, paired comparisons and report."""

import pytest

from benchmarks import structured_study as study


def test_each_run_is_one_experiments_command_line():
  argv = study.flags(study.Run("lenet5", "unit_sum", 1))
  assert "--model=lenet5" in argv and "--seed=1" in argv and "--lr=0.01" in argv
  assert "--structure=unit" in argv and "--group_score=sum" in argv
  assert "--dataset=fashion_mnist" in argv
  two_of_four = study.flags(study.Run("lenet300", "global_magnitude_2:4", 0), epochs=1)
  assert "--structure=2:4" in two_of_four and "--sparsity=0.5" in two_of_four
  assert "--epochs=1" in two_of_four and "--lr=0.01" not in two_of_four


def _record(accuracy, **extra):
  return {"test_accuracy": accuracy, "sparsity": 0.98, **extra}


def test_comparisons_pair_seeds_and_call_a_winner_only_outside_the_interval():
  runs = {
      "lenet5-unit-seed0": _record(0.80),
      "lenet5-weight-seed0": _record(0.85),
      "lenet5-unit-seed1": _record(0.81),
      "lenet5-weight-seed1": _record(0.86),
      "lenet300-flipout_2:4-seed0": _record(0.88),
      "lenet300-global_magnitude_2:4-seed0": _record(0.80),
  }
  rows = {(r["model"], r["variant"]): r for r in study.comparisons({"runs": runs})}
  unit = rows[("lenet5", "unit")]
  assert unit["seeds"] == 2 and unit["difference"] == pytest.approx(-5.0)
  assert unit["verdict"] == "behind"  # -5 both times: no spread, the interval is a point
  two_of_four = rows[("lenet300", "flipout_2:4")]
  assert two_of_four["seeds"] == 1 and two_of_four["verdict"] == "level"  # no interval from 1
  assert ("lenet5", "unit_sum") not in rows  # no finished pair


def test_the_report_lists_compacted_runs_with_their_speed_up():
  record = _record(
      0.8,
      speedup=3.5,
      dense_parameters=431080,
      compact_parameters=9000,
      widths={"conv": [10, 20], "hidden": [30]},
      compact_flops=100,
      dense_flops=1000,
  )
  text = study.report({"runs": {"lenet5-unit-seed0": record}})
  assert "| lenet5-unit-seed0 | 80.00% | 98.00% | 9,000 of 431,080 |" in text
  assert "3.50x" in text


def test_a_bad_shard_exits_2(capsys):
  assert study.main(["--shard=2/2", "--table_only"]) == 2
  assert "--shard must be I/N" in capsys.readouterr().err


def test_run_pending_measures_this_shards_unfinished_runs_and_keeps_each_record(tmp_path):
  runs = [study.Run("lenet5", "unit", seed) for seed in range(4)]
  measured = []
  measure = lambda run: measured.append(run.name) or {"test_accuracy": run.seed / 10}
  study.run_pending(runs, tmp_path, "", (1, 2), measure)
  assert measured == ["lenet5-unit-seed1", "lenet5-unit-seed3"]
  study.run_pending(runs, tmp_path, "", (1, 2), measure)  # finished: nothing again
  assert len(measured) == 2
  study.run_pending(runs, tmp_path, "seed2", (0, 1), measure)
  assert measured[-1] == "lenet5-unit-seed2"
  results = study.results_of(tmp_path)["runs"]
  assert sorted(results) == ["lenet5-unit-seed1", "lenet5-unit-seed2", "lenet5-unit-seed3"]
  assert results["lenet5-unit-seed3"] == {"test_accuracy": 0.3}
  assert study.parse_shard("1/2") == (1, 2)
  assert study.parse_shard("2/2") is None and study.parse_shard("a/b") is None
