"""criterion="taylor": the first-order Taylor importance |w * update| of the event step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout


def _event_masks(criterion, structure="weight"):
  """One event (target 0.5: the halving schedule's one event, at step 1 of 2) with plain SGD at lr 1 on fixed gradients whose
  order differs from the weights'; the masks and the event's new weights and update."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.uniform(0.5, 1.5, size=(4, 6)), jnp.float32)
  g = jnp.asarray(rng.uniform(-0.4, 0.4, size=(4, 6)), jnp.float32)
  params = {"w": w}
  tx = optax.chain(
      optax.sgd(1.0),
      flipout.prune(
          0.5,
          total_steps=2,
          criterion=criterion,
          structure=structure,
      ),
  )
  state = tx.init(params)
  _, state = tx.update({"w": g}, state, params)
  return np.asarray(flipout.masks(state)["w"]), np.asarray(w - g), np.asarray(-g)


def test_taylor_scores_are_the_weight_times_its_update():
  w, u = {"a": jnp.array([1.0, -2.0]), "b": None}, {"a": jnp.array([-3.0, 0.5]), "b": None}
  np.testing.assert_array_equal(flipout.taylor_scores(w, u)["a"], [3.0, 1.0])
  assert flipout.taylor_scores(w, u)["b"] is None


def test_taylor_prunes_the_weights_with_the_smallest_product_with_their_update():
  masks, new_w, update = _event_masks("taylor")
  scores = np.abs(new_w * update).ravel()
  expected = np.ones(scores.size, bool)
  expected[np.argsort(scores, kind="stable")[: scores.size // 2]] = False
  np.testing.assert_array_equal(masks.ravel(), expected)
  # Not magnitude's choice: the gradients reorder the weights.
  magnitude, _, _ = _event_masks("global_magnitude")
  assert (magnitude != masks).any()


def test_taylor_by_units_prunes_the_units_of_smallest_mean_product():
  masks, new_w, update = _event_masks("taylor", structure="unit")
  unit_scores = np.abs(new_w * update).mean(axis=0)
  live = masks.any(axis=0)
  assert live.sum() == 3
  assert unit_scores[~live].max() <= unit_scores[live].min()


def test_taylor_is_a_criterion_value_and_a_string():
  assert flipout.taylor_criterion().reads_updates
  with pytest.raises(ValueError, match="taylor"):
    flipout.prune(0.5, total_steps=10, criterion="tailor")
