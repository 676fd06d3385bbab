"""The trainer under hostile conditions: resuming with another model, a metrics log cut off
mid-line, the random streams, the chain order of the flipout method, multi-process flags."""

import dataclasses
import hashlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from experiments import config as config_lib
from experiments import devices, logs, mnist, optimizers, train

_TINY_RUN = [
    "--synthetic",
    "--synthetic_train=32",
    "--synthetic_test=8",
    "--batch_size=16",
    "--no-progress",
    "--no-tensorboard",
]


def _tree_digest(folder) -> dict[str, str]:
  return {
      str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
      for path in sorted(folder.rglob("*"))
      if path.is_file()
  }


def test_resume_with_another_model_is_one_line_and_leaves_the_run_alone(capsys, tmp_path):
  argv = [*_TINY_RUN, "--method=global_magnitude", "--sparsity=0.5", "--epochs=2"]
  assert mnist.main([*argv, "--model=lenet300", f"--workdir={tmp_path}"]) == 0
  before = _tree_digest(tmp_path)
  capsys.readouterr()
  # Restoring first would fail inside orbax on the other tree (exit 1, a traceback).
  status = mnist.main([*argv, "--model=lenet5", f"--workdir={tmp_path}", "--resume"])
  captured = capsys.readouterr()
  assert status == 2, captured.err
  lines = captured.err.splitlines()
  assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
  assert "--model 'lenet300' -> 'lenet5'" in lines[0]
  assert _tree_digest(tmp_path) == before


def test_a_metrics_line_cut_off_by_a_kill_is_dropped_on_resume(tmp_path):
  argv = [*_TINY_RUN, "--method=dense", "--epochs=2", f"--workdir={tmp_path}"]
  assert mnist.main(argv) == 0
  metrics = tmp_path / "metrics.jsonl"
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [record["epoch"] for record in records] == [1, 2]
  # A kill during the write of epoch 2's line: the line is half there.
  text = json.dumps(records[0]) + "\n" + json.dumps(records[1])[:25]
  metrics.write_text(text)
  with pytest.warns(UserWarning, match="partial last line"):
    assert mnist.main([*argv, "--resume"]) == 0
  kept = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert kept == records[:1]


def test_a_corrupt_metrics_line_before_the_last_is_an_error(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
  with pytest.raises(config_lib.ConfigError, match="line 2 is not a metrics record"):
    logs.read_records(path)


def test_augmentation_has_a_random_stream_of_its_own():
  shared_stream = jax.random.key_data(jax.random.fold_in(jax.random.key(3), 5))
  key = train.augmentation_key(3, 5)
  assert not np.array_equal(jax.random.key_data(key), shared_stream)
  np.testing.assert_array_equal(
      jax.random.key_data(key), jax.random.key_data(train.augmentation_key(3, 5))
  )
  assert not np.array_equal(
      jax.random.key_data(key), jax.random.key_data(train.augmentation_key(3, 6))
  )


def test_flipout_method_chains_noise_decay_sgd_then_prune_last():
  """The trainer's flipout chain is the paper's order, with prune last (bit-for-bit)."""
  config = config_lib.Config(
      method="flipout", lr=0.1, milestones=(), epochs=1, sparsity=0.5, seed=7, noise_scale=1.0
  )
  steps = 12
  built = optimizers.build_optimizer(config, steps_per_epoch=steps)
  expected = optax.chain(
      flipout.gradient_noise(1.0, seed=7),
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(optax.piecewise_constant_schedule(0.1, {}), momentum=config.momentum),
      flipout.prune(
          0.5,
          total_steps=steps,
          criterion=flipout.flipout_criterion(p=2.0),
          schedule=flipout.halving(rate=0.5),
      ),
  )
  params = {"kernel": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), "bias": jnp.ones(6)}
  states = [tx.init(params) for tx in (built, expected)]
  # Jitted: one compilation per chain for the 12 steps (eagerly, the event's loops and
  # conditionals were compiled again at every step).
  updates_of = [jax.jit(tx.update) for tx in (built, expected)]
  weights = [params, params]
  for step in range(steps):
    grads = jax.tree.map(lambda w: jnp.cos(w * (step + 1)), params)
    for index, update in enumerate(updates_of):
      updates, states[index] = update(grads, states[index], weights[index])
      weights[index] = optax.apply_updates(weights[index], updates)
    for mine, theirs in zip(jax.tree.leaves(weights[0]), jax.tree.leaves(weights[1])):
      np.testing.assert_array_equal(mine, theirs, err_msg=f"step {step}")
  assert float(flipout.sparsity(weights[0])) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"coordinator_address": "127.0.0.1:1234"}, "go together"),
        ({"num_processes": 2, "process_id": 0}, "go together"),
        (
            {"coordinator_address": "localhost", "num_processes": 2, "process_id": 0},
            "host:port",
        ),
        (
            {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2},
            "--process_id must be in [0, 2)",
        ),
    ],
)
def test_incomplete_multi_process_flags_are_refused(overrides, expected):
  config = dataclasses.replace(mnist.DEFAULTS, **overrides)
  with pytest.raises(config_lib.ConfigError, match=re.escape(expected)):
    config_lib.validate_config(config)


def test_multi_process_environment_variables_are_read(monkeypatch):
  """``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID`` are ours to read: jax.distributed reads neither."""
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append(kwargs))
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:4321")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  devices.maybe_initialize_distributed(mnist.DEFAULTS)
  assert calls == [{"num_processes": 2, "process_id": 1}]
  monkeypatch.setenv("JAX_PROCESS_ID", "2")  # checked like the flags
  with pytest.raises(config_lib.ConfigError, match=re.escape("--process_id must be in [0, 2)")):
    devices.maybe_initialize_distributed(mnist.DEFAULTS)
  assert len(calls) == 1
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(config_lib.ConfigError, match="JAX_PROCESS_ID must be an integer"):
    devices.maybe_initialize_distributed(mnist.DEFAULTS)
