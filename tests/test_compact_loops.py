"""Compaction of models with loops: ``lax.scan`` over time, ``fori_loop`` and ``while_loop``
pass the batch axis (other batch sizes, ``jit``, ``grad``, a symbolic batch), units outside
the loop still go, and a loop that mixes the batch is refused naming it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout
from tests.test_compact import assert_same_outputs, shapes

BATCH = jax.export.symbolic_shape("batch")[0]


def rnn_params():
  rng = np.random.default_rng(31)
  params = {
      "w0": rng.normal(size=(4, 5)).astype(np.float32),
      "w3": rng.normal(size=(5, 6)).astype(np.float32),
      "wx": rng.normal(size=(4, 6)).astype(np.float32),
      "wh": (0.3 * rng.normal(size=(6, 6))).astype(np.float32),
      "w2": rng.normal(size=(6, 3)).astype(np.float32),
  }
  params["w3"][1] = 0.0  # unit 1 of the initial state's layer: read by nothing
  return params


def rnn(params, x):
  """x: (batch, time, 4). The initial state from the first step, a scan over time, a
  fori_loop (a scan of fixed length) and a while_loop on a counter."""
  h0 = jnp.tanh(x[:, 0] @ params["w0"]) @ params["w3"]

  def step(h, xt):
    h = jnp.tanh(xt @ params["wx"] + h @ params["wh"])
    return h, h @ params["w2"]

  h, ys = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
  h = jax.lax.fori_loop(0, 3, lambda i, c: 0.5 * c + 1.0, h)
  _, h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.sin(c[1])), (0, h))
  return jnp.swapaxes(ys, 0, 1), h


def sequences(count, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(count, 5, 4)), jnp.float32)


def outputs_equal(expected, got):
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    assert_same_outputs(a, b)


def test_a_recurrent_model_takes_other_batch_sizes_and_its_units_outside_the_loop_go():
  params = rnn_params()
  compacted = flipout.compact(rnn, params, sequences(3))
  assert shapes(compacted.params)["w0"] == (4, 4)
  assert shapes(compacted.params)["w3"] == (4, 6)
  assert shapes(compacted.params)["wh"] == (6, 6)  # the scan's carry is kept whole
  for count in (1, 7):
    x = sequences(count, seed=count)
    outputs_equal(rnn(params, x), jax.jit(compacted.apply)(compacted.params, x))
    loss = lambda fn, p, x: jnp.sum(jnp.sin(fn(p, x)[0]))  # no reverse mode through while
    dense_grad = jax.grad(loss, argnums=2)(rnn, params, x)
    assert_same_outputs(dense_grad, jax.grad(loss, argnums=2)(compacted.apply, compacted.params, x))


def test_a_recurrent_model_exports_with_a_symbolic_batch():
  # Under a symbolic batch x[:, 0] traces to a gather, so the analysed program is replayed,
  # its loops' bodies retraced at the symbolic size.
  params = rnn_params()
  compacted = flipout.compact(rnn, params, sequences(3))
  exported = jax.export.export(jax.jit(compacted.apply))(
      compacted.params, jax.ShapeDtypeStruct((BATCH, 5, 4), jnp.float32)
  )
  restored = jax.export.deserialize(exported.serialize())
  for count in (2, 9):
    x = sequences(count, seed=count)
    outputs_equal(rnn(params, x), restored.call(compacted.params, x))


def test_a_scan_over_stacked_layers_passes_the_batch():
  rng = np.random.default_rng(32)
  params = {
      "stack": (0.5 * rng.normal(size=(3, 6, 6))).astype(np.float32),
      "head": rng.normal(size=(6, 2)).astype(np.float32),
  }
  apply_fn = (
      lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w) + h, None), x[:, 0], p["stack"])[0]
      @ p["head"]
  )
  x = jnp.asarray(rng.normal(size=(3, 2, 6)), jnp.float32)
  compacted = flipout.compact(apply_fn, params, x)
  for count in (1, 5):
    x = jnp.asarray(rng.normal(size=(count, 2, 6)), jnp.float32)
    assert_same_outputs(apply_fn(params, x), jax.jit(compacted.apply)(compacted.params, x))
  exported = jax.export.export(jax.jit(compacted.apply))(
      compacted.params, jax.ShapeDtypeStruct((BATCH, 2, 6), jnp.float32)
  )
  assert_same_outputs(apply_fn(params, x), exported.call(compacted.params, x))


def test_a_while_loop_whose_condition_reads_the_batch_is_refused_naming_it():
  # The trip count depends on every example: the loop is not elementwise along the batch.
  rng = np.random.default_rng(33)
  params = {"w1": rng.normal(size=(4, 3)).astype(np.float32), "w2": np.eye(3, dtype=np.float32)}
  params["w2"][1] = 0.0  # hidden unit 1 goes, so compacted.apply is a program of its own

  def apply_fn(p, x):
    h = jnp.tanh(x @ p["w1"]) @ p["w2"]
    return jax.lax.while_loop(lambda h: jnp.max(jnp.abs(h)) > 1.0, lambda h: 0.5 * h, h)

  compacted = flipout.compact(apply_fn, params, jnp.asarray(rng.normal(size=(3, 4)), jnp.float32))
  assert compacted.params["w1"].shape == (4, 2)
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  assert_same_outputs(apply_fn(params, x), compacted.apply(compacted.params, x))
  with pytest.raises(ValueError, match="does not pass through lax.while_loop"):
    compacted.apply(compacted.params, jnp.ones((5, 4)))
