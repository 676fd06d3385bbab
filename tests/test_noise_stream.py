"""gradient_noise draws exactly jax.random.normal's stream, leaf by leaf (noise.py)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout
from flipout_jax._src import noise


@pytest.mark.parametrize("start,size", [(0, 1), (0, 1000), (7, 33), (123_457, 4099)])
def test_unrolled_threefry_slices_are_bit_identical_to_jax_random_normal(start, size):
  key = noise._noise_key(3, jnp.int32(11))
  whole = jax.random.normal(key, (start + size,), jnp.float32)
  part = jax.jit(noise._stream_normals, static_argnums=(1, 2))(key, start, size)
  np.testing.assert_array_equal(np.asarray(part), np.asarray(whole)[start:])


@pytest.mark.parametrize("seed", [0, 3, -5, 2**31 - 1])
@pytest.mark.parametrize("count", [0, 1, 7, 123_456, 2**31 - 1])
def test_the_unrolled_fold_in_gives_the_key_words_of_jax_random_fold_in(seed, count):
  words = jax.jit(lambda c: noise._noise_key_words(seed, c))(jnp.int32(count))
  want = jax.random.key_data(noise._noise_key(seed, jnp.int32(count)))
  np.testing.assert_array_equal(np.asarray(words), np.asarray(want))


def _noise_of(tx, grads, params, count):
  state = flipout.GradientNoiseState(count=jnp.asarray(count, jnp.int32))
  noisy, _ = jax.jit(tx.update)(grads, state, params)
  return noisy


def test_every_leaf_gets_its_slice_of_one_normal_draw():
  rng = np.random.default_rng(0)
  params = {
      "a": jnp.asarray(rng.normal(size=(30, 7)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=5), jnp.float32),
      "c": jnp.asarray(rng.normal(size=(4, 4, 3)), jnp.float32),
  }
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  seed, count = 9, 4
  noisy = _noise_of(flipout.gradient_noise(1.0, seed=seed), grads, params, count)
  leaves = jax.tree.leaves(grads)
  normals = np.asarray(
      jax.random.normal(noise._noise_key(seed, jnp.int32(count)), (sum(g.size for g in leaves),))
  )
  start = 0
  for name in ("a", "b", "c"):  # jax.tree.leaves order
    g = np.asarray(grads[name])
    sigma = np.float32(np.linalg.norm(g.ravel()) / np.sqrt(g.size))
    want = g + sigma * normals[start : start + g.size].reshape(g.shape)
    np.testing.assert_allclose(np.asarray(noisy[name]), want, rtol=1e-6, atol=1e-6)
    start += g.size


def test_other_key_implementations_fall_back_to_their_own_draw():
  params = {"w": jnp.ones((16, 8))}
  grads = {"w": jnp.full((16, 8), 2.0)}
  state = flipout.GradientNoiseState(count=jnp.asarray(0, jnp.int32))
  threefry = flipout.gradient_noise(1.0, seed=1).update(grads, state, params)[0]["w"]
  with jax.default_prng_impl("rbg"):
    # Eager: a jitted function traced before would keep its threefry trace.
    rbg = flipout.gradient_noise(1.0, seed=1).update(grads, state, params)[0]["w"]
    key = noise._noise_key(1, jnp.int32(0))
    want = 2.0 + 2.0 * np.asarray(jax.random.normal(key, (128,))).reshape(16, 8)
  np.testing.assert_allclose(np.asarray(rbg), want, rtol=1e-6)
  assert not np.allclose(np.asarray(rbg), np.asarray(threefry))


def test_the_noise_is_drawn_from_the_documented_stream():
  # key_t = fold_in(fold_in(key(seed), tag), t), the tag built here from its documented
  # definition (docs/algorithm.md), not read back from noise.py.
  tag = zlib.crc32(b"flipout_jax/gradient_noise") & 0x7FFFFFFF
  seed, count = 5, 3
  params = {"w": jnp.ones((8, 4))}
  grads = {"w": jnp.full((8, 4), 2.0)}  # sigma = ||g|| / sqrt(n) = 2
  noisy = _noise_of(flipout.gradient_noise(1.0, seed=seed), grads, params, count)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), tag), count)
  want = 2.0 + 2.0 * np.asarray(jax.random.normal(key, (32,))).reshape(8, 4)
  np.testing.assert_allclose(np.asarray(noisy["w"]), want, rtol=1e-6)
