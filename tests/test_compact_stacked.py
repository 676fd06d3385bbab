"""Tests for the compaction of units inside a ``lax.scan``'s body (``compact.stacked``).

Layers stacked along a leading axis and scanned run one body: a unit goes when it is dead in
every layer (its stacked weights cut along the unit's axis in every layer), and stays when it
is live in any; a unit whose removal would leave a nonzero constant stays (nothing is folded
inside a body); a stacked param another op also reads is not cut. Outputs are compared as in
tests/test_compact.py, at three batch sizes, jitted, differentiated, and through
``jax.export`` with a symbolic batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flipout_jax as flipout

from tests import compact_checks
from tests.test_compact import size

LAYERS, WIDTH, HIDDEN, FEATURES = 3, 6, 8, 4
DEAD = (2, 5)  # units dead in every layer
DEAD_IN_FIRST = 3  # a unit dead in layer 0 only


def stacked_mlp(p, x):
  """A residual MLP whose layers are scanned over ``p["layers"]`` (stacked on axis 0)."""

  def layer(h, w):
    return h + jnp.tanh(h @ w["w1"] + w["b1"]) @ w["w2"], None

  h, _ = jax.lax.scan(layer, x @ p["inp"], p["layers"])
  return h @ p["out"]


def stacked_params(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  layers = {
      "w1": normal(LAYERS, WIDTH, HIDDEN),
      "b1": normal(LAYERS, HIDDEN),
      "w2": normal(LAYERS, HIDDEN, WIDTH),
  }
  layers["w2"][:, list(DEAD)] = 0.0  # nothing reads these units in any layer
  layers["w2"][0, DEAD_IN_FIRST] = 0.0
  return {"inp": normal(FEATURES, WIDTH), "layers": layers, "out": normal(WIDTH, 2)}


def per_unit():
  """Parameters one hidden unit owns in all layers: its w1 column, bias and w2 row."""
  return LAYERS * (WIDTH + 1 + WIDTH)


def inputs(count, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(count, FEATURES)), jnp.float32)


def check_everywhere(apply_fn, params, compacted):
  compact_checks.check_other_batch_sizes(apply_fn, params, compacted, inputs)


def test_units_dead_in_every_layer_go_from_every_layer():
  params = stacked_params()
  compacted = flipout.compact(stacked_mlp, params, inputs(2))
  kept = np.setdiff1d(np.arange(HIDDEN), DEAD)
  np.testing.assert_array_equal(compacted.kept["layers"]["w1"][2], kept)
  np.testing.assert_array_equal(compacted.kept["layers"]["w2"][1], kept)
  assert size(compacted.params) == size(params) - len(DEAD) * per_unit()
  check_everywhere(stacked_mlp, params, compacted)


def test_a_unit_that_leaves_a_constant_in_the_body_stays():
  # Unit 0 has no input weight in any layer: it is the constant tanh(b1[l, 0]), zero in layer
  # 0 only, so it stays; with zero biases in every layer it is tanh(0) = 0 and goes.
  params = stacked_params()
  params["layers"]["w1"][:, :, 0] = 0.0
  params["layers"]["b1"][0, 0] = 0.0
  compacted = flipout.compact(stacked_mlp, params, inputs(2))
  assert 0 in compacted.kept["layers"]["w1"][2]
  check_everywhere(stacked_mlp, params, compacted)
  params["layers"]["b1"][:, 0] = 0.0
  compacted = flipout.compact(stacked_mlp, params, inputs(2))
  assert 0 not in compacted.kept["layers"]["w1"][2]
  check_everywhere(stacked_mlp, params, compacted)


def test_a_stacked_param_read_outside_the_scan_is_kept_whole():
  params = stacked_params()
  read_twice = lambda p, x: stacked_mlp(p, x) + jnp.sum(p["layers"]["w2"])
  compacted = flipout.compact(read_twice, params, inputs(2))
  assert size(compacted.params["layers"]["w2"]) == size(params["layers"]["w2"])
  check_everywhere(read_twice, params, compacted)


def test_round_to_rounds_the_width_inside_the_body():
  params = stacked_params()
  params["layers"]["w2"][:, 7] = 0.0  # three dead units: five kept, rounded up to six
  compacted = flipout.compact(stacked_mlp, params, inputs(2), round_to=2)
  assert compacted.params["layers"]["w1"].shape == (LAYERS, WIDTH, 6)
  check_everywhere(stacked_mlp, params, compacted)


def recurrent(p, x):
  """An RNN over the features of ``x`` (one per step) whose readout's hidden layer sits in the
  body, its weights constants of the scan rather than ``xs``."""

  def step(h, x_t):
    h = jnp.tanh(h @ p["wh"] + x_t[:, None] * p["wx"])
    return h, jnp.maximum(h @ p["w1"], 0.0) @ p["w2"]

  _, ys = jax.lax.scan(step, jnp.zeros((x.shape[0], WIDTH)), x.T)
  return ys.sum(0)


def test_a_scans_constant_weights_lose_their_dead_units():
  rng = np.random.default_rng(1)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {
      "wh": normal(WIDTH, WIDTH),
      "wx": normal(1, WIDTH),
      "w1": normal(WIDTH, HIDDEN),
      "w2": normal(HIDDEN, 2),
  }
  params["w2"][list(DEAD)] = 0.0
  compacted = flipout.compact(recurrent, params, inputs(2))
  assert compacted.params["w1"].shape == (WIDTH, HIDDEN - len(DEAD))
  check_everywhere(recurrent, params, compacted)


class Block(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(WIDTH, HIDDEN, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, WIDTH, rngs=rngs)

  def __call__(self, h):
    return h + self.fc2(nnx.gelu(self.fc1(h)))


class StackedNet(nnx.Module):
  """Blocks made by ``nnx.vmap`` and applied by ``nnx.scan``."""

  def __init__(self, rngs):

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return Block(rngs)

    self.inp = nnx.Linear(FEATURES, WIDTH, rngs=rngs)
    self.blocks = blocks(rngs)
    self.out = nnx.Linear(WIDTH, 2, rngs=rngs)

  def __call__(self, x):

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(h, block):
      return block(h)

    return self.out(step(self.inp(x), self.blocks))


def test_an_nnx_scan_over_stacked_blocks_loses_the_units_dead_in_every_block():
  model = StackedNet(nnx.Rngs(0))
  model.blocks.fc2.kernel[...] = model.blocks.fc2.kernel[...].at[:, list(DEAD)].set(0.0)
  graphdef, state = nnx.split(model)
  apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)
  compacted = flipout.compact(apply_fn, state, inputs(2))
  assert compacted.params["blocks"]["fc1"]["kernel"].shape == (LAYERS, WIDTH, HIDDEN - 2)
  assert size(compacted.params) == size(state) - len(DEAD) * LAYERS * (2 * WIDTH + 1)
  check_everywhere(apply_fn, state, compacted)
