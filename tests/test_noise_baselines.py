"""gradient_noise statistics, SNIP, Hoyer-Square and the sparsity report."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout


def _noise_setup():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(200, 500)).astype(np.float32)
  kernel[:, :150] = 0.0  # 30% pruned
  params = {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(20000)}  # zero bias is live
  grads = {
      "kernel": jnp.asarray(rng.normal(size=(200, 500)) + 1.0, jnp.float32),
      "bias": jnp.asarray(rng.normal(size=20000) * 0.5, jnp.float32),
  }
  return params, grads


def test_noise_sigma_uses_live_weights_only():
  params, grads = _noise_setup()
  tx = flipout.gradient_noise(scale=2.0, seed=3)
  noisy, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  live = np.asarray(params["kernel"]) != 0
  g = np.asarray(grads["kernel"], np.float64)
  want_kernel_sigma = 2.0 * np.linalg.norm(g * live) / np.sqrt(g.size)
  dense_sigma = 2.0 * np.linalg.norm(g) / np.sqrt(g.size)
  noise = np.asarray(noisy["kernel"], np.float64) - g
  assert abs(noise.std() / want_kernel_sigma - 1) < 0.01  # 100k samples: ~0.2% error
  assert abs(noise.mean()) < 0.01 * want_kernel_sigma
  assert abs(noise.std() / dense_sigma - 1) > 0.05  # the mask matters here
  bias_noise = np.asarray(noisy["bias"], np.float64) - np.asarray(grads["bias"])
  want_bias_sigma = 2.0 * np.linalg.norm(np.asarray(grads["bias"], np.float64)) / np.sqrt(20000)
  assert abs(bias_noise.std() / want_bias_sigma - 1) < 0.03  # zero biases are not "pruned"


def test_noise_is_seeded_per_step_and_respects_where():
  params, grads = _noise_setup()
  tx = flipout.gradient_noise(1.0, seed=0, where=lambda path, leaf: leaf.ndim == 2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  first, state = update(grads, state, params)
  second, _ = update(grads, state, params)
  again, _ = update(grads, tx.init(params), params)
  np.testing.assert_array_equal(first["kernel"], again["kernel"])
  assert np.any(np.asarray(first["kernel"]) != np.asarray(second["kernel"]))
  np.testing.assert_array_equal(first["bias"], grads["bias"])
  silent = flipout.gradient_noise(0.0)
  np.testing.assert_array_equal(
      silent.update(grads, silent.init(params), params)[0]["kernel"], grads["kernel"]
  )


def test_snip_keeps_largest_connection_sensitivity():
  rng = np.random.default_rng(1)
  params = {
      "a": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
      "bias": jnp.ones(4),
  }
  coefficients = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), params)
  loss = lambda p, batch: sum(
      jnp.sum(w * c) * batch for w, c in zip(jax.tree.leaves(p), jax.tree.leaves(coefficients))
  )
  masks = flipout.snip(loss, params, 2.0, 0.75)
  assert masks["bias"] is None
  scores = np.concatenate(
      [
          np.abs(2.0 * np.asarray(coefficients[k]) * np.asarray(params[k])).ravel()
          for k in ("a", "b")
      ]
  )
  pruned = np.argsort(scores, kind="stable")[: round(0.75 * scores.size)]
  want = np.ones(scores.size, bool)
  want[pruned] = False
  got = np.concatenate([np.asarray(masks[k]).ravel() for k in ("a", "b")])
  np.testing.assert_array_equal(got, want)


def test_hoyer_square_matches_formula():
  rng = np.random.default_rng(2)
  params = {
      "a": rng.normal(size=(5, 7)).astype(np.float32),
      "b": np.zeros((3, 3), np.float32),
      "bias": np.ones(7, np.float32),
  }
  a = params["a"].astype(np.float64)
  want = np.abs(a).sum() ** 2 / (a**2).sum()
  got = flipout.hoyer_square(jax.tree.map(jnp.asarray, params))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert np.isfinite(float(jax.grad(flipout.hoyer_square)(params)["b"].sum()))


def test_summary_counts_dead_units():
  kernel = np.ones((3, 4), np.float32)
  kernel[:, 2] = 0.0  # output unit 2 has no live input: dead
  kernel[0, :] = 0.0  # input unit 0 feeds nothing: dead
  conv = np.zeros((3, 3, 2, 5), np.float32)
  conv[1, 1, 0, 4] = 1.0  # only filter 4 has a live weight, only input channel 0 is used
  report = flipout.summary({"dense": {"kernel": kernel, "bias": np.zeros(4)}, "conv": conv})
  conv_report, dense_report = report.layers  # leaves sort by key: conv, dense
  assert (dense_report.dead_outputs, dense_report.dead_inputs) == (1, 1)
  assert dense_report.live == 6 and dense_report.size == 12
  assert (conv_report.dead_outputs, conv_report.outputs) == (4, 5)
  assert (conv_report.dead_inputs, conv_report.inputs) == (1, 2)
  assert report.live == 7 and report.size == 12 + 90
  assert flipout.sparsity({"w": kernel}) == 0.5
  assert "dense" in str(report) and report.to_dict()["layers"][1]["dead_outputs"] == 1


def test_snip_then_fixed_masks_trains_sparse():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "b": jnp.zeros(4)}
  loss = lambda p, batch: jnp.mean((batch @ p["w"] + p["b"]) ** 2)
  masks = flipout.snip(loss, params, x, 0.5)
  tx = optax.chain(optax.adam(1e-2), flipout.fixed_masks(masks))
  state = tx.init(params)
  for _ in range(5):
    updates, state = tx.update(jax.grad(loss)(params, x), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(params["w"]) != 0, np.asarray(masks["w"]))
  with pytest.raises(ValueError, match="masks do not match params"):
    flipout.fixed_masks(masks).init({"other": jnp.ones((6, 4))})
