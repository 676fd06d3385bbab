"""prune and gradient_noise follow Optax's conventions: extra args, tree_utils, wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from tests.test_transform import _data, _loss, _mlp_params


@pytest.mark.parametrize(
    "make", [lambda: flipout.prune(0.5, total_steps=10), lambda: flipout.gradient_noise(1.0)]
)
def test_update_takes_extra_args(make):
  tx = make()
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = _mlp_params()
  grads = jax.grad(_loss)(params, *_data())
  state = tx.init(params)
  update = jax.jit(tx.update)  # eagerly, every loop of the event compiles on its own
  with_value, _ = update(grads, state, params, value=jnp.float32(1.5))
  without, _ = update(grads, state, params)
  jax.tree.map(np.testing.assert_array_equal, with_value, without)


def test_in_a_chain_with_a_link_that_needs_the_loss_value():
  # reduce_on_plateau reads `value`: optax.chain passes it to every link.
  tx = optax.chain(
      flipout.gradient_noise(1.0),
      optax.sgd(0.1, momentum=0.9),
      optax.contrib.reduce_on_plateau(patience=2),
      flipout.prune(0.5, total_steps=10),
  )
  params = _mlp_params()
  state = tx.init(params)
  x, y = _data()

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  for _ in range(12):
    params, state = step(params, state)
  report = flipout.summary(params)
  assert report.size - report.live == round(0.5 * report.size)
  assert int(optax.tree_utils.tree_get(state, "count", filtering=_in_prune_state)) == 12


def _in_prune_state(path, value) -> bool:
  del value
  return "PruneState" in jax.tree_util.keystr(path)


def test_state_is_read_with_optax_tree_utils():
  tx = optax.chain(optax.sgd(0.1), flipout.prune(0.5, total_steps=10))
  params = _mlp_params()
  state = tx.init(params)
  update = jax.jit(tx.update)  # one compilation for the 4 steps
  for _ in range(4):  # past the event at step 3
    updates, state = update(jax.grad(_loss)(params, *_data()), state, params)
    params = optax.apply_updates(params, updates)
  assert optax.tree_utils.tree_get(state, "masks") is flipout.masks(state)
  prune_state = optax.tree_utils.tree_get(state, "PruneState")
  assert isinstance(prune_state, flipout.PruneState) and int(prune_state.count) == 4


def test_reading_two_pruning_states_is_refused():
  tx = optax.chain(flipout.prune(0.5, total_steps=10), flipout.prune(0.5, total_steps=10))
  with pytest.raises(ValueError, match="exactly one flipout pruning state.*found 2"):
    flipout.masks(tx.init(_mlp_params()))
