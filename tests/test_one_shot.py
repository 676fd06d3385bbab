"""One-shot pruning: activation_norms reads the inputs each kernel multiplies from any traced
model; wanda keeps, per output unit, the weights of largest |w| * ||x||."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout


def test_wanda_masks_a_hand_computed_example():
  # Two outputs (columns) of three inputs; input norms 1, 10, 0.1.
  kernel = jnp.array([[4.0, 1.0], [1.0, 2.0], [3.0, 50.0]])
  norms = {"w": jnp.array([[1.0], [10.0], [0.1]])}
  # Scores: column 0: 4, 10, 0.3 -> prune input 2; column 1: 1, 20, 5 -> prune input 0.
  masks = flipout.wanda({"w": kernel}, norms, 1 / 3)
  np.testing.assert_array_equal(masks["w"], [[True, False], [True, True], [False, True]])
  # Without norms: magnitude per output (column 0 prunes input 1, column 1 input 0).
  magnitude = flipout.wanda({"w": kernel}, None, 1 / 3)
  np.testing.assert_array_equal(magnitude["w"], [[True, False], [False, True], [True, True]])


def test_two_of_four_keeps_the_two_best_of_every_run_of_four_inputs():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  norm = jnp.asarray(rng.uniform(0.1, 2, size=(8, 1)), jnp.float32)
  masks = flipout.wanda({"w": kernel}, {"w": norm}, structure="2:4")["w"]
  scores = np.abs(np.asarray(kernel)) * np.asarray(norm)
  for run in range(2):
    block = scores[4 * run : 4 * run + 4]
    best = np.argsort(-block, axis=0, kind="stable")[:2]
    expected = np.zeros_like(block, bool)
    np.put_along_axis(expected, best, True, axis=0)
    np.testing.assert_array_equal(masks[4 * run : 4 * run + 4], expected)
  assert masks.sum() == kernel.size // 2


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(6, name="hidden")(x)))


def test_activation_norms_are_the_norms_of_each_layers_inputs():
  model = _MLP()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(7, 4)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  norms = flipout.activation_norms(apply_fn, params, x)
  np.testing.assert_allclose(norms["hidden"]["kernel"][:, 0], np.linalg.norm(x, axis=0), rtol=1e-5)
  hidden = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  np.testing.assert_allclose(
      norms["out"]["kernel"][:, 0], np.linalg.norm(hidden, axis=0), rtol=1e-5
  )
  assert norms["out"]["bias"] is None
  # Any tree with a where: the biases stay dense, the kernels lose half of each unit's inputs.
  masks = flipout.wanda(params, norms, 0.5, where=lambda path, leaf: path[-1].key == "kernel")
  assert masks["hidden"]["bias"] is None
  assert masks["hidden"]["kernel"].sum(axis=0).tolist() == [2] * 6
  assert masks["out"]["kernel"].sum(axis=0).tolist() == [3] * 3


def test_convolution_norms_are_per_input_channel():
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 3)), jnp.float32)
  kernel = jnp.ones((3, 3, 3, 4))
  conv = lambda p, x: jax.lax.conv_general_dilated(
      x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  norms = flipout.activation_norms(conv, {"k": kernel}, images)["k"]
  assert norms.shape == (1, 1, 3, 1)
  expected = np.sqrt((np.asarray(images) ** 2).sum(axis=(0, 1, 2)))
  np.testing.assert_allclose(norms.ravel(), expected, rtol=1e-5)


def test_wanda_compiles_under_jit_and_refuses_what_it_cannot_do():
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}
  norms = {"w": jnp.ones((8, 1)), "b": None}
  jitted = jax.jit(lambda p, n: flipout.wanda(p, n, 0.25))
  assert int(jitted(params, norms)["w"].sum()) == 24
  with pytest.raises(ValueError, match="no activation norms"):
    flipout.wanda({"v": jnp.ones((4, 4))}, {"v": None}, 0.5)
  with pytest.raises(ValueError, match="target_sparsity"):
    flipout.wanda(params, norms, 1.5)
  with pytest.raises(ValueError, match="give --sparsity|reaches sparsity"):
    flipout.wanda(params, norms, 0.3, structure="2:4")
  with pytest.raises(ValueError, match="not units"):
    flipout.wanda(params, norms, 0.5, structure="unit")
  with pytest.raises(ValueError, match="not a multiple of M=4"):
    flipout.wanda({"w": jnp.ones((6, 2))}, None, structure="2:4")
