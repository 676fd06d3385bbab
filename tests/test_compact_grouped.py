"""Tests for the compaction of grouped and depthwise convolutions (``feature_group_count``).

A feature group (its input channels, the kernel's output features of the group and the
output channels they make; for a depthwise convolution one input channel and its multiplier's
outputs) is one unit: it goes whole, and the compact convolution has fewer groups. An input
channel whose group keeps other channels stays. Outputs are compared as in
tests/test_compact.py (``atol = 1e-5 * max(1, max |dense output|)``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flipout_jax as flipout

from tests.test_compact import assert_same_outputs, shapes, size


def conv(x, kernel, groups=1, padding="SAME"):
  """A stride-1 NHWC convolution in ``groups`` feature groups."""
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      (1, 1),
      padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
  )


def inverted_residual(p, x):
  """MobileNetV2's block: expand 1x1 -> relu6 -> depthwise 3x3 (zero padding) -> relu6 ->
  project 1x1, added to its input."""
  h = jax.nn.relu6(conv(x, p["expand"]) + p.get("b1", 0.0))
  h = jax.nn.relu6(conv(h, p["dw"], groups=p["expand"].shape[-1]) + p["b2"])
  return x + (conv(h, p["project"]) + p["b3"])


CHANNELS, EXPANDED, MULTIPLIER = 4, 8, 2
UNREAD = (1, 5)  # zero outgoing weights in project
# Zero incoming weights in expand: relu6(b1) is 0.7 for channel 2, which the depthwise conv's
# zero padding makes position dependent; 0 for channel 6, relu6(b2) everywhere after it.
CONSTANT = (2, 6)


def block_params(seed=0, expand_bias=True, multiplier=1):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  depthwise = EXPANDED * multiplier
  p = {
      "expand": normal(1, 1, CHANNELS, EXPANDED),
      "dw": normal(3, 3, 1, depthwise),
      "b2": np.abs(normal(depthwise)) + 0.5,  # relu6 passes the constant channels' biases
      "project": normal(1, 1, depthwise, CHANNELS),
      "b3": normal(CHANNELS),
  }
  if expand_bias:
    p["b1"] = normal(EXPANDED)
    p["b1"][list(CONSTANT)] = (0.7, -0.5)
  p["expand"][..., list(CONSTANT)] = 0.0
  for channel in UNREAD:
    p["project"][:, :, channel * multiplier : (channel + 1) * multiplier] = 0.0
  return p


def per_channel(p, multiplier=1):
  """Parameters one expanded channel owns (expand column, biases, depthwise taps, project)."""
  return CHANNELS + ("b1" in p) + multiplier * (9 + 1 + CHANNELS)


def images(count=2):
  return jax.random.normal(jax.random.key(3), (count, 5, 5, CHANNELS))


def check_everywhere(apply_fn, params, compacted):
  """Same outputs at the example batch and two others, jitted, and same input gradients."""
  for count in (2, 1, 5):
    x = images(count)
    assert_same_outputs(jax.jit(apply_fn)(params, x), jax.jit(compacted.apply)(compacted.params, x))
    loss = lambda f, p: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(f(p, x)))))
    assert_same_outputs(loss(apply_fn, params)(x), loss(compacted.apply, compacted.params)(x))


@pytest.mark.parametrize(
    "constants, expand_bias, removed",
    [
        ("program", True, UNREAD + CONSTANT),
        # Channel 2's position-dependent constant goes into no bias: the fold it shares
        # with channel 6 is refused, and both stay.
        ("params", True, UNREAD),
        ("params", False, UNREAD + CONSTANT),  # relu6(b2): absorbed into b3
    ],
)
def test_inverted_residual_loses_its_dead_expanded_channels(constants, expand_bias, removed):
  params = block_params(expand_bias=expand_bias)
  compacted = flipout.compact(inverted_residual, params, images(), constants=constants)
  expected = size(params) - len(removed) * per_channel(params)
  assert size(compacted.params) == expected
  np.testing.assert_array_equal(compacted.kept["dw"][3], np.setdiff1d(np.arange(EXPANDED), removed))
  check_everywhere(inverted_residual, params, compacted)


def test_the_folded_depthwise_constant_depends_on_the_position():
  params = block_params()
  h = jax.nn.relu6(conv(jnp.full((1, 5, 5, 1), 0.7), params["dw"][..., 2:3]) + params["b2"][2])
  contribution = np.asarray(h) * params["project"][0, 0, 2]
  assert np.ptp(contribution, axis=(1, 2)).max() > 0.1  # corners differ from the centre
  compacted = flipout.compact(inverted_residual, params, images())
  assert 2 not in compacted.kept["dw"][3]
  check_everywhere(inverted_residual, params, compacted)


def test_a_depthwise_channel_goes_with_all_of_its_multiplier_outputs():
  params = block_params(multiplier=MULTIPLIER)
  # Channel 3 loses one of its two outputs' readers only: it stays whole.
  params["project"][:, :, 3 * MULTIPLIER] = 0.0
  compacted = flipout.compact(inverted_residual, params, images())
  removed = UNREAD + CONSTANT
  assert size(compacted.params) == size(params) - len(removed) * per_channel(params, MULTIPLIER)
  kept = np.setdiff1d(np.arange(EXPANDED), removed)
  outputs = (kept[:, None] * MULTIPLIER + np.arange(MULTIPLIER)).reshape(-1)
  np.testing.assert_array_equal(compacted.kept["dw"][3], outputs)
  check_everywhere(inverted_residual, params, compacted)


class InvertedResidual(nnx.Module):

  def __init__(self, rngs):
    self.expand = nnx.Conv(CHANNELS, EXPANDED, (1, 1), rngs=rngs)
    self.dw = nnx.Conv(EXPANDED, EXPANDED, (3, 3), feature_group_count=EXPANDED, rngs=rngs)
    self.project = nnx.Conv(EXPANDED, CHANNELS, (1, 1), rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu6(self.dw(jax.nn.relu6(self.expand(x))))
    return x + self.project(h)


def test_an_nnx_inverted_residual_loses_its_dead_expanded_channels():
  model = InvertedResidual(nnx.Rngs(0))
  p = block_params(seed=1)
  for layer, kernel, bias in (
      (model.expand, p["expand"], p["b1"]),
      (model.dw, p["dw"], p["b2"]),
      (model.project, p["project"], p["b3"]),
  ):
    layer.kernel[...], layer.bias[...] = jnp.asarray(kernel), jnp.asarray(bias)
  graphdef, state = nnx.split(model)
  apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)
  compacted = flipout.compact(apply_fn, state, images())
  assert jax.tree.leaves(compacted.params["dw"]["kernel"])[0].shape == (3, 3, 1, EXPANDED - 4)
  assert size(compacted.params) == size(state) - 4 * per_channel(p)
  check_everywhere(apply_fn, state, compacted)


# ---------------------------------------------------------------------------------------------
# General groups: whole groups go, a group with one live channel stays.
# ---------------------------------------------------------------------------------------------

GROUPS, PER_GROUP_IN, PER_GROUP_OUT = 4, 2, 3


def grouped_net(p, x):
  """conv 1x1 -> tanh -> grouped 3x3 conv (zero padding) + bias -> tanh -> mean -> dense (a
  bias where ``p`` has one)."""
  h = jnp.tanh(conv(x, p["k1"]) + p["c1"])
  h = jnp.tanh(conv(h, p["k2"], groups=p["k1"].shape[-1] // PER_GROUP_IN) + p.get("c2", 0.0))
  return h.mean(axis=(1, 2)) @ p["w"] + p.get("b", 0.0)


def grouped_params(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  hidden, out = GROUPS * PER_GROUP_IN, GROUPS * PER_GROUP_OUT
  return {
      "k1": normal(1, 1, CHANNELS, hidden),
      "c1": normal(hidden),
      "k2": normal(3, 3, PER_GROUP_IN, out),
      "c2": normal(out),
      "w": normal(out, 3),
  }


def group_size(p):
  """Parameters one group owns: its input channels' conv 1x1 columns and biases, its kernel
  outputs and biases, and its outputs' dense rows."""
  inputs = PER_GROUP_IN * (CHANNELS + 1)
  return inputs + PER_GROUP_OUT * (9 * PER_GROUP_IN + ("c2" in p) + p["w"].shape[1])


