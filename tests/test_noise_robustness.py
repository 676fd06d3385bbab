"""gradient_noise on awkward gradients: float0/int leaves, half precision, its random stream."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout

# The tag documented in gradient_noise's docstring: its own stream, apart from the
# trainer's augmentation keys and the random criterion's.
_NOISE_TAG = zlib.crc32(b"flipout_jax/gradient_noise") & 0x7FFFFFFF


def _int_params():
  rng = np.random.default_rng(0)
  return {
      "w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
      "b": jnp.zeros(5, jnp.float32),
      "table": jnp.arange(12, dtype=jnp.int32).reshape(3, 4),  # 2-D: "prunable" by default
      "step": jnp.int32(7),
  }


def _int_loss(params):
  x = jnp.ones((2, 6))
  scale = 1.0 + params["table"].sum().astype(jnp.float32) * 0 + params["step"] * 0
  return jnp.sum((x @ params["w"] + params["b"]) ** 2) * scale


@pytest.mark.parametrize("jit", [False, True])
def test_float0_gradients_of_int_leaves_pass_through(jit):
  params = _int_params()
  grads = jax.grad(_int_loss, allow_int=True)(params)
  assert grads["table"].dtype == jax.dtypes.float0 and grads["step"].dtype == jax.dtypes.float0
  tx = flipout.gradient_noise(1.0, seed=0)
  update = jax.jit(tx.update) if jit else tx.update
  noisy, state = update(grads, tx.init(params), params)
  for name in ("table", "step"):
    assert noisy[name].dtype == jax.dtypes.float0 and noisy[name].shape == grads[name].shape
  assert np.any(np.asarray(noisy["w"]) != np.asarray(grads["w"]))  # float leaves still noisy
  assert int(state.count) == 1


def test_integer_gradient_leaves_are_left_alone():
  params = _int_params()
  grads = jax.tree.map(jnp.ones_like, params)  # int32 "gradients" for the int leaves
  tx = flipout.gradient_noise(1.0, seed=0)
  noisy, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for name in ("table", "step"):
    assert noisy[name].dtype == jnp.int32
    np.testing.assert_array_equal(noisy[name], grads[name])
  assert np.any(np.asarray(noisy["w"]) != 1.0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_sigma_is_computed_in_float32(dtype):
  # sum g^2 = 40_000 * 900 = 3.6e7: far past float16's 65504, and bfloat16 sums lose
  # every digit. sigma = ||g|| / sqrt(n) = 30 exactly.
  grads = {"w": jnp.full((200, 200), 30.0, dtype)}
  params = {"w": jnp.ones((200, 200), dtype)}
  tx = flipout.gradient_noise(1.0, seed=1)
  noisy, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert noisy["w"].dtype == dtype
  noise = np.asarray(noisy["w"], np.float64) - 30.0
  assert np.isfinite(noise).all()
  assert abs(noise.std() / 30.0 - 1) < 0.02  # 40k samples: ~0.4% error
  assert abs(noise.mean()) < 0.02 * 30.0


def test_noise_has_its_own_random_stream_and_resumes_from_the_count():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)}
  g = np.asarray(grads["w"], np.float64)
  sigma = np.linalg.norm(g) / np.sqrt(g.size)  # nothing pruned: all weights nonzero
  seed = 5
  tx = flipout.gradient_noise(1.0, seed=seed)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for step in range(3):
    noisy, state = update(grads, state, params)
    drawn = (np.asarray(noisy["w"], np.float64) - g) / sigma
    shared = jax.random.normal(jax.random.fold_in(jax.random.key(seed), step), (g.size,))
    own = jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _NOISE_TAG), step), (g.size,)
    )
    # Not the key the trainer's augmentation (and formerly the random criterion) use ...
    assert abs(np.corrcoef(drawn.ravel(), np.asarray(shared))[0, 1]) < 0.1
    # ... but the documented stream of its own.
    np.testing.assert_allclose(drawn.ravel(), np.asarray(own), rtol=1e-4, atol=1e-4)
    # Resuming: the key is a pure function of (seed, count), so a state rebuilt with the
    # same count draws the same noise.
    resumed = flipout.GradientNoiseState(count=jnp.asarray(step, jnp.int32))
    np.testing.assert_array_equal(update(grads, resumed, params)[0]["w"], noisy["w"])
