"""``--noise_scale`` for every scheduled method and ``--schedule cubic`` in the experiments."""

import dataclasses

import jax
import numpy as np
import pytest

import flipout_jax as flipout
from experiments import checkpoints, cli, mnist, optimizers
from experiments import config as config_lib
from tests.test_cubic_schedule import _pruned_per_step

PARAMS = {
    "dense": {"kernel": np.linspace(-1, 1, 40 * 25, dtype=np.float32).reshape(40, 25)},
    "head": {"kernel": np.linspace(1, -1, 25 * 10, dtype=np.float32).reshape(25, 10)},
}
SIZE = 40 * 25 + 25 * 10


def _config(**fields):
  base = dict(method="flipout", sparsity=0.9, epochs=10, milestones=(), lr=0.01)
  return config_lib.Config(**{**base, **fields})


def _has_noise(config) -> bool:
  state = optimizers.build_optimizer(config, steps_per_epoch=5).init(PARAMS)
  found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, flipout.GradientNoiseState))
  return any(isinstance(leaf, flipout.GradientNoiseState) for leaf in found)


@pytest.mark.parametrize(
    "method,noise_scale,expected",
    [
        ("flipout", None, True),  # the paper's default for flipout: noise 1
        ("flipout", 0.0, False),  # the ablation: flipout without noise
        ("flipout", 0.5, True),
        ("global_magnitude", None, False),  # the baselines' default: no noise
        ("global_magnitude", 1.0, True),  # the ablation: global magnitude with noise
        ("magnitude", 1.0, True),
        ("random", 1.0, True),
        ("random", None, False),
    ],
)
def test_noise_link_follows_the_method_and_the_flag(method, noise_scale, expected):
  assert _has_noise(_config(method=method, noise_scale=noise_scale)) is expected


def test_noise_scale_resolved_in_one_place():
  assert config_lib.noise_scale_of(_config(method="flipout")) == 1.0
  assert config_lib.noise_scale_of(_config(method="global_magnitude")) == 0.0
  assert config_lib.noise_scale_of(_config(method="global_magnitude", noise_scale=1.0)) == 1.0
  assert config_lib.noise_scale_of(_config(method="flipout", noise_scale=0.0)) == 0.0


def test_noise_scale_is_the_scale_used():
  """Global magnitude with noise 3 gets the same noise as gradient_noise(3, seed)."""
  config = _config(method="global_magnitude", noise_scale=3.0, weight_decay=0.0, momentum=0.0)
  tx = optimizers.build_optimizer(config, steps_per_epoch=5)
  grads = jax.tree.map(lambda w: np.ones_like(w), PARAMS)
  got, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  noise = flipout.gradient_noise(3.0, seed=config.seed)
  want, _ = noise.update(grads, noise.init(PARAMS), PARAMS)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), -0.01 * np.asarray(w), rtol=1e-6)


@pytest.mark.parametrize(
    "fields,words",
    [
        (dict(method="snip", noise_scale=1.0), "--noise_scale applies to the scheduled methods"),
        (dict(method="dense", noise_scale=0.5), "--noise_scale applies to the scheduled methods"),
        (dict(noise_scale=-1.0), "--noise_scale must be >= 0"),
        (dict(schedule="linear"), "--schedule must be one of halving, cubic"),
        (dict(method="snip", schedule="cubic"), "--schedule=cubic applies to the scheduled"),
        (dict(schedule="cubic", initial_sparsity=0.95), "--initial_sparsity must be in [0, "),
        (dict(schedule="cubic", prune_every_steps=0), "--prune_every_steps must be"),
    ],
)
def test_bad_noise_and_schedule_flags_are_refused(fields, words):
  with pytest.raises(config_lib.ConfigError, match=None) as error:
    config_lib.validate_config(_config(**fields))
  assert words in str(error.value)


