"""Property tests of compaction (hypothesis): random compositions of layers with random dead
units, compacted at one batch size and compared with the dense function at another and
through ``jax.export`` with a symbolic batch.

Two families, each a stack of blocks drawn by hypothesis, its weights from a drawn seed:

* sequences: an embedding lookup or a dense input layer, then residual MLPs, dense layers,
  LayerNorms, concatenations, causal multi-head attention (heads split by a reshape) and
  scans over stacked residual MLPs, read out by the last position or the mean over time;
* images: 3x3 convolutions, grouped and depthwise convolutions, BatchNorm-style
  normalisation with running statistics, residual 1x1 convolutions and concatenations,
  read out by a spatial mean.

Dead units: each kernel loses whole output columns and input rows at random (an attention
output projection, whole heads; a stacked kernel, units in every layer and in one layer).
Outputs are compared as in tests/test_compact.py; derandomized, so the suite cannot flake.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flipout_jax as flipout

from tests.test_compact import assert_same_outputs, size

_PROPERTIES = settings(
    max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
LENGTH, VOCAB, FEATURES, HEADS = 4, 11, 5, 2


class Weights:
  """Random weights with whole units dead, recorded in ``params`` under fresh names."""

  def __init__(self, seed, dead):
    self.rng = np.random.default_rng(seed)
    self.dead = dead
    self.params = {}

  def __call__(self, *shape, scale=0.5):
    name = f"p{len(self.params)}"
    self.params[name] = (self.rng.normal(size=shape) * scale).astype(np.float32)
    return name

  def kernel(self, *shape, out_axis=-1, in_axis=-2):
    """A kernel losing output and input units with probability ``dead`` each."""
    name = self(*shape)
    value = self.params[name]
    for axis in (out_axis, in_axis):
      gone = self.rng.random(shape[axis]) < self.dead
      index = [slice(None)] * len(shape)
      index[axis] = gone
      value[tuple(index)] = 0.0
    return name


def _layer_norm(h, scale, bias):
  mean = h.mean(-1, keepdims=True)
  return (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * scale + bias


def _sequence_block(kind, w, width):
  """``(apply(params, h), new width)`` of one block on ``(batch, time, width)``."""
  if kind == "mlp":
    hidden = 6
    w1, b1, w2 = w.kernel(width, hidden), w(hidden), w.kernel(hidden, width)
    return (lambda p, h: h + jax.nn.gelu(h @ p[w1] + p[b1]) @ p[w2]), width
  if kind == "dense":
    k, b = w.kernel(width, 6), w(6)
    return (lambda p, h: jnp.tanh(h @ p[k] + p[b])), 6
  if kind == "norm":
    scale, bias = w(width), w(width)
    return (lambda p, h: _layer_norm(h, p[scale], p[bias])), width
  if kind == "concat":
    k = w.kernel(width, 3)
    return (lambda p, h: jnp.concatenate([h, jnp.tanh(h @ p[k])], -1)), width + 3
  if kind == "attention":
    dim = 3
    q, k, v = (w.kernel(width, HEADS * dim) for _ in range(3))
    out = w(HEADS * dim, width)
    dead_head = w.rng.integers(HEADS + 1)  # HEADS: none dead
    w.params[out][dead_head * dim : (dead_head + 1) * dim] = 0.0

    def attend(p, h):
      batch, length, _ = h.shape
      heads = lambda y: y.reshape(batch, length, HEADS, dim)
      scores = jnp.einsum("bthd,bshd->bhts", heads(h @ p[q]), heads(h @ p[k])) / math.sqrt(dim)
      scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores, -1e9)
      mixed = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), heads(h @ p[v]))
      return h + mixed.reshape(batch, length, HEADS * dim) @ p[out]

    return attend, width
  layers, hidden = 2, 6  # "scan": stacked residual MLPs
  w1, w2 = w.kernel(layers, width, hidden), w.kernel(layers, hidden, width)
  live = np.flatnonzero(w.params[w2][1].any(1) & w.params[w1][1].any(0))
  w.params[w2][0, live[:1]] = 0.0  # a unit dead in one layer only

  def scanned(p, h):
    step = lambda h, layer: (h + jnp.tanh(h @ layer[0]) @ layer[1], None)
    return jax.lax.scan(step, h, (p[w1], p[w2]))[0]

  return scanned, width


def _stacked(first, blocks, readout):
  """``apply_fn(p, x)``: ``first``, each of ``blocks``, then ``readout``."""

  def apply_fn(p, x):
    h = first(p, x)
    for block in blocks:
      h = block(p, h)
    return readout(p, h)

  return apply_fn


def sequence_model(kinds, seed, dead, embed, last):
  w = Weights(seed, dead)
  width = 4
  first = w.kernel(VOCAB, width, out_axis=-1, in_axis=0) if embed else w.kernel(FEATURES, width)
  blocks = []
  for kind in kinds:
    block, width = _sequence_block(kind, w, width)
    blocks.append(block)
  head = w.kernel(width, 2)

  embedding = lambda p, x: p[first][x] if embed else x @ p[first]
  readout = lambda p, h: (h[:, -1] if last else h.mean(1)) @ p[head]
  apply_fn = _stacked(embedding, blocks, readout)

  def inputs(count, salt=0):
    rng = np.random.default_rng(seed + 1 + salt)
    if embed:
      return jnp.asarray(rng.integers(VOCAB, size=(count, LENGTH)), jnp.int32)
    return jnp.asarray(rng.normal(size=(count, LENGTH, FEATURES)), jnp.float32)

  return apply_fn, w.params, inputs


def _conv(h, kernel, groups=1):
  return jax.lax.conv_general_dilated(
      h,
      kernel,
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
  )


def _image_block(kind, w, channels):
  if kind == "conv":
    k, b = w.kernel(3, 3, channels, 4), w(4)
    return (lambda p, h: jax.nn.relu(_conv(h, p[k]) + p[b])), 4
  if kind in ("grouped", "depthwise"):
    groups = channels if kind == "depthwise" else 2
    out = 2 * channels
    k, b = w.kernel(3, 3, channels // groups, out), w(out)
    return (lambda p, h: jax.nn.relu(_conv(h, p[k], groups) + p[b])), out
  if kind == "bn":
    mean, var, scale, bias = w(channels), w(channels), w(channels), w(channels)
    w.params[var] = np.abs(w.params[var]) + 0.5
    norm = lambda p, h: (h - p[mean]) * (p[scale] / jnp.sqrt(p[var] + 1e-5)) + p[bias]
    return norm, channels
  if kind == "residual":
    k = w.kernel(1, 1, channels, channels)
    return (lambda p, h: h + jax.nn.relu(_conv(h, p[k]))), channels
  k = w.kernel(1, 1, channels, 2)  # "concat"
  return (lambda p, h: jnp.concatenate([h, jax.nn.relu(_conv(h, p[k]))], -1)), channels + 2


def image_model(kinds, seed, dead):
  w = Weights(seed, dead)
  channels = 2
  stem = w.kernel(3, 3, 3, channels)
  blocks = []
  for kind in kinds:
    block, channels = _image_block(kind, w, channels)
    blocks.append(block)
  head = w.kernel(channels, 2)

  apply_fn = _stacked(lambda p, x: _conv(x, p[stem]), blocks, lambda p, h: h.mean((1, 2)) @ p[head])

  def inputs(count, salt=0):
    rng = np.random.default_rng(seed + 1 + salt)
    return jnp.asarray(rng.normal(size=(count, 5, 5, 3)), jnp.float32)

  return apply_fn, w.params, inputs


def check_compaction(apply_fn, params, inputs):
  """Compacted at batch 2: same outputs at batch 3 (jitted) and at 5 through ``jax.export``
  with a symbolic batch, and never more parameters than the dense model."""
  compacted = flipout.compact(apply_fn, params, inputs(2))
  assert size(compacted.params) <= size(params)
  x = inputs(3, salt=1)
  assert_same_outputs(apply_fn(params, x), jax.jit(compacted.apply)(compacted.params, x))
  example = inputs(2)
  batch = jax.export.symbolic_shape("batch")[0]
  spec = jax.ShapeDtypeStruct((batch, *example.shape[1:]), example.dtype)
  exported = jax.export.export(jax.jit(compacted.apply))(compacted.params, spec)
  x = inputs(5, salt=2)
  assert_same_outputs(apply_fn(params, x), exported.call(compacted.params, x))


_SEQUENCE_BLOCKS = st.sampled_from(["mlp", "dense", "norm", "concat", "attention", "scan"])
_IMAGE_BLOCKS = st.sampled_from(["conv", "grouped", "depthwise", "bn", "residual", "concat"])


@_PROPERTIES
@given(
    kinds=st.lists(_SEQUENCE_BLOCKS, min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
    dead=st.sampled_from([0.2, 0.5]),
    embed=st.booleans(),
    last=st.booleans(),
)
def test_random_sequence_models_compact_to_the_same_function(kinds, seed, dead, embed, last):
  check_compaction(*sequence_model(kinds, seed, dead, embed, last))


@_PROPERTIES
@given(
    kinds=st.lists(_IMAGE_BLOCKS, min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
    dead=st.sampled_from([0.2, 0.5]),
)
def test_random_image_models_compact_to_the_same_function(kinds, seed, dead):
  check_compaction(*image_model(kinds, seed, dead))


def test_the_random_models_lose_units():
  # The properties above are not vacuous: a drawn model with dead units does shrink.
  for model in (
      sequence_model(["attention", "scan", "mlp"], seed=3, dead=0.3, embed=True, last=True),
      image_model(["grouped", "bn", "concat"], seed=3, dead=0.3),
  ):
    apply_fn, params, inputs = model
    assert size(flipout.compact(apply_fn, params, inputs(2)).params) < size(params)
