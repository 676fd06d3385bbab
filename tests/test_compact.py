"""Tests for the library's compaction, ``flipout.compact(apply_fn, params, *example_args)``:
same outputs on smaller arrays for any pure JAX function of params (Flax NNX and Linen, Equinox, plain
``jnp``), kept units where the analysis cannot see through an op, a compact model that jits,
differentiates, changes batch size, exports, and continues training with its optimizer state.

Models are small (the experiments' families with narrowed widths, tiny inputs) so that each
test traces and compiles in a few seconds; pruning is random masks plus whole units cut off
(each output unit loses all its incoming weights, each input unit all its outgoing ones, with
probability ``dead``), biases and BatchNorm statistics random and non-trivial.

Tolerance. Outputs are compared with ``atol = 1e-5 * max(1, max |dense output|)`` (as in
tests/test_compaction.py): float32 has eps = 1.2e-7; removing units changes only how XLA
groups sums whose dropped terms are exact zeros, and a folded constant is computed once and
added instead of being computed by the network, so both differ by a few eps times the
magnitudes summed. A constant dropped instead of folded moves outputs by about a bias times a
weight, 1e-1 or more here (the bias-only test asserts that margin).
"""

import math

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flipout_jax as flipout
from experiments import models

from tests import family_compaction
from tests.test_compaction import TOLERANCE, images_for, random_model, tiny_densenet


def assert_same_outputs(expected, got):
  expected, got = np.asarray(expected), np.asarray(got)
  assert got.shape == expected.shape
  atol = TOLERANCE * max(1.0, np.abs(expected).max())
  np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def check_outputs(apply_fn, params, compacted, *args):
  """``compacted.apply`` (jitted) gives ``apply_fn``'s outputs on ``args``."""
  assert_same_outputs(
      jax.jit(apply_fn)(params, *args), jax.jit(compacted.apply)(compacted.params, *args)
  )


def size(tree) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def shapes(tree):
  return jax.tree.map(np.shape, tree)


