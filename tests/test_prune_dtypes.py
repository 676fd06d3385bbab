"""prune with mixed precision, half-precision and float64 params, and integer leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from flipout_jax._src import select


def _mlp_params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
      "hidden": {
          "kernel": jnp.asarray(rng.normal(size=(10, 32)) * 0.3, dtype),
          "bias": jnp.zeros(32, dtype),
      },
      "out": {"kernel": jnp.asarray(rng.normal(size=(32, 3)) * 0.3, dtype), "bias": jnp.zeros(3)},
  }


def _loss(params, x, y):
  hidden = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  logits = hidden @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def _train(tx, params, steps, grad_dtype=None):
  """Runs `steps` updates in one scan; returns params, state and the largest pruned |w| per step."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 10)), params["hidden"]["kernel"].dtype)
  y = jnp.asarray((rng.normal(size=64) > 0).astype(np.int32))

  def step(carry, _):
    params, state = carry
    grads = jax.grad(_loss)(params, x, y)
    if grad_dtype is not None:
      grads = jax.tree.map(lambda g: g.astype(grad_dtype), grads)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks = flipout.masks(state)
    leaked = jnp.maximum(
        *[
            jnp.max(jnp.where(masks[k]["kernel"], 0, jnp.abs(params[k]["kernel"])))
            for k in ("hidden", "out")
        ]
    )
    return (params, state), leaked.astype(jnp.float32)

  run = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), None, length=steps))
  (params, state), leaked = run(params, tx.init(params))
  return params, state, np.asarray(leaked)


@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_gradients_on_float32_params(grad_dtype):
  # sgd keeps the gradients' dtype, so prune sees bf16/f16 updates of f32
  # params: the update that zeroes a pruned weight must not round.
  tx = optax.chain(optax.sgd(0.05), flipout.prune(0.9, total_steps=60))
  params, state, leaked = _train(tx, _mlp_params(), 300, grad_dtype)
  assert np.all(leaked == 0.0), f"pruned weights off zero at steps {np.flatnonzero(leaked)}"
  assert all(np.isfinite(np.asarray(w)).all() for w in jax.tree.leaves(params))
  live = flipout.masks(state)  # raises if the chain-order check tripped
  assert int(state[-1].count) == 300
  num_prunable = 10 * 32 + 32 * 3
  assert sum(int(np.sum(m)) for m in jax.tree.leaves(live)) == num_prunable - round(
      0.9 * num_prunable
  )
  for name in ("hidden", "out"):
    kernel = np.asarray(params[name]["kernel"])
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel[~np.asarray(live[name]["kernel"])], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_params_train_and_prune(dtype):
  tx = optax.chain(optax.sgd(0.05, momentum=0.9), flipout.prune(0.9, total_steps=60))
  params, state, leaked = _train(tx, _mlp_params(dtype=dtype), 100)
  assert np.all(leaked == 0.0)
  report = flipout.summary(params)
  assert report.size - report.live == round(0.9 * report.size)
  assert params["out"]["kernel"].dtype == dtype


def _prune_once(params, criterion="flipout", target=0.5):
  """One event at step 2 of 4 with zero updates; returns the masks."""
  tx = flipout.prune(target, total_steps=4, criterion=criterion)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(np.asarray, flipout.masks(state))


def test_float16_tiny_weights_are_pruned_by_saliency_not_position():
  # |w|^2 of these float16 weights underflows in float16 (below ~2.4e-4 the
  # square is 0), so scores must be computed in float32.
  values = np.geomspace(1e-6, 1e-2, 64).astype(np.float16)
  assert len(np.unique(values)) == 64
  order = np.random.default_rng(0).permutation(64)
  params = {"w": jnp.asarray(values[order].reshape(8, 8))}
  live = _prune_once(params)["w"].ravel()
  np.testing.assert_array_equal(live, order >= 32)  # the 32 largest survive


def test_float16_scores_are_float32():
  w = jnp.asarray([[1e-5, 1.7e-4]], jnp.float16)
  scores = flipout.flipout_scores({"w": w}, {"w": jnp.zeros((1, 2), jnp.int32)})["w"]
  assert scores.dtype == jnp.float32
  assert 0 < scores[0, 0] < scores[0, 1]


