"""Compaction through ops without a unit rule that are elementwise along the batch axis
(embedding lookups, sort, top_k, split, dynamic_slice), and a symbolic batch (``jax.export``)
where ``apply_fn`` traces to other ops under symbolic sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout
from tests.test_compact import assert_same_outputs, shapes

VOCAB, DIM, HIDDEN = 11, 6, 8
BATCH = jax.export.symbolic_shape("batch")[0]


def lm_params(seed=0):
  """An embedding, an MLP and a head: half the MLP units dead (zero outgoing weights) and
  model dim 2 read by nothing (a zero row of ``w1`` and of the head's rows)."""
  rng = np.random.default_rng(seed)
  params = {
      "embed": rng.normal(size=(VOCAB, DIM)).astype(np.float32),
      "w1": rng.normal(size=(DIM, HIDDEN)).astype(np.float32),
      "w2": rng.normal(size=(HIDDEN, VOCAB)).astype(np.float32),
  }
  params["w2"][: HIDDEN // 2] = 0.0
  params["w1"][2] = 0.0
  return params


def lookup_by_indexing(params, tokens):
  return params["embed"][tokens]


def lookup_by_take(params, tokens):
  return jnp.take(params["embed"], tokens, axis=0)


def tokens(count, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, VOCAB, size=(count, 5)), jnp.int32)


def outputs_equal(expected, got):
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    assert_same_outputs(a, b)


@pytest.mark.parametrize("lookup", [lookup_by_indexing, lookup_by_take])
def test_an_embedding_lookup_passes_the_batch_and_its_dead_model_dims_go(lookup):
  def apply_fn(params, tokens):
    h = jax.nn.gelu(lookup(params, tokens) @ params["w1"])
    return h @ params["w2"]

  params = lm_params()
  compacted = flipout.compact(apply_fn, params, tokens(2))
  # The table's rows are never removed; its model dim 2 goes with w1's row 2.
  assert shapes(compacted.params) == {"embed": (VOCAB, 5), "w1": (5, 4), "w2": (4, VOCAB)}
  assert not compacted.report.kept_by, compacted.report.kept_by
  for count in (1, 3, 7):
    x = tokens(count, seed=count)
    outputs_equal(apply_fn(params, x), jax.jit(compacted.apply)(compacted.params, x))
  # Gradients of the compact params (the table's included) are the dense ones, cut.
  loss = lambda fn, p, x: jnp.sum(jnp.sin(fn(p, x)))
  x = tokens(4, seed=9)
  dense_grads = jax.grad(loss, argnums=1)(apply_fn, params, x)
  compact_grads = jax.grad(loss, argnums=1)(compacted.apply, compacted.params, x)
  outputs_equal(compacted.shrink(dense_grads), compact_grads)


@pytest.mark.parametrize(
    "head",
    [
        lambda y: jnp.sort(y, axis=-1),
        lambda y: jax.lax.top_k(y, 3)[0],
        lambda y: jnp.argsort(y, axis=-1),
        lambda y: jnp.split(y, [4], axis=-1)[1],
        lambda y: jax.lax.dynamic_slice_in_dim(y, 2, 5, axis=-1),
    ],
    ids=["sort", "top_k", "argsort", "split", "dynamic_slice"],
)
def test_ops_elementwise_along_the_batch_take_other_batch_sizes(head):
  def apply_fn(params, tokens):
    return head(jnp.tanh(lookup_by_indexing(params, tokens) @ params["w1"]) @ params["w2"])

  params = lm_params(seed=1)
  compacted = flipout.compact(apply_fn, params, tokens(2))
  assert compacted.params["w1"].shape == (5, 4)
  for count in (1, 6):
    x = tokens(count, seed=count)
    outputs_equal(apply_fn(params, x), jax.jit(compacted.apply)(compacted.params, x))
  exported = jax.export.export(jax.jit(compacted.apply))(
      compacted.params, jax.ShapeDtypeStruct((BATCH, 5), jnp.int32)
  )
  outputs_equal(apply_fn(params, tokens(9)), exported.call(compacted.params, tokens(9)))
  assert all("no compaction rule" not in kept for kept in compacted.report.kept_by)


def cls_head(params, x):
  """Reads the first position of each sequence: ``h[:, 0]`` is a slice at concrete sizes and a
  gather under a symbolic batch."""
  h = jnp.tanh(x @ params["w1"])
  return h[:, 0] @ params["w2"]


def cls_params():
  rng = np.random.default_rng(3)
  params = {
      "w1": rng.normal(size=(4, 6)).astype(np.float32),
      "w2": rng.normal(size=(6, 2)).astype(np.float32),
  }
  params["w2"][1] = 0.0
  return params


def sequences(count, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(count, 5, 4)), jnp.float32)


def test_a_symbolic_batch_exports_a_model_that_indexes_a_batched_value():
  params = cls_params()
  compacted = flipout.compact(cls_head, params, sequences(3))
  assert shapes(compacted.params) == {"w1": (4, 5), "w2": (5, 2)}
  exported = jax.export.export(jax.jit(compacted.apply))(
      compacted.params, jax.ShapeDtypeStruct((BATCH, 5, 4), jnp.float32)
  )
  restored = jax.export.deserialize(exported.serialize(vjp_order=1))
  for count in (2, 7):
    x = sequences(count, seed=count)
    assert_same_outputs(cls_head(params, x), restored.call(compacted.params, x))
    grad = jax.grad(lambda x: jnp.sum(restored.call(compacted.params, x)))(x)
    assert_same_outputs(jax.grad(lambda x: jnp.sum(cls_head(params, x)))(x), grad)


def test_a_symbolic_batch_is_refused_where_the_program_mixes_the_batch():
  # A mean over the batch has the example batch's size in a literal: replaying it at another
  # size would be wrong, so it is refused naming the op.
  params = cls_params()
  apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]).mean(axis=0) @ p["w2"]
  compacted = flipout.compact(apply_fn, params, sequences(3))
  with pytest.raises(ValueError, match="elementwise along the batch axis.*reduce_sum over axis 0"):
    jax.export.export(jax.jit(compacted.apply))(
        compacted.params, jax.ShapeDtypeStruct((BATCH, 5, 4), jnp.float32)
    )


def test_a_symbolic_size_other_than_the_batch_is_refused():
  params = cls_params()
  compacted = flipout.compact(cls_head, params, sequences(3))
  length = jax.export.symbolic_shape("length")[0]
  with pytest.raises(ValueError, match="only the size of axis 0"):
    jax.export.export(jax.jit(compacted.apply))(
        compacted.params, jax.ShapeDtypeStruct((3, length, 4), jnp.float32)
    )
