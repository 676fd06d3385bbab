"""``--on_nonfinite``: a run whose loss or weights go non-finite stops with one line and exit
status 3, and never saves the non-finite state over its last finite checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import checkpoints, cli, mnist, optimizers

# 4 steps per epoch of a dense LeNet-300 on 64 synthetic images.
_STEPS_PER_EPOCH = 4
_TINY_RUN = [
    "--synthetic",
    "--synthetic_train=64",
    "--synthetic_test=16",
    "--batch_size=16",
    "--method=dense",
    "--epochs=3",
    "--checkpoint_every_epochs=1",
    "--no-progress",
    "--no-tensorboard",
]


def _poison_updates_at(step_index: int) -> optax.GradientTransformation:
  """Adds NaN to every update of step ``step_index`` (from 0): the weights after it are NaN."""

  def update(updates, count, params=None):
    del params
    poison = jnp.where(count == step_index, jnp.nan, 0.0)
    return jax.tree.map(lambda leaf: leaf + poison, updates), count + 1

  return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


@pytest.fixture
def poison_at(monkeypatch):
  """Makes the trainer's optimizer poison the weights at a chosen step."""

  def install(step_index: int):
    build = optimizers.build_optimizer
    monkeypatch.setattr(
        optimizers,
        "build_optimizer",
        lambda *args, **kwargs: optax.chain(build(*args, **kwargs), _poison_updates_at(step_index)),
    )

  return install


def test_a_huge_learning_rate_stops_the_run_naming_the_step(capsys, tmp_path):
  status = mnist.main([*_TINY_RUN, "--lr=1e6", f"--workdir={tmp_path}"])
  err = capsys.readouterr().err
  assert status == cli.EXIT_DIVERGED == 3, err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert "training diverged: the training loss is not finite at step " in err
  assert "no checkpoint was saved" in err
  assert not list((tmp_path / "checkpoints").iterdir())
  assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    "poisoned_step, cause",
    [
        # The weights go NaN in the 2nd step of epoch 2: the 3rd step's loss is NaN.
        (_STEPS_PER_EPOCH + 1, f"the training loss is not finite at step {_STEPS_PER_EPOCH + 3}"),
        # ... in the last step of epoch 2: no loss saw them, the weights check does.
        (
            2 * _STEPS_PER_EPOCH - 1,
            f"the weights are not finite after step {2 * _STEPS_PER_EPOCH} (the loss was still",
        ),
    ],
)
def test_the_last_finite_checkpoint_stays_the_newest(
    capsys, tmp_path, poison_at, poisoned_step, cause
):
  poison_at(poisoned_step)
  status = mnist.main([*_TINY_RUN, f"--workdir={tmp_path}"])
  err = capsys.readouterr().err
  assert status == cli.EXIT_DIVERGED, err
  assert len(err.splitlines()) == 1, err
  assert f"{cause}" in err and "(epoch 2)" in err
  assert "the newest checkpoint (epoch 1) is the last finite state" in err
  assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["1"]
  restored = checkpoints.load_run(tmp_path)
  assert restored.epoch == 1
  params = jax.tree.leaves(restored.model)
  assert params and all(np.isfinite(np.asarray(leaf)).all() for leaf in params)


def test_continue_trains_on_and_saves(tmp_path, poison_at):
  poison_at(_STEPS_PER_EPOCH + 1)
  with pytest.warns(UserWarning, match="training on"):
    status = mnist.main([*_TINY_RUN, "--on_nonfinite=continue", f"--workdir={tmp_path}"])
  assert status == 0
  assert checkpoints.load_run(tmp_path).epoch == 3


def test_an_unknown_on_nonfinite_choice_is_one_line(capsys, tmp_path):
  assert mnist.main([*_TINY_RUN, "--on_nonfinite=skip", f"--workdir={tmp_path}"]) == 2
  assert "--on_nonfinite must be one of stop, continue" in capsys.readouterr().err