def test_float64_scores_are_ranked_exactly():
  # Equal in float32 (all round to 1.0) but ordered in float64, smallest last.
  with jax.enable_x64(True):
    close = 1.0 + np.asarray([4e-12, 3e-12, 2e-12, 1e-12])
    params = {
        "a": jnp.asarray(np.concatenate([close, [2.0, 3.0, 4.0, 5.0]]).reshape(2, 4)),
        "b": jnp.asarray(np.asarray([[1.0, 6.0], [7.0, 8.0]], np.float32)),
    }
    assert params["a"].dtype == jnp.float64 and params["b"].dtype == jnp.float32
    scores = flipout.flipout_scores(params, jax.tree.map(jnp.zeros_like, params))
    assert scores["a"].dtype == jnp.float64
    for criterion in ("flipout", "global_magnitude"):
      # 12 weights, 3 pruned: b's exact 1.0, then the two smallest of `close`.
      live = _prune_once(params, criterion, target=0.25)
      np.testing.assert_array_equal(live["a"].ravel(), [1, 1, 0, 0, 1, 1, 1, 1])
      np.testing.assert_array_equal(live["b"].ravel(), [0, 1, 1, 1])


def test_float64_keys_keep_the_order_of_float64_scores():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    scores = np.concatenate(
        [
            1.0 + rng.integers(0, 50, 200) * 1e-13,  # ties in float32, distinct in float64
            rng.normal(size=200),
            [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300, -1e-300],
        ]
    )
    keys = np.asarray(select.sortable_keys(jnp.asarray(scores), True))
    assert keys.dtype == np.uint64
    clean = np.where(np.isnan(scores), np.inf, scores)
    order = np.argsort(keys, kind="stable")
    np.testing.assert_array_equal(order, np.argsort(clean, kind="stable"))


def _int_params():
  return {
      "dense": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)},
      "table": jnp.arange(12, dtype=jnp.int32).reshape(3, 4),
  }


def test_integer_leaves_are_not_prunable_by_default():
  params = _int_params()
  tx = flipout.prune(0.5, total_steps=10)
  state = tx.init(params)
  assert flipout.masks(state)["table"] is None and flipout.flip_counts(state)["table"] is None
  updates = {
      "dense": {"kernel": jnp.full((4, 5), 0.1), "bias": jnp.ones(5)},
      "table": jnp.full((3, 4), 7, jnp.int32),
  }
  new_updates, _ = jax.jit(tx.update)(updates, state, params)
  assert new_updates["table"].dtype == jnp.int32
  np.testing.assert_array_equal(new_updates["table"], updates["table"])
  assert new_updates["dense"]["bias"].dtype == jnp.float32


@pytest.mark.parametrize(
    "make",
    [
        lambda: flipout.prune(0.5, total_steps=10, where=lambda path, leaf: np.ndim(leaf) >= 2),
        lambda: flipout.prune(
            0.5, total_steps=10, where={"dense": {"kernel": True, "bias": False}, "table": True}
        ),
        lambda: flipout.fixed_masks(
            {"dense": {"kernel": None, "bias": None}, "table": jnp.ones((3, 4), bool)}
        ),
    ],
)
def test_integer_leaf_selected_explicitly_is_refused_at_init(make):
  tx = make()
  with pytest.raises((TypeError, ValueError), match=r"\['table'\].*int32.*floating"):
    tx.init(_int_params())


@pytest.mark.parametrize("fraction,live_fraction", [(0.0, 0.9), (0.3, 0.9), (1.0, 0.9), (1.0, 1.0)])
def test_lowest_k_ranks_float64_with_float32_exactly_on_large_arrays(fraction, live_fraction):
  # Large arrays, 64 bisection passes over uint64 keys (k = 0 and k = N with
  # every weight live are the ends of the range); float32 keys are widened to
  # rank with float64 ones.
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    wide = 1.0 + rng.integers(0, 1000, 1_100_000) * 1e-12  # ties in float32 only
    narrow = np.round(1.0 + rng.normal(size=(300, 1000)) * 1e-9, 12).astype(np.float32)
    live = [rng.random(wide.shape) < live_fraction, rng.random(narrow.shape) < live_fraction]
    k = int(round(fraction * (live[0].sum() + live[1].sum())))
    chosen = jax.jit(
        lambda a, b, la, lb, k: select.lowest_k(
            [select.sortable_keys(a, la), select.sortable_keys(b, lb)], k
        )
    )(wide, narrow, live[0], live[1], k)
    scores = np.concatenate([wide, narrow.ravel().astype(np.float64)])
    order = np.flatnonzero(np.concatenate([live[0], live[1].ravel()]))
    want = np.zeros(scores.size, bool)
    want[order[np.argsort(scores[order], kind="stable")[:k]]] = True
    got = np.concatenate([np.asarray(chosen[0]), np.asarray(chosen[1]).ravel()])
    np.testing.assert_array_equal(got, want)
