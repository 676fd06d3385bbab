"""Checkpoints written before PruneState held its update sample still resume."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flipout_jax as flipout
from experiments import checkpoints
from experiments import config as config_lib


class _OldPruneState(NamedTuple):
  """PruneState's fields before ``last_update``: what such a checkpoint holds."""

  count: Any
  masks: Any
  flips: Any


def test_a_checkpoint_without_the_update_sample_resumes_and_trains(tmp_path):
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)}
  tx = optax.chain(optax.sgd(0.1), flipout.prune(0.5, total_steps=10))
  state = tx.init(params)
  update = jax.jit(tx.update)  # one compilation for the 5 updates (eagerly: one per update)
  for _ in range(3):  # past the event at step 3
    updates, state = update(params, state, params)
    params = optax.apply_updates(params, updates)
  old = (state[0], _OldPruneState(*state[1][:3]))
  config = config_lib.Config(workdir=str(tmp_path), keep_checkpoints=1)
  store = checkpoints.open_store(tmp_path, config)
  try:
    checkpoints.save(store.epochs, 1, {"params": params, "opt_state": old}, {"epoch": 1})
    checkpoints.finish_saving(store)
    target = {"params": params, "opt_state": tx.init(params)}
    restored, metadata = checkpoints.restore(store.epochs, 1, target)
  finally:
    checkpoints.close_store(store)
  assert metadata["epoch"] == 1
  prune_state = restored["opt_state"][1]
  assert isinstance(prune_state, flipout.PruneState) and int(prune_state.count) == 3
  np.testing.assert_array_equal(prune_state.masks["w"], state[1].masks["w"])
  assert not bool(prune_state.last_update.taken)  # the first resumed update checks nothing
  opt_state = restored["opt_state"]
  for _ in range(2):
    updates, opt_state = update(restored["params"], opt_state, restored["params"])
    restored["params"] = optax.apply_updates(restored["params"], updates)
  assert int(opt_state[1].count) == 5 and np.all(np.isfinite(restored["params"]["w"]))
