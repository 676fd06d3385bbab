"""Exact selection with keys recomputed in every counting pass (select.py), and its memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from flipout_jax._src import select
from tests import reference

_SPECIAL = np.asarray([-1.5, -0.0, 0.0, 0.25, 0.5, 2.0, np.inf, -np.inf, np.nan], np.float32)


def _want(scores, live, k):
  """The NumPy reference: a stable argsort of the concatenated live scores."""
  flat = np.concatenate([np.ravel(s) for s in scores]).astype(np.float64)
  flat_live = np.concatenate([np.ravel(m) for m in live])
  want = np.zeros(flat.size, bool)
  want[reference._select_lowest(np.where(flat == 0, 0, flat), flat_live, k)] = True
  return want


def _lazy_lowest_k(scores, live, k):
  """lowest_k with keys given as a function (recomputed in every pass), jitted."""

  def run(scores, live, k):
    keys = lambda: [select.sortable_keys(s, m) for s, m in zip(scores, live)]
    return select.lowest_k(keys, k)

  chosen = jax.jit(run)(scores, live, k)
  return np.concatenate([np.asarray(c).ravel() for c in chosen])


@pytest.mark.parametrize("seed", range(6))
def test_lazy_keys_match_the_reference_on_ties_zeros_and_non_finite_scores(seed):
  rng = np.random.default_rng(seed)
  shapes = [(7,), (3, 5), (2, 2, 3), (40,)]
  scores = [rng.choice(_SPECIAL, size=shape) for shape in shapes]  # mostly ties
  live = [rng.random(shape) < 0.8 for shape in shapes]
  total_live = sum(int(m.sum()) for m in live)
  for k in sorted({0, 1, total_live // 3, total_live // 2, total_live - 1, total_live}):
    k = max(k, 0)
    got = _lazy_lowest_k(scores, live, k)
    np.testing.assert_array_equal(got, _want(scores, live, k), err_msg=f"k={k}")
    assert got.sum() == k


def test_ties_are_cut_by_leaf_then_index_inside_a_later_leaf():
  # 10 equal scores in each of three leaves; k = 17 takes all of the first
  # leaf's ties and the first 7 of the second's, none of the third's.
  scores = [np.full((2, 5), 0.5, np.float32) for _ in range(3)]
  live = [np.ones((2, 5), bool) for _ in range(3)]
  got = _lazy_lowest_k(scores, live, 17)
  np.testing.assert_array_equal(got, [True] * 17 + [False] * 13)
  np.testing.assert_array_equal(got, _want(scores, live, 17))


def test_lazy_and_eager_keys_choose_the_same_weights():
  rng = np.random.default_rng(1)
  scores = [np.round(rng.normal(size=(33, 17)), 1).astype(np.float32), rng.normal(size=65)]
  scores[1] = scores[1].astype(np.float32)
  live = [rng.random(s.shape) < 0.7 for s in scores]
  k = 300
  eager = jax.jit(
      lambda s, m, k: select.lowest_k([select.sortable_keys(a, b) for a, b in zip(s, m)], k)
  )(scores, live, k)
  eager = np.concatenate([np.asarray(c).ravel() for c in eager])
  np.testing.assert_array_equal(_lazy_lowest_k(scores, live, k), eager)
  np.testing.assert_array_equal(eager, _want(scores, live, k))


def test_lazy_float64_keys_rank_with_float32_keys_exactly():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    wide = 1.0 + rng.integers(0, 30, 500) * 1e-12  # ties in float32 only
    narrow = np.round(1.0 + rng.normal(size=(20, 10)) * 1e-9, 12).astype(np.float32)
    live = [rng.random(wide.shape) < 0.9, rng.random(narrow.shape) < 0.9]
    for k in (0, 123, int(live[0].sum() + live[1].sum())):
      got = _lazy_lowest_k([wide, narrow], live, k)
      scores = np.concatenate([wide, narrow.ravel().astype(np.float64)])
      order = np.flatnonzero(np.concatenate([live[0], live[1].ravel()]))
      want = np.zeros(scores.size, bool)
      want[order[np.argsort(scores[order], kind="stable")[:k]]] = True
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("size", [1, 31, 32, 33, 1000, 4099])
def test_count_matches_numpy(size):
  mask = np.random.default_rng(size).random(size) < 0.4
  assert int(jax.jit(select.count)(mask)) == np.count_nonzero(mask)
  assert int(jax.jit(select.count)(mask.reshape(size, 1))) == np.count_nonzero(mask)


# ---------------------------------------------------------------------------
# Memory: XLA's analysis of the compiled step is deterministic (no timing).
# ---------------------------------------------------------------------------

_WIDTH = 1024  # four 1024 x 1024 kernels: 4M prunable weights, activations negligible


def _params():
  shape = jax.ShapeDtypeStruct((_WIDTH, _WIDTH), jnp.float32)
  bias = jax.ShapeDtypeStruct((_WIDTH,), jnp.float32)
  return {f"layer{i}": {"kernel": shape, "bias": bias} for i in range(4)}


def _peak_bytes(tx) -> int:
  def loss(params, x):
    for i in range(4):
      layer = params[f"layer{i}"]
      x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return jnp.mean(x**2)

  def step(state, x):
    params, opt_state = state
    updates, opt_state = tx.update(jax.grad(loss)(params, x), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = _params()
  state = (params, jax.eval_shape(tx.init, params))
  x = jax.ShapeDtypeStruct((8, _WIDTH), jnp.float32)
  stats = jax.jit(step, donate_argnums=0).lower(state, x).compile().memory_analysis()
  return (
      stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      - stats.alias_size_in_bytes
      + stats.temp_size_in_bytes
  )


@pytest.mark.parametrize(
    "criterion,bound", [("flipout", 9.0), ("magnitude", 9.0), ("random", 14.0)]
)
def test_prune_adds_little_more_than_its_state_to_the_step_peak(criterion, bound):
  # Bytes per prunable weight that prune adds to the compiled step's peak:
  # the 5-byte state (an argument), plus the updates of the prunable leaves,
  # which the event branch reads and XLA therefore writes out (4 bytes; in
  # conv nets they fit under the activations and cost nothing). The event
  # recomputes each leaf's keys inside every counting pass and the steady
  # path writes masks and flip counts in place, with no copy of the params.
  # Before (all keys, scores and new weights held by the event branch, a
  # copy of the flip counts) this was 24, 20 and 20. The random criterion's
  # threefry draws keep about 5 bytes of scratch per weight of their own.
  sgd = optax.sgd(0.1, momentum=0.9)
  weights = 4 * _WIDTH * _WIDTH
  dense = _peak_bytes(sgd)
  pruned = _peak_bytes(optax.chain(sgd, flipout.prune(0.9, total_steps=100, criterion=criterion)))
  assert 5.0 <= (pruned - dense) / weights <= bound