def random_like(shapes, seed=0):
  """Random normal arrays of the shapes and dtypes of ``shapes`` (filled on host: an
  initialiser would compile every layer's init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), shapes)


def prune_tree(params, sparsity, seed=0, dead=0.25, out_axis=-1, in_axis=-2):
  """``params`` with ``sparsity`` of each 2+-dimensional leaf zeroed at random and whole output
  units (``out_axis``) and input units (``in_axis``) zeroed with probability ``dead``."""
  rng = np.random.default_rng(seed)

  def prune_leaf(leaf):
    leaf = np.asarray(leaf)
    if leaf.ndim < 2:
      return leaf
    keep = rng.random(leaf.shape) >= sparsity
    for axis in (out_axis, in_axis):
      units = rng.random(leaf.shape[axis]) >= dead
      keep = keep & np.expand_dims(units, [d for d in range(leaf.ndim) if d != axis % leaf.ndim])
    return (leaf * keep).astype(leaf.dtype)

  return jax.tree.map(prune_leaf, params)


# ---------------------------------------------------------------------------------------------
# The experiments' families, against the per-family compaction (tests/family_compaction.py).
# ---------------------------------------------------------------------------------------------


def narrow(name, input_shape, divisor):
  """Family ``name`` with every width divided by ``divisor`` (at least 2)."""
  widths = models.default_widths(name)
  cut = lambda ws: tuple(max(2, w // divisor) for w in ws)
  if isinstance(widths, models.ResNetWidths):
    widths = models.ResNetWidths(cut(widths.stages), cut(widths.inner))
  else:
    widths = models.PlainWidths(cut(widths.conv), cut(widths.hidden))
  return lambda: models.create_model(
      name, input_shape=input_shape, num_classes=3, rngs=nnx.Rngs(0), widths=widths
  )


FAMILIES = {
    "lenet300": (narrow("lenet300", (8, 8, 1), 2), (8, 8, 1)),
    "lenet5": (narrow("lenet5", (28, 28, 1), 1), (28, 28, 1)),
    "conv6": (narrow("conv6", (8, 8, 3), 8), (8, 8, 3)),
    "vgg11": (narrow("vgg11", (32, 32, 3), 16), (32, 32, 3)),
    "resnet18": (narrow("resnet18", (8, 8, 3), 16), (8, 8, 3)),
    "densenet": (tiny_densenet, (16, 16, 3)),
}
FAMILY_CASES = [
    *(
        (name, sparsity)
        for name in ("lenet300", "lenet5", "conv6")
        for sparsity in (0.9, 0.99, 0.999)
    ),
    ("vgg11", 0.9),
    ("vgg11", 0.99),
    ("resnet18", 0.9),
    ("resnet18", 0.999),
    ("densenet", 0.9),
    ("densenet", 0.99),
]


@pytest.mark.parametrize("name, sparsity", FAMILY_CASES)
def test_family_outputs_match_and_remove_at_least_what_the_per_family_compaction_does(
    name, sparsity
):
  factory, input_shape = FAMILIES[name]
  model = random_model(factory, sparsity, seed=1)
  # The whole state: BatchNorm means and variances are leaves to cut too.
  graphdef, state = nnx.split(model)
  apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)
  images = images_for(input_shape)
  compacted = flipout.compact(apply_fn, state, images)
  assert jax.tree.structure(compacted.params) == jax.tree.structure(state)
  check_outputs(apply_fn, state, compacted, images)
  oracle = family_compaction.compact(model, input_shape)
  # parameter_count counts nnx.Param leaves: count those of the compact state.
  assert size(nnx.filter_state(compacted.params, nnx.Param)) <= family_compaction.parameter_count(
      oracle.model
  )
  assert compacted.report.parameters == (size(state), size(compacted.params))


# ---------------------------------------------------------------------------------------------
# Other libraries and plain jnp.
# ---------------------------------------------------------------------------------------------


class ResidualCNN(linen.Module):
  """conv -> relu -> [conv -> relu -> conv] + skip -> relu -> spatial mean -> dense."""

  @linen.compact
  def __call__(self, x):
    h = linen.relu(linen.Conv(6, (3, 3))(x))
    branch = linen.Conv(6, (3, 3))(linen.relu(linen.Conv(5, (3, 3))(h)))
    return linen.Dense(3)(linen.relu(h + branch).mean(axis=(1, 2)))


def linen_case():
  images = images_for((6, 6, 2), count=2)
  module = ResidualCNN()
  shapes = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
  params = prune_tree(random_like(shapes, seed=3), 0.6, seed=3)
  return (lambda params, x: module.apply({"params": params}, x)), params, images


def test_linen_cnn_with_a_residual_block():
  apply_fn, params, images = linen_case()
  compacted = flipout.compact(apply_fn, params, images)
  assert size(compacted.params) < size(params)
  check_outputs(apply_fn, params, compacted, images)


def test_equinox_mlp_with_out_in_kernels():
  model = eqx.filter_eval_shape(
      eqx.nn.MLP, in_size=8, out_size=3, width_size=10, depth=2, key=jax.random.key(0)
  )
  shapes, static = eqx.partition(model, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct))
  arrays = prune_tree(random_like(shapes, seed=4), 0.5, seed=4, dead=0.3, out_axis=0, in_axis=1)
  apply_fn = lambda arrays, x: jax.vmap(eqx.combine(arrays, static))(x)
  x = jax.random.normal(jax.random.key(1), (4, 8))
  compacted = flipout.compact(apply_fn, arrays, x)
  before, after = model_layers(arrays), model_layers(compacted.params)
  assert any(a.shape[0] < b.shape[0] for a, b in zip(after, before))  # (out, in): rows went
  check_outputs(apply_fn, arrays, compacted, x)


def model_layers(arrays):
  return [layer.weight for layer in arrays.layers]


def mlp(params, x):
  """A plain-jnp MLP: tanh hidden layer, relu hidden layer, linear output."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  h = jax.nn.relu(h @ params["w2"] + params["b2"])
  return h @ params["w3"] + params["b3"]