def grouped_images(count=2):
  return jax.random.normal(jax.random.key(4), (count, 4, 4, CHANNELS))


def check_grouped(params, compacted):
  for count in (2, 3):
    x = grouped_images(count)
    assert_same_outputs(grouped_net(params, x), jax.jit(compacted.apply)(compacted.params, x))


def group_rows(group, per_group):
  return slice(group * per_group, (group + 1) * per_group)


@pytest.mark.parametrize("dead", ["outputs unread", "kernel zero"])
def test_a_dead_group_goes_whole(dead):
  params = grouped_params(seed=1)
  if dead == "outputs unread":
    params["w"][group_rows(2, PER_GROUP_OUT)] = 0.0
  else:  # the group's outputs are the constants tanh(c2): folded into the dense layer
    params["k2"][..., group_rows(2, PER_GROUP_OUT)] = 0.0
  compacted = flipout.compact(grouped_net, params, grouped_images())
  assert compacted.params["k2"].shape == (3, 3, PER_GROUP_IN, (GROUPS - 1) * PER_GROUP_OUT)
  assert compacted.params["k1"].shape[-1] == (GROUPS - 1) * PER_GROUP_IN
  assert size(compacted.params) == size(params) - group_size(params)
  check_grouped(params, compacted)
  program = jax.make_jaxpr(compacted.apply)(compacted.params, grouped_images())
  counts = [
      e.params["feature_group_count"] for e in program.eqns if "feature_group_count" in e.params
  ]
  assert GROUPS - 1 in counts


