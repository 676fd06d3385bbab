"""Every benchmark runs on a tiny size and prints its table; no timing is asserted.

What is asserted are facts with an independent reason: LeNet-300-100 has 784*300 + 300*100 +
100*10 = 266,200 kernel weights; FlipOut's state is a bool mask and an int32 counter per
prunable weight (5 bytes, FLIPOUT.md), with a uint16 counter (3 bytes) when the run's last event
is at step 65535 or earlier (docs/algorithm.md); a pruning event at target 0.5 prunes round(0.5 N)
weights; a study grid's size follows from its definition; a mean and a sample standard
deviation of known numbers.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import _common, gpu_throughput, memory, mnist_real, noise_rng, prune_cost_split
from benchmarks import compact_speed, prune_event
from benchmarks import step_overhead
from experiments import cli, input_pipeline
import flipout_jax as flipout
from flipout_jax._src import noise
from tests import noise_ablation

LENET300_KERNEL_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10
# PruneState.last_update (flipout_jax/_src/update_check.py): a bool, and 256 // 3 = 85 evenly
# spaced float32 weights of each of LeNet-300-100's 3 kernels, twice (params, params + update).
LENET300_SAMPLE_BYTES = 1 + 2 * 4 * 3 * (256 // 3)


def _read_json(path):
  return json.loads(path.read_text())


def _assert_one_line_error(capsys):
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and "error:" in error, error


# ---------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------


def test_interleaved_timings_rotates_the_order_and_times_every_repetition():
  order = []

  def runner(name):
    return lambda calls: order.extend([name] * calls)

  timings = _common.interleaved_timings(
      {"a": runner("a"), "b": runner("b"), "c": runner("c")},
      repetitions=3,
      window_s=0.0,
      warmup_calls=1,
  )
  assert timings.calls == {"a": 1, "b": 1, "c": 1}
  # Warm-up (1 call) and calibration (1 call) per runner, then three rotated repetitions.
  assert order == ["a", "a", "b", "b", "c", "c"] + list("abc") + list("bca") + list("cab")
  assert all(len(seconds) == 3 and min(seconds) >= 0 for seconds in timings.seconds.values())


def test_median_ratio_and_spread():
  numerator, denominator = [2.0, 3.0, 12.0], [1.0, 1.0, 2.0]  # ratios 2, 3, 6
  assert _common.median_ratio(numerator, denominator) == 3.0
  assert _common.ratio_spread(numerator, denominator) == (2.5, 4.5)


def test_format_table_pads_columns():
  table = cli.format_table(["a", "long header"], [[1, 2], ["wide cell", 3]])
  lines = table.splitlines()
  assert len({len(line) for line in lines}) == 1
  assert lines[2].startswith("| 1         | 2 ")


def test_make_chain_rejects_unknown_variant():
  with pytest.raises(ValueError, match="variant"):
    _common.make_chain("sparse")


def test_init_model_matches_the_abstract_shapes():
  case = _common.TINY_CASES[0]
  model, abstract = _common.init_model(case), _common.abstract_model(case)
  shapes = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)
  assert shapes(model.params) == shapes(abstract.params)
  kernels = [leaf for leaf in jax.tree.leaves(model.params) if leaf.ndim >= 2]
  assert sum(k.size for k in kernels) == LENET300_KERNEL_WEIGHTS
  assert all(np.all(np.isfinite(k)) and np.std(k) > 0 for k in kernels)


# ---------------------------------------------------------------------------------------------
# The benchmarks, tiny.
# ---------------------------------------------------------------------------------------------


# The tiny benchmarks share their compiled steps (benchmarks._common.chain_and_step): the first
# one pays for compiling the three chains, the others reuse them.


def test_step_overhead_tiny(tmp_path, capsys):
  output = tmp_path / "overhead.json"
  assert step_overhead.main(["--tiny", "--json", str(output)]) == 0
  printed = capsys.readouterr().out
  assert "prune / dense" in printed and "flipout / dense" in printed
  assert "| lenet300 | 16 " in printed
  (result,) = _read_json(output)["results"]
  for variant in ("prune", "flipout"):
    ratio = result["ratios"][variant]
    assert math.isfinite(ratio["median"]) and ratio["p25"] <= ratio["median"] <= ratio["p75"]
  assert all(len(samples) == 3 for samples in result["samples"].values())


def test_step_overhead_tiny_masks_variant_counts_flips_without_events(tmp_path, capsys):
  output = tmp_path / "overhead.json"
  argv = ["--tiny", "--variants", "dense,masks", "--json", str(output)]
  assert step_overhead.main(argv) == 0
  assert "masks / dense" in capsys.readouterr().out
  (result,) = _read_json(output)["results"]
  assert math.isfinite(result["ratios"]["masks"]["median"])


def test_step_overhead_tiny_structures_adds_the_structured_chains_and_one_event_each(
    tmp_path, capsys
):
  output = tmp_path / "overhead.json"
  argv = ["--tiny", "--variants", "dense,prune", "--structures", "--json", str(output)]
  assert step_overhead.main(argv) == 0
  printed = capsys.readouterr().out
  for header in ("prune_unit / dense", "prune_2:4 / dense", "prune_unit / prune"):
    assert header in printed
  for structure in prune_event.STRUCTURES:
    assert f"| lenet300 | 16    | {structure} " in printed
  payload = _read_json(output)
  (result,) = payload["results"]
  samples = result["samples"]
  assert set(samples) == {"dense", "prune", "prune_unit", "prune_2:4"}
  for variant in _common.STRUCTURED_VARIANTS:
    per_repetition = [a / b for a, b in zip(samples[variant], samples["prune"])]
    assert result["ratios_to_prune"][variant]["median"] == pytest.approx(np.median(per_repetition))
  (events,) = payload["events"]
  assert set(events["structures"]) == set(prune_event.STRUCTURES)
  # LeNet-300-100's kernels all have input widths (784, 300, 100) that 4 divides.
  assert {row["size"] for row in events["structures"].values()} == {LENET300_KERNEL_WEIGHTS}
  assert events["structures"]["weight"]["event_cost_vs_weight"]["median"] == 1.0


def test_structured_chains_need_their_groups():
  with pytest.raises(ValueError, match="prune_unit.*unit_groups"):
    _common.make_chain(_common.PRUNE_UNIT)
  model = _common.init_model(_common.TINY_CASES[0])
  with pytest.raises(ValueError, match="prune_unit.*case"):
    _common.model_chain_and_step(model, _common.PRUNE_UNIT)


def test_two_of_four_chain_leaves_a_three_channel_first_conv_dense():
  params = {"conv0": jnp.ones((3, 3, 3, 8)), "conv1": jnp.ones((3, 3, 8, 4)), "b": jnp.ones(4)}
  masks = flipout.masks(_common.make_chain(_common.PRUNE_2_4).init(params))
  assert masks["conv0"] is None and masks["b"] is None and masks["conv1"].shape == (3, 3, 8, 4)


def test_masks_chain_needs_params():
  with pytest.raises(ValueError, match="masks.*params"):
    _common.make_chain(_common.MASKS)


@pytest.mark.parametrize(
    "argv",
    [
        ["--tiny", "--models", "vgg99"],
        ["--tiny", "--variants", "dense"],
        ["--tiny", "--variants", "dense,sparse"],
    ],
)
def test_step_overhead_bad_input_is_one_line(argv, capsys):
  assert step_overhead.main(argv) == 2
  _assert_one_line_error(capsys)


def test_step_overhead_bad_flag_value_is_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    step_overhead.main(["--repetitions", "0"])
  assert exit_info.value.code == 2
  _assert_one_line_error(capsys)


def test_gpu_throughput_tiny_with_the_full_chain(tmp_path, capsys):
  output = tmp_path / "throughput.json"
  assert gpu_throughput.main(["--tiny", "--variants", "dense,flipout", "--json", str(output)]) == 0
  printed = capsys.readouterr().out
  assert "images/s" in printed and "350-epoch run, hours" in printed
  (result,) = _read_json(output)["results"]
  rows = gpu_throughput.throughput_rows(result, ["dense", "flipout"])
  seconds = result["seconds_per_step"]["flipout"]
  # 50,000 // 16 = 3,125 steps per epoch, 350 epochs.
  assert rows[1][4] == f"{16 / seconds:,.0f}"
  assert rows[1][6] == f"{350 * 3125 * seconds / 3600:.2f}"


def test_prune_cost_split_tiny_times_the_chain_without_its_update_check(capsys):
  assert prune_cost_split.main(["--tiny", "--repetitions", "1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  names = [line.split()[2] for line in lines[:4]]
  assert names == ["dense", "masks", "prune", "prune_no_check"], lines


def test_prune_event_tiny(tmp_path, capsys):
  output = tmp_path / "event.json"
  assert prune_event.main(["--tiny", "--json", str(output)]) == 0
  printed = capsys.readouterr().out
  assert "| 4,096 " in printed and "| 16,384 " in printed and "linearity" in printed
  payload = _read_json(output)
  assert [r["size"] for r in payload["results"]] == [4096, 16384]
  assert [a["size"] for a in payload["argsort"]] == [4096, 16384]
  assert all(r["event_update_seconds"] > 0 for r in payload["results"])


def test_noise_rng_tiny_times_every_generator(tmp_path, capsys):
  output = tmp_path / "rng.json"
  assert noise_rng.main(["--tiny", "--json", str(output)]) == 0
  printed = capsys.readouterr().out
  assert "[TINY: not a result]" in printed and f"{LENET300_KERNEL_WEIGHTS:,} float32" in printed
  names = (*noise_rng.IMPLS, noise_rng.NON_PARTITIONABLE, *noise_rng.IN_STEP)
  for name in names:
    assert f"| {name} " in printed
  assert set(_read_json(output)["samples"]) == {"dense step", *names}


def test_noise_ablation_tiny_times_every_ablation(tmp_path, capsys):
  output = tmp_path / "ablation.json"
  assert noise_ablation.main(["--tiny", "--json", str(output)]) == 0
  printed = capsys.readouterr().out
  for name in (*noise_ablation.DRAWS, *noise_ablation.IN_STEP):
    assert f"| {name} " in printed
  samples = _read_json(output)["samples"]
  assert set(samples) == {"dense step", *noise_ablation.DRAWS, *noise_ablation.IN_STEP}


def test_benchmarks_use_the_public_api_only():
  for path in (Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"):
    assert "flipout_jax._src" not in path.read_text(), path


def test_noise_rng_ablations_swap_the_normal_transform_or_the_bits_and_nothing_else():
  params = {"w": jnp.ones((64, 32))}
  grads = {"w": jnp.ones((64, 32))}  # sigma = ||g|| / sqrt(n) = 1: the update is 1 + noise
  tx = flipout.gradient_noise(1.0, seed=3)
  state = tx.init(params)

  def noise_of(row):
    with noise_ablation.ablated_noise(row):
      updates, _ = tx.update(grads, state, params)  # eager: traced inside the ablation
    return np.asarray(updates["w"]) - 1.0

  real = noise_of(noise_rng.FLIPOUT_STEP)
  np.testing.assert_allclose(
      real,
      np.asarray(jax.random.normal(noise._noise_key(3, 0), (64 * 32,))).reshape(64, 32),
      atol=1e-6,
  )
  # The same bits as uniform noise: sqrt(2) u has erfinv(u)'s sign and stays within sqrt(2).
  uniform = noise_of(noise_ablation.UNIFORM_STEP)
  assert np.abs(uniform).max() <= np.sqrt(2) < np.abs(real).max()
  np.testing.assert_array_equal(np.sign(uniform), np.sign(real))
  # The same transform of other bits: normal, but not the stream.
  hashed = noise_of(noise_ablation.HASHED_STEP)
  assert np.abs(hashed).max() > np.sqrt(2) and 0.8 < hashed.std() < 1.2
  assert np.mean(np.sign(hashed) == np.sign(real)) < 0.6
  np.testing.assert_array_equal(noise_of(noise_rng.FLIPOUT_STEP), real)  # restored after


def test_prune_event_problem_prunes_half_at_the_event():
  problem = prune_event.make_problem(4096, leaves=4)  # 4 leaves of (4, 256), as in --tiny
  assert problem.size == 4096
  prune_event.check_branches(prune_event.event_update(), problem)


def test_prune_event_check_fails_when_no_event_happens():
  problem = prune_event.make_problem(4096, leaves=4)
  no_event = problem._replace(event_state=problem.steady_state)
  with pytest.raises(RuntimeError, match="expected the event to prune 2048"):
    prune_event.check_branches(prune_event.event_update(), no_event)


def _event_masks(structure):
  case = _common.TINY_CASES[0]
  groups = _common.unit_groups_of(case) if structure == "unit" else None
  tx = prune_event.structure_prune(structure, groups)
  problem = prune_event.model_problem(_common.init_model(case).params, tx)
  update = jax.jit(tx.update)
  prune_event.check_branches(update, problem, whole_groups=structure == "unit")
  _, state = update(problem.grads, problem.event_state, problem.params)
  return [np.asarray(m) for m in jax.tree.leaves(state.masks)]


def test_unit_event_prunes_whole_hidden_units_and_keeps_every_logit():
  first, second, logits = _event_masks("unit")  # kernels (784, 300), (300, 100), (100, 10)
  for kernel in (first, second):
    live_units = kernel.all(axis=0)
    assert np.array_equal(live_units, kernel.any(axis=0))
  pruned = sum(m.size - m.sum() for m in (first, second))
  assert round(0.5 * LENET300_KERNEL_WEIGHTS) <= pruned < round(0.5 * LENET300_KERNEL_WEIGHTS) + 784
  assert logits.all()


def test_two_of_four_event_prunes_two_of_every_four_inputs():
  for kernel in _event_masks("2:4"):
    fours = kernel.reshape(kernel.shape[0] // 4, 4, kernel.shape[1])
    assert (fours.sum(axis=1) == 2).all()


def test_structured_event_check_fails_when_no_event_happens():
  case = _common.TINY_CASES[0]
  tx = prune_event.structure_prune("unit", _common.unit_groups_of(case))
  problem = prune_event.model_problem(_common.init_model(case).params, tx)
  no_event = problem._replace(event_state=problem.steady_state)
  with pytest.raises(RuntimeError, match="expected the event to prune at least 133100"):
    prune_event.check_branches(jax.jit(tx.update), no_event, whole_groups=True)


@pytest.mark.parametrize(
    "text, expected", [("20M", 20_000_000), ("500k", 500_000), ("1.5M", 1_500_000), ("1000", 1000)]
)
def test_parse_size(text, expected):
  assert prune_event.parse_size(text) == expected


@pytest.mark.parametrize("sizes", ["0", "2X", "1M,-5K"])
def test_prune_event_bad_size_is_one_line(sizes, capsys):
  assert prune_event.main(["--sizes", sizes]) == 2
  _assert_one_line_error(capsys)


@pytest.mark.parametrize("total_steps,counter_bytes", [(None, 4), (60_000, 2), (72_095, 4)])
def test_memory_tiny_counts_state_bytes_per_prunable_weight(
    tmp_path, capsys, total_steps, counter_bytes
):
  # 99.9% in target mode has 10 events, the last at 10 * round(total_steps / 11): step 54,550
  # for 60,000 steps (uint16 counters), step 65,540 for 72,095 (int32), and ~91M by default.
  output = tmp_path / "memory.json"
  run_length = [] if total_steps is None else ["--total_steps", str(total_steps)]
  variants = ["--variants", "dense,prune,flipout,masks"]
  assert memory.main(["--tiny", "--json", str(output), *variants, *run_length]) == 0
  assert "prune state B/weight" in capsys.readouterr().out
  (result,) = _read_json(output)["results"]
  assert result["prunable_weights"] == LENET300_KERNEL_WEIGHTS
  # bool mask + flip counter per weight, plus one int32 step counter and the update sample for
  # the whole state.
  assert result["state_bytes_per_prunable_weight"]["prune"] == pytest.approx(
      1 + counter_bytes + (4 + LENET300_SAMPLE_BYTES) / LENET300_KERNEL_WEIGHTS
  )
  # gradient_noise adds one more int32 step counter.
  assert result["state_bytes_per_prunable_weight"]["flipout"] == pytest.approx(
      1 + counter_bytes + (8 + LENET300_SAMPLE_BYTES) / LENET300_KERNEL_WEIGHTS
  )
  # fixed_masks has no events, so its counters stay int32 whatever the run length.
  assert result["state_bytes_per_prunable_weight"]["masks"] == pytest.approx(
      5 + (4 + LENET300_SAMPLE_BYTES) / LENET300_KERNEL_WEIGHTS
  )
  # The pruning state is an input and an output of the step: strictly more memory than dense.
  assert result["peak_ratio"]["prune"] > 1.0 and result["peak_ratio"]["flipout"] > 1.0


def test_step_runner_times_steps_after_the_last_event():
  case = _common.cases_for("cpu", tiny=True)[0]
  runner = _common.StepRunner(case, _common.PRUNE, total_steps=60_000)
  runner(2)
  prune_state = optax.tree_utils.tree_get(runner.state[2], "PruneState")
  # Counters start at total_steps - 1, after the last event (step 54,550).
  assert int(prune_state.count) == 60_001
  assert all(f.dtype == np.uint16 for f in jax.tree.leaves(prune_state.flips))
  assert runner.all_live()


def test_memory_rejects_a_baseline_other_than_dense(capsys):
  assert memory.main(["--tiny", "--variants", "prune,dense"]) == 2
  _assert_one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# The MNIST study.
# ---------------------------------------------------------------------------------------------


def test_full_study_grid_size():
  # 2 models x (4 pruning methods x 4 sparsities + dense once) x 3 seeds.
  assert len(mnist_real.Study().runs()) == 2 * (4 * 4 + 1) * 3


def test_accuracy_stats_mean_and_sample_std():
  study = mnist_real.Study(
      models=("lenet5",),
      methods=("flipout",),
      sparsities=(0.9,),
      seeds=(0, 1, 2),
      epochs=(("lenet5", 3),),
  )
  record = lambda accuracy: {"test_accuracy": accuracy, "live_weights": 43_100}
  runs = {
      mnist_real.Run("lenet5", "flipout", 0.9, seed, 3).name: record(accuracy)
      for seed, accuracy in zip((0, 1, 2), (0.90, 0.92, 0.94))
  }
  # A run of another length is not part of this study.
  runs[mnist_real.Run("lenet5", "flipout", 0.9, 0, 5).name] = record(0.5)
  (group,) = mnist_real.accuracy_groups({"runs": runs}, study)
  assert (group.mean, len(group.accuracies)) == (pytest.approx(0.92), 3)
  assert group.std == pytest.approx(0.02)  # sqrt(((-0.02)^2 + 0 + 0.02^2) / (3 - 1))
  assert "92.00 ± 2.00" in mnist_real.accuracy_table({"runs": runs}, study)


def test_mnist_real_skips_cleanly_without_data(tmp_path, capsys):
  assert (
      mnist_real.main(
          ["--tiny", "--data_dir", str(tmp_path / "absent"), "--workdir", str(tmp_path / "work")]
      )
      == 0
  )
  assert "skipped" in capsys.readouterr().out
  assert not (tmp_path / "work").exists()


def test_mnist_real_rejects_unknown_method(capsys):
  assert mnist_real.main(["--methods", "flipout,lottery"]) == 2
  _assert_one_line_error(capsys)


@pytest.mark.skipif(
    not (input_pipeline.default_mnist_t10k_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="../shared/data/mnist-t10k is absent",
)
def test_mnist_real_tiny_trains_resumes_and_retables(tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "study"
  assert mnist_real.main(["--tiny", "--workdir", str(workdir)]) == 0
  first = capsys.readouterr().out
  assert "| lenet300 | global_magnitude " in first and "| lenet300 | dense (no pruning) " in first
  runs = _read_json(workdir / "results.json")["runs"]
  assert set(runs) == {"lenet300-global_magnitude-0.9-e1-seed0", "lenet300-dense-e1-seed0"}
  pruned = runs["lenet300-global_magnitude-0.9-e1-seed0"]
  assert pruned["achieved_sparsity"] == pytest.approx(0.9, abs=1e-5)
  assert pruned["live_weights"] == round(0.1 * LENET300_KERNEL_WEIGHTS)
  assert (workdir / "mnist_real.png").stat().st_size > 0

  # Everything is done: running again trains nothing and prints the same table.
  from experiments import train

  monkeypatch.setattr(train, "train", lambda config: pytest.fail("retrained a finished run"))
  assert mnist_real.main(["--tiny", "--workdir", str(workdir)]) == 0
  again = capsys.readouterr().out
  assert mnist_real.main(["--tiny", "--table_only", "--workdir", str(workdir)]) == 0
  table = lambda text: [line for line in text.splitlines() if line.startswith("|")]
  assert table(again) == table(first) == table(capsys.readouterr().out)


def test_compact_speed_times_the_compacted_gpt_at_each_round_to(tmp_path):
  out = tmp_path / "speed.json"
  flags = ["--model", "gpt", "--batch", "4", "--repetitions", "1", "--window_s", "0.01"]
  assert compact_speed.main([*flags, "--round_to", "1,8", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["results"][0]["rows"]
  assert set(rows) == {"dense", "round_to=1", "round_to=8"}
  # Half the MLP units are dead: compaction removes them, rounding keeps some back.
  assert rows["round_to=1"]["parameters"] < rows["round_to=8"]["parameters"]
  assert rows["round_to=8"]["parameters"] < rows["dense"]["parameters"]
  for row in rows.values():
    assert row["max_output_difference"] < 1e-4 and row["speedup"]["median"] > 0


def test_compact_speed_refuses_a_dead_fraction_out_of_range(capsys):
  with pytest.raises(SystemExit) as stopped:
    compact_speed.main(["--dead", "1.5"])
  assert stopped.value.code == 2 and "--dead" in capsys.readouterr().err