def mlp_params(seed=0, widths=(6, 7, 5, 3)):
  rng = np.random.default_rng(seed)
  params = {}
  for k, (fan_in, fan_out) in enumerate(zip(widths, widths[1:]), start=1):
    params[f"w{k}"] = rng.normal(0, 1 / math.sqrt(fan_in), (fan_in, fan_out)).astype(np.float32)
    params[f"b{k}"] = rng.normal(0, 0.5, fan_out).astype(np.float32)
  return params


def inputs(count=3, features=6, seed=1):
  return jax.random.normal(jax.random.key(seed), (count, features))


def test_plain_jnp_function():
  params = prune_tree(mlp_params(), 0.4, seed=5, dead=0.3)
  compacted = flipout.compact(mlp, params, inputs())
  assert size(compacted.params) < size(params)
  check_outputs(mlp, params, compacted, inputs())


# ---------------------------------------------------------------------------------------------
# Edge cases: one unit left, none left, a unit live through its bias only, padding.
# ---------------------------------------------------------------------------------------------


def test_concatenated_units_of_different_widths():
  rng = np.random.default_rng(14)
  params = {
      "w1": rng.normal(size=(4, 3)).astype(np.float32),
      "w2": rng.normal(size=(4, 2)).astype(np.float32),
      "w3": rng.normal(size=(5, 2)).astype(np.float32),
  }
  params["w3"][1] = 0.0  # nothing reads unit 1 of the first part

  def apply_fn(params, x):
    both = jnp.concatenate([jnp.tanh(x @ params["w1"]), jnp.tanh(x @ params["w2"])], axis=1)
    return both @ params["w3"]

  x = inputs(features=4)
  compacted = flipout.compact(apply_fn, params, x)
  assert shapes(compacted.params) == {"w1": (4, 2), "w2": (4, 2), "w3": (4, 2)}
  check_outputs(apply_fn, params, compacted, x)


def test_a_layer_left_with_one_unit():
  params = mlp_params(seed=6)
  params["w2"][:, 1:] = 0.0  # hidden 2: only unit 0 has inputs ...
  params["b2"][1:] = -1.0  # ... the others are relu(-1) = 0 ...
  compacted = flipout.compact(mlp, params, inputs())
  assert compacted.params["w2"].shape == (7, 1)  # ... so one unit is left
  assert compacted.params["w3"].shape == (1, 3)
  check_outputs(mlp, params, compacted, inputs())


def test_a_dense_layer_left_with_no_unit():
  params = mlp_params(seed=7)
  params["w2"][:] = 0.0  # hidden 2 is the constant relu(b2): outputs do not depend on x
  compacted = flipout.compact(mlp, params, inputs())
  assert compacted.params["w3"].shape[0] == 0
  check_outputs(mlp, params, compacted, inputs())


def same_conv(x, kernel, **options):
  """A stride-1 NHWC convolution with zero ("SAME") padding."""
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), **options
  )


def conv_net(params, x):
  """conv3x3 (zero padding) -> relu -> conv3x3 (zero padding) -> relu -> flatten -> dense."""
  h = jax.nn.relu(same_conv(x, params["k1"]) + params["c1"])
  h = jax.nn.relu(same_conv(h, params["k2"]) + params["c2"])
  return h.reshape(h.shape[0], -1) @ params["w"] + params["b"]


def conv_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "k1": rng.normal(size=(3, 3, 2, 3)).astype(np.float32),
      "c1": rng.normal(size=3).astype(np.float32),
      "k2": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
      "c2": rng.normal(size=4).astype(np.float32),
      "w": rng.normal(size=(4 * 4 * 4, 3)).astype(np.float32),
      "b": rng.normal(size=3).astype(np.float32),
  }


def images(count=2):
  return jax.random.normal(jax.random.key(2), (count, 4, 4, 2))


def test_a_conv_layer_left_with_no_unit():
  params = conv_params(seed=8)
  params["k1"][:] = 0.0  # conv 1 is the constant relu(c1) at every position
  compacted = flipout.compact(conv_net, params, images())
  assert compacted.params["k2"].shape[2] == 0
  check_outputs(conv_net, params, compacted, images())