@pytest.mark.parametrize("constants", ["program", "params"])
def test_a_group_whose_inputs_are_all_constant_goes(constants):
  params = grouped_params(seed=2)
  # No bias after the grouped conv, one after the dense layer: "params" finds a param for
  # the dense layer's fold only.
  del params["c2"]
  params["b"] = np.zeros(3, np.float32)
  params["k1"][..., group_rows(1, PER_GROUP_IN)] = 0.0  # its inputs are tanh(c1): constants
  # summed only into the group's own outputs, which go: nothing to fold there.
  compacted = flipout.compact(grouped_net, params, grouped_images(), constants=constants)
  assert size(compacted.params) == size(params) - group_size(params)
  check_grouped(params, compacted)


def test_a_dead_input_channel_of_a_group_with_live_channels_stays():
  params = grouped_params(seed=3)
  params["k1"][..., 2] = 0.0  # group 1's first input is the constant tanh(c1[2]) ...
  params["c1"][2] = 1.5  # ... far from 0: dropping it unfolded would show
  # and group 3's second input is read by nothing.
  params["k2"][:, :, 1, group_rows(3, PER_GROUP_OUT)] = 0.0
  compacted = flipout.compact(grouped_net, params, grouped_images())
  assert shapes(compacted.params) == shapes(params)
  check_grouped(params, compacted)


def test_a_grouped_conv_whose_groups_are_all_dead_keeps_one_then_goes_ungrouped():
  params = grouped_params(seed=4)
  params["w"][:] = 0.0
  # XLA takes no convolution of zero groups: a round keeps one ...
  compacted = flipout.compact(grouped_net, params, grouped_images(), max_rounds=1)
  assert compacted.params["k2"].shape == (3, 3, PER_GROUP_IN, PER_GROUP_OUT)
  check_grouped(params, compacted)
  # ... and the next sees an ungrouped convolution, which may lose every channel.
  compacted = flipout.compact(grouped_net, params, grouped_images())
  assert compacted.params["k2"].shape == (3, 3, 0, 0)
  check_grouped(params, compacted)


def test_a_batch_grouped_conv_keeps_every_feature():
  rng = np.random.default_rng(5)
  params = {"k1": rng.normal(size=(1, 1, CHANNELS, 4)).astype(np.float32)}
  params["k2"] = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
  params["k1"][..., 1] = 0.0

  def apply_fn(p, x):
    h = jnp.tanh(conv(x, p["k1"]))
    return jax.lax.conv_general_dilated(
        h,
        p["k2"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        batch_group_count=2,
    )

  x = grouped_images(4)
  compacted = flipout.compact(apply_fn, params, x, batch_axis=None)
  assert shapes(compacted.params) == shapes(params)
  assert "grouped convolution" in compacted.report.kept_by
  assert_same_outputs(apply_fn(params, x), compacted.apply(compacted.params, x))