def test_noise_for_snip_is_one_line_exit_2(capsys):
  assert mnist.main(["--method=snip", "--noise_scale=1", "--synthetic"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "--noise_scale applies to the scheduled methods" in err[0]


def test_flags_parse_to_the_config_fields():
  parser = cli.build_parser(mnist.DEFAULTS, mnist.MODELS)
  args = parser.parse_args(
      ["--noise_scale=none", "--schedule=cubic", "--prune_every_steps=7", "--prune_end_epoch=9"]
  )
  config = dataclasses.replace(mnist.DEFAULTS, **vars(args))
  assert config.noise_scale is None and config.schedule == "cubic"
  assert (config.prune_every_steps, config.prune_end_epoch, config.prune_begin_epoch) == (
      7,
      9,
      None,
  )
  assert config_lib.noise_scale_of(dataclasses.replace(config, method="flipout")) == 1.0


def test_saved_config_with_default_noise_resumes_and_a_changed_one_does_not():
  config = _config(method="global_magnitude")
  saved = config_lib.config_from_json(config_lib.config_to_json(config))
  assert saved.noise_scale is None
  checkpoints.check_resumable(saved, config)  # same flags: resumes
  with pytest.raises(config_lib.ConfigError, match="--noise_scale None -> 1.0"):
    checkpoints.check_resumable(saved, dataclasses.replace(config, noise_scale=1.0))


def _pruned_after_each_step(config, steps_per_epoch):
  tx = optimizers.build_optimizer(config, steps_per_epoch)
  return _pruned_per_step(tx, config.epochs * steps_per_epoch, PARAMS, update_scale=0.1)


@pytest.mark.parametrize("method", ["flipout", "global_magnitude", "magnitude"])
def test_cubic_schedule_spans_the_halving_events_and_reaches_the_target(method):
  config = _config(method=method, schedule="cubic", noise_scale=0.0, sparsity=0.95)
  counts = _pruned_after_each_step(config, steps_per_epoch=5)
  halving = flipout.event_steps(0.95, 50, 0.5)  # 5 events at multiples of 8: 8, ..., 40
  cubic = flipout.cubic_event_steps(halving[0], halving[-1], 5)  # 8, 13, ..., 38, 40
  changed = [step for step in range(2, 51) if counts[step - 1] != counts[step - 2]]
  assert set(changed) <= set(cubic) and changed[-1] == halving[-1] == 40
  assert (
      counts[-1] == round(0.95 * SIZE)
      if method != "magnitude"
      else counts[-1] == sum(round(0.95 * n) for n in (40 * 25, 25 * 10))
  )
  assert counts[halving[0] - 1] == 0  # initial_sparsity 0: the first event prunes nothing


def test_cubic_begin_end_and_period_flags():
  config = _config(
      method="global_magnitude",
      schedule="cubic",
      initial_sparsity=0.5,
      prune_begin_epoch=2,
      prune_end_epoch=6,
      prune_every_steps=3,
  )
  assert optimizers.cubic_steps(config, 50, 5) == (10, 30, 3)
  counts = _pruned_after_each_step(config, steps_per_epoch=5)
  assert counts[8] == 0 and counts[9] == round(0.5 * SIZE)  # first event at step 10
  assert counts[28] < counts[29] == round(0.9 * SIZE) == counts[-1]  # last at step 30


def test_cubic_end_after_the_run_is_one_line(capsys):
  argv = ["--method=flipout", "--schedule=cubic", "--prune_begin_epoch=1", "--prune_end_epoch=3"]
  argv += ["--epochs=2"]
  argv += ["--synthetic", "--synthetic_train=32", "--synthetic_test=8", "--batch_size=16"]
  assert mnist.main([*argv, "--no-progress", "--no-tensorboard", "--workdir=/nonexistent"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "end_step must be < total_steps" in err[0]


def test_digits_demo_runs_the_noise_ablation_with_the_papers_lr_shape(tmp_path):
  from experiments import digits

  configs = digits.run_configs(60, 0, tmp_path, digits.DEFAULT_METHODS, (0.99, 0.995))
  by_name = {(digits.method_name(c), c.sparsity): c for c in configs}
  assert len(configs) == 5 * 2 + 1
  no_noise = by_name[("flipout_no_noise", 0.995)]
  assert (no_noise.method, config_lib.noise_scale_of(no_noise)) == ("flipout", 0.0)
  noisy = by_name[("global_magnitude_noise", 0.99)]
  assert (noisy.method, config_lib.noise_scale_of(noisy)) == ("global_magnitude", 1.0)
  assert config_lib.noise_scale_of(by_name[("flipout", 0.99)]) == 1.0
  assert all(c.milestones == (26, 43) for c in configs)


@pytest.mark.parametrize(
    "flipout_accuracy,words",
    [(0.80, "3.0 points ahead of global magnitude"), (0.70, "7.0 points behind global magnitude")],
)
def test_digits_note_says_what_the_numbers_show(tmp_path, flipout_accuracy, words):
  from experiments import digits

  configs = digits.run_configs(60, 0, tmp_path, ("flipout", "global_magnitude_noise"), (0.995,))
  configs += digits.run_configs(60, 0, tmp_path, ("global_magnitude",), (0.995,))
  accuracies = [flipout_accuracy, 0.75, 0.77]
  note = digits.verdict([(c, {"test_accuracy": a}) for c, a in zip(configs, accuracies)])
  assert note[0].startswith("At 99.5%: ") and words in note[0]
  assert "global magnitude with the noise 75.0%" in note[0]
  best = "flipout (80.0%)" if flipout_accuracy > 0.77 else "global_magnitude (77.0%)"
  assert f"best: {best}" in note[0]


@pytest.mark.parametrize(
    "method,saved_noise,expected",
    [("global_magnitude", 1.0, None), ("flipout", 1.0, None), ("flipout", 0.5, 0.5)],
)
def test_configs_saved_before_the_flag_still_resume(method, saved_noise, expected):
  """A checkpoint written when noise acted on flipout alone resumes with the same flags."""
  old = config_lib.config_to_json(_config(method=method))
  for name in ("schedule", "initial_sparsity", "prune_begin_epoch", "prune_end_epoch"):
    old.pop(name)
  old["noise_scale"] = saved_noise
  saved = config_lib.config_from_json(old)
  assert saved.noise_scale == expected
  checkpoints.check_resumable(saved, _config(method=method, noise_scale=expected))