def test_a_unit_live_only_through_its_bias_is_folded():
  params = mlp_params(seed=9)
  params["w1"][:, 2] = 0.0  # hidden 1, unit 2: the constant tanh(b1[2]) ...
  params["b1"][2] = 0.9
  compacted = flipout.compact(mlp, params, inputs())
  assert compacted.params["w1"].shape == (6, 6)  # ... removed ...
  # ... and folded: dropping it would move the outputs far beyond the tolerance.
  assert np.abs(np.tanh(0.9) * params["w2"][2]).max() > 0.1
  check_outputs(mlp, params, compacted, inputs())


def test_padded_conv_whose_removed_channel_is_a_nonzero_constant():
  params = conv_params(seed=10)
  params["k1"][..., 0] = 0.0
  params["c1"][0] = 0.8  # channel 0 is relu(0.8) = 0.8 inside the image, 0 in the padding
  params["k2"][:, :, 0] = 0.0
  params["k2"][0, 0, 0] = 1.5  # a corner tap: sees the padding at the border only
  compacted = flipout.compact(conv_net, params, images())
  assert compacted.params["k1"].shape == (3, 3, 2, 2)  # its position-dependent constant folded
  check_outputs(conv_net, params, compacted, images())


@pytest.mark.parametrize(
    "move, primitive",
    [
        (lambda h: h[1:], "slice"),
        (lambda h: jnp.pad(h, ((1, 0), (0, 0))), "pad"),
        (lambda h: jnp.squeeze(jnp.expand_dims(h, 1), 1), "squeeze"),
    ],
)
def test_units_pass_through_ops_that_move_only_the_batch_axis(move, primitive):
  rng = np.random.default_rng(18)
  params = {
      "w1": rng.normal(size=(4, 6)).astype(np.float32),
      "w2": rng.normal(size=(6, 3)).astype(np.float32),
  }
  params["w2"][2] = 0.0  # nothing reads hidden unit 2
  apply_fn = lambda p, x: move(jnp.tanh(x @ p["w1"])) @ p["w2"]
  x = inputs(features=4)
  assert primitive in str(jax.make_jaxpr(apply_fn)(params, x))
  compacted = flipout.compact(apply_fn, params, x)
  assert shapes(compacted.params) == {"w1": (4, 5), "w2": (5, 3)}
  check_outputs(apply_fn, params, compacted, x)


def test_a_flattened_copy_of_kept_channels_that_nothing_reads_goes():
  # The channels are read by the mean; their flattened copy only by zero weights.
  rng = np.random.default_rng(23)
  params = {
      "k": rng.normal(size=(3, 3, 2, 5)).astype(np.float32),
      "w": rng.normal(size=(5, 3)).astype(np.float32),
      "v": np.zeros((4 * 4 * 5, 3), np.float32),
  }

  def apply_fn(p, x):
    h = jnp.tanh(same_conv(x, p["k"]))
    return h.mean(axis=(1, 2)) @ p["w"] + h.reshape(h.shape[0], -1) @ p["v"]

  compacted = flipout.compact(apply_fn, params, images())
  assert shapes(compacted.params) == {"k": (3, 3, 2, 5), "w": (5, 3), "v": (0, 3)}
  check_outputs(apply_fn, params, compacted, images())


@pytest.mark.parametrize(
    "image, layout, centre",
    [
        ((1, 1, 2), ("NHWC", "HWIO", "NHWC"), (1, 1)),  # the centre tap only
        ((3, 3, 1, 2), ("NDHWC", "DHWIO", "NDHWC"), (slice(None), slice(None), 1)),  # 3-D
    ],
    ids=["2d", "3d"],
)
def test_a_channel_whose_only_live_taps_read_padding_goes(image, layout, centre):
  # A size-1 spatial axis: a 3-tap "SAME" conv reads the image through its middle tap only.
  rng = np.random.default_rng(25)
  kernel = rng.normal(size=(3,) * (len(image) - 1) + (2, 3)).astype(np.float32)
  kernel[(*centre, Ellipsis, 0)] = 0.0  # channel 0 is tanh(0) everywhere: it sees zeros only
  positions = math.prod(image[:-1])
  params = {"k": kernel, "w": rng.normal(size=(positions * 3, 2)).astype(np.float32)}

  def apply_fn(p, x):
    strides = (1,) * (x.ndim - 2)
    h = jax.lax.conv_general_dilated(x, p["k"], strides, "SAME", dimension_numbers=layout)
    return jnp.tanh(h).reshape(h.shape[0], -1) @ p["w"]

  x = jax.random.normal(jax.random.key(5), (2, *image))
  compacted = flipout.compact(apply_fn, params, x)
  assert shapes(compacted.params) == {"k": kernel.shape[:-1] + (2,), "w": (positions * 2, 2)}
  check_outputs(apply_fn, params, compacted, x)


