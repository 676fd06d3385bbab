"""Tests for the compaction of attention: heads split from features by a reshape, and the
q·k contraction.

A reshape ``(batch, time, heads * dim) -> (batch, time, heads, dim)`` splits one feature axis
into two (``compact.rules.Split``): a feature is a sub-unit of its head and of its position in
the head, so a whole dead head goes (its q, k and v columns, its output projection's rows, and
the head count of every reshape), and so does a position in the head dead in every head; a
single dead feature of a live head stays. A contraction drops a position zero on either side:
q's dim zero in every head takes k's dim with it, not v's. Outputs are compared as in
tests/test_compact.py (``atol = 1e-5 * max(1, max |dense output|)``), at the example batch size
and two others, jitted, differentiated, and through ``jax.export`` with a symbolic batch.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout

from tests import compact_checks
from tests.test_compact import assert_same_outputs, shapes, size

HEADS, DIM, LENGTH = 4, 3, 5
WIDTH = HEADS * DIM
DEAD_HEAD = 1


def attention(p, x):
  """Causal multi-head self-attention; q, k and v from one fused projection when ``p`` has
  ``qkv``, split into heads as ``(batch, time, 3, heads, dim)``."""
  batch, length, _ = x.shape
  if "qkv" in p:
    qkv = (x @ p["qkv"]).reshape(batch, length, 3, HEADS, DIM)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  else:
    heads = lambda y: y.reshape(batch, length, HEADS, DIM)
    q, k, v = heads(x @ p["q"]), heads(x @ p["k"]), heads(x @ p["v"] + p["v_bias"])
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(DIM)
  scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -1e9)
  attended = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v)
  return attended.reshape(batch, length, WIDTH) @ p["out"]


def attention_params(seed=0, fused=False):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  if fused:
    return {"qkv": normal(WIDTH, 3 * WIDTH), "out": normal(WIDTH, WIDTH)}
  return {
      "q": normal(WIDTH, WIDTH),
      "k": normal(WIDTH, WIDTH),
      "v": normal(WIDTH, WIDTH),
      "v_bias": normal(WIDTH),
      "out": normal(WIDTH, WIDTH),
  }


def head(h):
  return np.arange(h * DIM, (h + 1) * DIM)


def sequences(count, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(count, LENGTH, WIDTH)), jnp.float32)


def check_everywhere(params, compacted):
  compact_checks.check_other_batch_sizes(attention, params, compacted, sequences)


def reshape_sizes(compacted, count=2):
  """The ``new_sizes`` of every reshape in the compact program."""
  jaxpr = jax.make_jaxpr(compacted.apply)(compacted.params, sequences(count))
  return [eqn.params["new_sizes"] for eqn in jaxpr.eqns if eqn.primitive.name == "reshape"]


def test_a_dead_head_loses_its_q_k_v_columns_and_output_rows():
  params = attention_params()
  params["out"][head(DEAD_HEAD)] = 0.0  # nothing reads the head
  compacted = flipout.compact(attention, params, sequences(2))
  kept = np.setdiff1d(np.arange(WIDTH), head(DEAD_HEAD))
  for name in ("q", "k", "v"):
    np.testing.assert_array_equal(compacted.kept[name][1], kept)
  np.testing.assert_array_equal(compacted.kept["out"][0], kept)
  assert size(compacted.params) == size(params) - DIM * (4 * WIDTH + 1)
  assert (2, LENGTH, HEADS - 1, DIM) in reshape_sizes(compacted)  # the head count rewritten
  check_everywhere(params, compacted)


def test_a_head_whose_values_are_zero_goes_too():
  # v's columns of the head are zero with zero bias: the head adds nothing to any output, so
  # its q and k, read only by its own scores, go with it.
  params = attention_params()
  params["v"][:, head(DEAD_HEAD)] = 0.0
  params["v_bias"][head(DEAD_HEAD)] = 0.0
  compacted = flipout.compact(attention, params, sequences(2))
  assert shapes(compacted.params)["q"] == (WIDTH, WIDTH - DIM)
  assert shapes(compacted.params)["out"] == (WIDTH - DIM, WIDTH)
  check_everywhere(params, compacted)


def test_a_fused_qkv_projection_loses_the_dead_heads_columns_of_q_k_and_v():
  params = attention_params(fused=True)
  params["out"][head(DEAD_HEAD)] = 0.0
  compacted = flipout.compact(attention, params, sequences(2))
  columns = np.concatenate([WIDTH * part + head(DEAD_HEAD) for part in range(3)])
  np.testing.assert_array_equal(
      compacted.kept["qkv"][1], np.setdiff1d(np.arange(3 * WIDTH), columns)
  )
  assert (2, LENGTH, 3, HEADS - 1, DIM) in reshape_sizes(compacted)
  check_everywhere(params, compacted)


def test_a_dim_zero_in_every_query_head_goes_from_q_and_k_not_v():
  params = attention_params()
  dims = [h * DIM + 1 for h in range(HEADS)]
  params["q"][:, dims] = 0.0  # q·k never reads k's dim 1
  compacted = flipout.compact(attention, params, sequences(2))
  kept = np.setdiff1d(np.arange(WIDTH), dims)
  np.testing.assert_array_equal(compacted.kept["q"][1], kept)
  np.testing.assert_array_equal(compacted.kept["k"][1], kept)
  assert shapes(compacted.params)["v"] == (WIDTH, WIDTH)
  assert (2, LENGTH, HEADS, DIM - 1) in reshape_sizes(compacted)
  check_everywhere(params, compacted)


@pytest.mark.parametrize("fused", [False, True])
def test_a_single_dead_feature_of_a_live_head_stays(fused):
  # Query feature 4 (head 1, dim 1) is zero: removing it alone would leave the reshape into
  # heads one feature short, so a feature goes only with its whole head or dim.
  params = attention_params(fused=fused)
  params["qkv" if fused else "q"][:, 4] = 0.0
  compacted = flipout.compact(attention, params, sequences(2))
  assert size(compacted.params) == size(params)
  check_everywhere(params, compacted)


def test_a_reshape_splitting_the_batch_axis_is_refused_at_other_batch_sizes():
  # (batch * time, width) -> (batch, time, width): the batch's size is in the reshape, which
  # a replay cannot substitute; compaction still removes the dead head.
  params = attention_params()
  params["out"][head(DEAD_HEAD)] = 0.0
  flat = lambda p, x: attention(p, x.reshape(-1, LENGTH, WIDTH))
  x = sequences(2).reshape(-1, WIDTH)
  compacted = flipout.compact(flat, params, x)
  assert shapes(compacted.params)["q"] == (WIDTH, WIDTH - DIM)
  assert_same_outputs(flat(params, x), compacted.apply(compacted.params, x))
  batch = jax.export.symbolic_shape("batch")[0]
  with pytest.raises(ValueError, match="reshape splitting"):
    jax.export.export(jax.jit(compacted.apply))(
        compacted.params, jax.ShapeDtypeStruct((batch, WIDTH), jnp.float32)
    )