def test_channels_pass_through_a_reshape_merging_the_spatial_axes():
  # (batch, height, width, channels) -> (batch, positions, channels), as for tokens.
  rng = np.random.default_rng(26)
  params = {
      "k": rng.normal(size=(3, 3, 2, 5)).astype(np.float32),
      "w": rng.normal(size=(5, 3)).astype(np.float32),
  }
  params["w"][1] = 0.0  # nothing reads channel 1

  def apply_fn(p, x):
    h = same_conv(x, p["k"])
    return (jnp.tanh(h).reshape(h.shape[0], -1, h.shape[-1]) @ p["w"]).sum(axis=1)

  compacted = flipout.compact(apply_fn, params, images())
  assert shapes(compacted.params) == {"k": (3, 3, 2, 4), "w": (4, 3)}
  check_outputs(apply_fn, params, compacted, images())


# ---------------------------------------------------------------------------------------------
# What the analysis cannot see through is kept.
# ---------------------------------------------------------------------------------------------


def mixing_mlp(mix):
  def apply_fn(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return mix(h) @ params["w2"] + params["b2"]

  return apply_fn


def layer_norm(h):
  mean = h.mean(axis=-1, keepdims=True)
  return (h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-5)


@pytest.mark.parametrize(
    "mix, reason",
    [
        (layer_norm, "reduce_sum"),
        (lambda h: jax.lax.sort(h, dimension=1), "sort"),
        (lambda h: jax.lax.cummax(h, axis=1), "cummax"),
    ],
)
def test_units_of_an_axis_an_op_mixes_are_kept(mix, reason):
  rng = np.random.default_rng(11)
  params = {
      "w1": rng.normal(size=(4, 5)).astype(np.float32),
      "b1": rng.normal(size=5).astype(np.float32),
      "w2": rng.normal(size=(5, 3)).astype(np.float32),
      "b2": rng.normal(size=3).astype(np.float32),
  }
  params["w1"][:, 1] = 0.0  # hidden unit 1 is a constant, but the op mixes it with the others
  apply_fn = mixing_mlp(mix)
  x = inputs(features=4)
  compacted = flipout.compact(apply_fn, params, x)
  assert shapes(compacted.params) == shapes(params)
  assert any(reason in kept for kept in compacted.report.kept_by), compacted.report.kept_by
  check_outputs(apply_fn, params, compacted, x)


def test_output_rows_that_do_not_depend_on_the_input_are_reported_as_kept():
  # The batch is padded with as many zero images before the conv: the 2 output rows they
  # give are constants, kept because they are outputs.
  rng = np.random.default_rng(16)
  params = {"k": rng.normal(size=(3, 3, 2, 3)).astype(np.float32)}
  apply_fn = lambda p, x: same_conv(jnp.concatenate([x, jnp.zeros_like(x)]), p["k"])
  compacted = flipout.compact(apply_fn, params, images())
  assert compacted.report.kept_by["an argument or output of the function"] == 2


def test_constants_params_puts_every_folded_constant_into_the_params():
  params = mlp_params(seed=17)
  params["w1"][:, 2] = 0.0  # hidden 1, unit 2: the constant tanh(b1[2]), taken by b2
  params["b1"][2] = 0.9
  compacted = flipout.compact(mlp, params, inputs(), constants="params")
  assert compacted.params["w1"].shape == (6, 6)
  # The compact params alone, in the model's own code, give the outputs.
  assert_same_outputs(mlp(params, inputs()), mlp(compacted.params, inputs()))
  check_outputs(mlp, params, compacted, inputs())


def test_a_unit_a_reshape_splits_goes_only_with_the_rest_of_its_row_or_column():
  rng = np.random.default_rng(19)
  params = {
      "w1": rng.normal(size=(4, 6)).astype(np.float32),
      "w2": rng.normal(size=(3, 2)).astype(np.float32),
  }
  params["w1"][:, 1] = 0.0  # hidden unit 1 is the constant tanh(0), at (0, 1) of the split
  apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]).reshape(-1, 2, 3) @ p["w2"]
  x = inputs(features=4)
  compacted = flipout.compact(apply_fn, params, x)
  assert shapes(compacted.params) == shapes(params)
  check_outputs(apply_fn, params, compacted, x)
  params["w1"][:, 4] = 0.0  # and (1, 1): the whole column 1 of the split
  compacted = flipout.compact(apply_fn, params, x)
  np.testing.assert_array_equal(compacted.kept["w1"][1], [0, 2, 3, 5])
  assert compacted.params["w2"].shape == (2, 2)
  check_outputs(apply_fn, params, compacted, x)


def test_units_feeding_a_grouped_convolution_are_kept():
  rng = np.random.default_rng(20)
  params = {
      "k1": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
      "k2": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),  # 2 groups of 2 channels
      "w": rng.normal(size=(4, 3)).astype(np.float32),
  }
  params["k1"][..., 1] = 0.0  # channel 1 is the constant tanh(0), but the groups mix it

  def apply_fn(p, x):
    h = jnp.tanh(same_conv(jnp.tanh(same_conv(x, p["k1"])), p["k2"], feature_group_count=2))
    return h.mean(axis=(1, 2)) @ p["w"]

  compacted = flipout.compact(apply_fn, params, images())
  assert shapes(compacted.params) == shapes(params)
  assert "grouped convolution" in compacted.report.kept_by
  check_outputs(apply_fn, params, compacted, images())


# ---------------------------------------------------------------------------------------------
# The compact model as a JAX function: jit, grad, batch sizes, export.
# ---------------------------------------------------------------------------------------------


def pruned_mlp():
  params = prune_tree(mlp_params(seed=12), 0.4, seed=12, dead=0.3)
  params["w1"][:, 0] = 0.0
  params["b1"][0] = 0.7  # a folded constant, so that the compact program adds one
  return params


def test_sgd_on_the_compact_params_lowers_the_loss():
  params = pruned_mlp()
  x = inputs(count=8)
  targets = jax.random.normal(jax.random.key(3), (8, 3))
  compacted = flipout.compact(mlp, params, x)
  loss = lambda p: jnp.mean((compacted.apply(p, x) - targets) ** 2)
  step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p)))
  losses, current = [float(loss(compacted.params))], compacted.params
  for _ in range(5):
    current = step(current)
    losses.append(float(loss(current)))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_compact_apply_exports_and_runs_after_deserialization():
  params = pruned_mlp()
  compacted = flipout.compact(mlp, params, inputs())
  exported = jax.export.export(jax.jit(compacted.apply))(compacted.params, inputs())
  restored = jax.export.deserialize(exported.serialize())
  assert_same_outputs(mlp(params, inputs()), restored.call(compacted.params, inputs()))


# ---------------------------------------------------------------------------------------------
# shrink: training continues on the compact model with its optimizer state.
# ---------------------------------------------------------------------------------------------


def step_fn(apply_fn, tx, x, targets):
  def step(params, state):
    grads = jax.grad(lambda p: jnp.mean((apply_fn(p, x) - targets) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step)


def pruned_masks(state, params):
  """The PruneState of ``state`` with masks marking the zero weights of ``params`` pruned."""
  sgd_state, prune_state = state
  masks = jax.tree.map(
      lambda m, w: None if m is None else jnp.asarray(w) != 0,
      prune_state.masks,
      params,
      is_leaf=lambda m: m is None,
  )
  return sgd_state, prune_state._replace(masks=masks)


@pytest.mark.parametrize("with_prune", [False, True], ids=["sgd", "sgd+prune"])
def test_shrunk_optimizer_state_continues_training_like_the_full_model(with_prune):
  params = pruned_mlp()
  x = inputs(count=8)
  targets = jax.random.normal(jax.random.key(4), (8, 3))
  sgd = optax.sgd(0.1, momentum=0.9)
  if with_prune:  # no pruning event in these steps (the only one is at step 50)
    tx = optax.chain(sgd, flipout.prune(target_sparsity=0.5, total_steps=100))
    state = pruned_masks(tx.init(params), params)
  else:
    tx = sgd
    state = tx.init(params)
  full_step = step_fn(mlp, tx, x, targets)
  # One full step first: momentum (and flip counts) are non-trivial when compacting.
  params, state = full_step(params, state)
  if not with_prune:  # plain SGD revives pruned weights: prune them again for the compaction
    params = jax.tree.map(lambda w, w0: jnp.where(w0 == 0, 0.0, w), params, pruned_mlp())
  compacted = flipout.compact(mlp, params, x)
  assert size(compacted.params) < size(params)
  compact_state = compacted.shrink(state)
  new_full, new_full_state = full_step(params, state)
  new_compact, new_compact_state = step_fn(compacted.apply, tx, x, targets)(
      compacted.params, compact_state
  )
  # The step moves the kept weights as it moves them in the full model (the compact params
  # hold folded constants in their biases, so compare them moved by the full model's step).
  moved = jax.tree.map(lambda a, b: a - b, new_full, params)
  expected = jax.tree.map(lambda p, d: p + d, compacted.params, compacted.shrink(moved))
  for got, want in zip(jax.tree.leaves(new_compact), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # The prune state's sample of the last update is taken at the sizes of the model it ran on;
  # shrink replaces a dense one by one that checks nothing: compare everything else.
  without_sample = lambda state: jax.tree.leaves(
      jax.tree.map(
          lambda n: n._replace(last_update=None) if isinstance(n, flipout.PruneState) else n,
          state,
          is_leaf=lambda n: isinstance(n, flipout.PruneState),
      )
  )
  want_state = without_sample(compacted.shrink(new_full_state))
  got_state = without_sample(new_compact_state)
  assert len(got_state) == len(want_state)
  for got, want in zip(got_state, want_state):
    assert np.shape(got) == np.shape(want)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=1e-5
    )
  if with_prune:  # masks and flip counts were cut like the kernels
    for name in ("w1", "w2", "w3"):
      assert flipout.masks(compact_state)[name].shape == compacted.params[name].shape
      assert flipout.flip_counts(compact_state)[name].shape == compacted.params[name].shape


# ---------------------------------------------------------------------------------------------
# Fixed point and argument checks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["linen", "lenet5"])
def test_compacting_the_compact_model_removes_nothing_more(case):
  if case == "linen":
    apply_fn, params, args = linen_case()
  else:
    factory, input_shape = FAMILIES["lenet5"]
    graphdef, params = nnx.split(random_model(factory, 0.9, seed=13))
    apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)
    args = images_for(input_shape)
  once = flipout.compact(apply_fn, params, args)
  assert once.report.rounds >= 1
  twice = flipout.compact(once.apply, once.params, args)
  assert shapes(twice.params) == shapes(once.params)
  assert twice.report.rounds == 0


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        (dict(apply_fn="not a function"), TypeError, "apply_fn"),
        (dict(batch_axis=-1), ValueError, "batch_axis"),
        (dict(batch_axis=1.5), ValueError, "batch_axis"),
        (dict(max_rounds=0), ValueError, "max_rounds"),
        (dict(constants="bias"), ValueError, "constants"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_argument(kwargs, error, argument):
  kwargs = dict(dict(apply_fn=mlp), **kwargs)
  apply_fn = kwargs.pop("apply_fn")
  with pytest.raises(error, match=argument):
    flipout.compact(apply_fn, mlp_params(), inputs(), **kwargs)


def test_params_that_are_a_module_or_hold_non_arrays_are_refused_saying_what_to_pass():
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
  with pytest.raises(TypeError, match=r"nnx module \(Linear\).*nnx.split"):
    flipout.compact(apply_fn, model, jnp.ones((2, 3)))
  with pytest.raises(TypeError, match=r"leaf \['kernel'\] is a str"):
    flipout.compact(apply_fn, {"kernel": "w"}, jnp.ones((2, 3)))
  assert flipout.compact(apply_fn, state, jnp.ones((2, 3))).report.parameters == (16, 16)


def test_report_names_a_linear_op_without_a_param_operand_by_its_position():
  # The second product multiplies by 2 * w2, computed in the model: no param is its operand.
  params = mlp_params(seed=24, widths=(4, 5, 3))
  params["w1"][:, 1] = 0.0
  params["b1"][1] = 0.0
  apply_fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ (2.0 * p["w2"])
  compacted = flipout.compact(apply_fn, params, inputs(count=2, features=4))
  first, second = compacted.report.layers
  assert first.name == "['w1']" and first.parameters == (20, 16)
  assert second.name.startswith("dot_general@") and second.parameters == (0, 0)
  # Widths are those of the computed operand, the weights (5 -> 4 inputs, 3 outputs).
  assert second.in_features == (5, 4) and second.out_features == (3, 3)


def test_report_counts_a_conv_nets_widths_parameters_and_flops():
  params = conv_params(seed=27)
  params["k1"][..., 0] = 0.0
  params["c1"][0] = -1.0  # channel 0 of conv 1 is relu(-1) = 0: removed
  compacted = flipout.compact(conv_net, params, images(count=2))
  k1, k2, dense = compacted.report.layers
  # A 3x3 conv on a 4x4 image: 2 FLOPs per input channel, tap, output position and channel.
  conv_flops = lambda channels_in, channels_out: 2 * channels_in * 9 * 16 * channels_out
  assert k1 == ("['k1']", "conv", (2, 2), (3, 2), (54, 36), (conv_flops(2, 3), conv_flops(2, 2)))
  assert k2 == ("['k2']", "conv", (3, 2), (4, 4), (108, 72), (conv_flops(3, 4), conv_flops(2, 4)))
  assert dense == ("['w']", "dense", (64, 64), (3, 3), (192, 192), (2 * 64 * 3, 2 * 64 * 3))


def test_a_reshaped_literal_in_the_model_is_compacted():
  # jnp.reshape(2.0, (1, 1)) traces to a reshape of a literal: it once crashed the analysis.
  weights = {"w1": jnp.array([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0]]), "w2": jnp.ones((3, 2))}
  apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"] * jnp.reshape(2.0, (1, 1))
  x = jnp.array([[0.5, -1.0], [2.0, 1.0]])
  compacted = flipout.compact(apply_fn, weights, x)
  assert compacted.params["w1"].shape == (2, 2)
  np.testing.assert_allclose(compacted.apply(compacted.params, x), apply_fn(weights, x), atol=1e-6)
  assert [layer.out_features for layer in compacted.report.layers][0] == (3, 2)


def test_a_constant_channel_whose_flattened_features_are_outputs_is_kept():
  # Channel 1 is the constant tanh(c[1]), so on its own it could go; but its flattened
  # features are the function's outputs (pinned), and a channel goes whole or not at all.
  rng = np.random.default_rng(27)
  params = {
      "k": rng.normal(size=(3, 3, 2, 3)).astype(np.float32),
      "c": rng.normal(size=3).astype(np.float32),
  }
  params["k"][..., 1] = 0.0

  def apply_fn(p, x):
    h = same_conv(x, p["k"])
    return jnp.tanh(h + p["c"]).reshape(h.shape[0], -1)

  compacted = flipout.compact(apply_fn, params, images())
  assert shapes(compacted.params) == {"k": (3, 3, 2, 3), "c": (3,)}
  check_outputs(apply_fn, params, compacted, images())


def test_the_report_of_a_program_without_linear_ops_prints():
  # No dot_general or convolution: the report has no layer rows, and one parameter, kept.
  compacted = flipout.compact(lambda p, x: x * p["scale"], {"scale": jnp.ones(1)}, jnp.ones((2, 1)))
  assert compacted.report.layers == ()
  assert str(compacted.report).splitlines()[1] == "parameters: 1 -> 1 (100.00%)"
