"""Tests for the per-family compaction (tests/family_compaction.py, what experiments.compaction
was before it ran on flipout.compact): the oracle that tests/test_compact.py holds the library
to. The compact network gives the same logits, is smaller, is a fixed point, and exports like
any params tree.

Models are built abstractly and filled with NumPy random weights (see tests/test_models.py:
every initialiser would be an XLA compile on CPU); inputs are small so that the forward passes
compile quickly.

Tolerance. Logits are compared with ``atol = 1e-5 * max(1, max |dense logit|)``: float32 has
eps = 1.2e-7; removing units changes only how XLA groups sums whose dropped terms were exact
zeros, and a folded constant is computed in float64 and rounded once instead of being computed
in float32 by the network, so both differ by a few eps times the magnitudes summed (measured:
below 1e-7 here). A constant dropped instead of folded changes logits by about a bias times
a weight, 1e-2 or more with these weights.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

import flipout_jax as flipout
from tests import family_compaction as compaction
from experiments import models

TOLERANCE = 1e-5
CIFAR = (32, 32, 3)
TINY_DENSENET = dict(growth_rate=4, block_config=(2, 3), bn_size=2)


def _flat_state(model) -> dict:
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


def _with_state(factory, fill) -> nnx.Module:
  """The model ``factory`` builds (shapes only), its leaves set by ``fill(path, shape)``."""
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  values = {path: jnp.asarray(fill(path, leaf.shape), leaf.dtype) for path, leaf in flat.items()}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def random_model(factory, sparsity: float, seed: int = 0, dead: float = 0.2) -> nnx.Module:
  """Random weights with ``sparsity`` of each kernel pruned at random, plus whole units cut off:
  each output unit loses all its incoming weights, and each input unit all its outgoing ones,
  with probability ``dead``. Biases and BatchNorm statistics are random and non-trivial."""
  rng = np.random.default_rng(seed)

  def fill(path, shape):
    name = path[-1]
    if name == "kernel":
      kernel = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[:-1])), shape)
      kernel *= rng.random(shape) >= sparsity
      kernel *= rng.random(shape[-1]) >= dead
      return kernel * (rng.random(shape[-2]) >= dead)[:, None]
    if name == "var":
      return rng.uniform(0.5, 2.0, shape)
    if name == "scale":
      return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0.0, 0.5, shape)  # biases, BatchNorm offsets and running means

  return _with_state(factory, fill)


def named(name, input_shape, num_classes=3):
  return lambda: models.create_model(
      name, input_shape=input_shape, num_classes=num_classes, rngs=nnx.Rngs(0)
  )


def tiny_densenet():
  return models.DenseNet(input_shape=(16, 16, 3), num_classes=3, rngs=nnx.Rngs(0), **TINY_DENSENET)


def logits(model, images) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, images))


def images_for(input_shape, count=3, seed=1):
  return jax.random.normal(jax.random.key(seed), (count, *input_shape))


def assert_same_logits(dense, compact, input_shape):
  images = images_for(input_shape)
  expected = logits(dense, images)
  np.testing.assert_allclose(
      logits(compact, images), expected, rtol=0, atol=TOLERANCE * max(1.0, np.abs(expected).max())
  )


CASES = [
    *(("lenet300", (8, 8, 1), sparsity) for sparsity in (0.0, 0.5, 0.9, 0.99, 0.999)),
    *(("lenet5", (28, 28, 1), sparsity) for sparsity in (0.5, 0.9, 0.99)),
    *(("conv6", (8, 8, 3), sparsity) for sparsity in (0.5, 0.9, 0.99)),
    ("vgg11", CIFAR, 0.9),
    ("vgg11", CIFAR, 0.99),
    *(("resnet18", (8, 8, 3), sparsity) for sparsity in (0.5, 0.95)),
]


@pytest.mark.parametrize("name, input_shape, sparsity", CASES)
def test_compact_model_gives_the_same_logits(name, input_shape, sparsity):
  dense = random_model(named(name, input_shape), sparsity)
  result = compaction.compact(dense, input_shape)
  assert compaction.parameter_count(result.model) < compaction.parameter_count(dense)
  assert_same_logits(dense, result.model, input_shape)


@pytest.mark.parametrize("sparsity, seed", [(0.3, 0), (0.8, 1), (0.95, 2)])
def test_densenet_concatenations_keep_logits_at_several_sparsities(sparsity, seed):
  # A small DenseNet (same classes, fewer and narrower layers) compiles in a second; every
  # channel still goes through concatenations, transitions and several reading BatchNorms.
  dense = random_model(tiny_densenet, sparsity, seed)
  result = compaction.compact(dense, (16, 16, 3))
  assert compaction.parameter_count(result.model) < compaction.parameter_count(dense)
  assert_same_logits(dense, result.model, (16, 16, 3))


def hand_built_lenet() -> nnx.Module:
  """LeNet-300-100 shrunk to 4 inputs -> 4 -> 3 -> 3 classes, with dead units by hand.

  hidden 1: unit 0 reads inputs 0, 1; unit 1 reads input 2; unit 2 reads nothing but has
  bias 0.7 (a constant 0.7 after ReLU); unit 3 reads input 0 but nothing reads it.
  hidden 2: unit 0 reads units 0, 2; unit 1 reads units 1, 2; unit 2 reads nothing and has
  bias -0.5 (a constant 0 after ReLU). Input 3 is read by nobody.
  """
  rng = np.random.default_rng(0)
  kernels = {
      0: np.array([[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]),
      1: np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]]),
      2: np.ones((3, 3)),
  }
  biases = {0: [0.1, -0.2, 0.7, 0.3], 1: [0.2, 0.1, -0.5], 2: [0.0, 0.1, -0.1]}

  def fill(path, shape):
    layer = path[2]
    if path[-1] == "kernel":
      return kernels[layer] * rng.uniform(0.5, 1.5, shape)
    return np.asarray(biases[layer])

  widths = models.PlainWidths(conv=(), hidden=(4, 3))
  return _with_state(
      lambda: models.create_model(
          "lenet300", input_shape=(2, 2, 1), num_classes=3, rngs=nnx.Rngs(0), widths=widths
      ),
      fill,
  )


def test_hand_built_case_shrinks_to_the_expected_widths_and_parameter_count():
  dense = hand_built_lenet()
  result = compaction.compact(dense, (2, 2, 1))
  # Dense: 4*4+4 + 4*3+3 + 3*3+3 = 47 params. Kept: inputs 0-2, hidden units 0-1 twice:
  # 3*2+2 + 2*2+2 + 2*3+3 = 23.
  assert compaction.parameter_count(dense) == 47
  assert result.widths == models.PlainWidths(conv=(), hidden=(2, 2), input_features=(0, 1, 2))
  assert compaction.parameter_count(result.model) == 23
  assert_same_logits(dense, result.model, (2, 2, 1))


def test_unit_whose_only_live_weight_is_its_bias_is_folded_into_the_next_bias():
  dense = hand_built_lenet()
  compact = compaction.compact(dense, (2, 2, 1)).model
  first, second = dense.head.layers[1], compact.head.layers[1]
  # Hidden-1 unit 2 is the constant relu(0.7) = 0.7; it is gone, and the next layer's bias
  # holds 0.7 times its outgoing weights (columns 0 and 1 are the units that remain).
  expected = first.bias[...][:2] + 0.7 * first.kernel[...][2, :2]
  np.testing.assert_allclose(second.bias[...], expected, rtol=1e-6)
  # Dropping it without the fold would have moved the logits.
  assert abs(0.7 * first.kernel[...][2, :2]).min() > 0.1


def small_batch_norm_net(kernel_fill) -> nnx.Module:
  """conv3x3 (pad 1) 2 -> 4 channels, BatchNorm, ReLU, max-pool, flatten, Linear 16 -> 3 ->
  ReLU -> 2: a VGG in miniature, on 4x4x2 images."""
  spec = models.PlainConvNetSpec((4, "M"), 3, 1, True, (3,))
  return _with_state(
      lambda: models.PlainConvNet(spec, input_shape=(4, 4, 2), num_classes=2, rngs=nnx.Rngs(0)),
      kernel_fill,
  )


def test_batch_norm_running_statistics_are_folded_exactly():
  rng = np.random.default_rng(3)
  norm = {"mean": [0.3, -1.2, 0.5, 0.0], "var": [0.5, 2.5, 1.0, 1.0], "scale": [1, 1.7, 1, 1]}
  norm["bias"] = [0.1, 0.4, -0.2, 0.0]

  def fill(path, shape):
    if path == ("blocks", 0, "conv", "kernel"):
      return rng.normal(size=shape) * (np.arange(4) != 1)  # channel 1: no incoming weight
    if path == ("blocks", 0, "conv", "bias"):
      return np.array([0.2, 0.5, -0.1, 0.3])
    if path[2] == "norm":
      return np.asarray(norm[path[-1]])
    return rng.normal(size=shape)

  dense = small_batch_norm_net(fill)
  # Channel 1 is the constant relu((0.5 - mean) * scale / sqrt(var + eps) + offset) = 2.23.
  constant = (0.5 + 1.2) * 1.7 / math.sqrt(2.5 + 1e-5) + 0.4
  result = compaction.compact(dense, (4, 4, 2))
  assert result.widths.conv == (3,)
  # The pooled 2x2 map of channel 1 is the constant: flattened features (h, w, 1).
  head = dense.head.layers[0].kernel[...].reshape(2, 2, 4, 3)
  expected = dense.head.layers[0].bias[...] + constant * head[:, :, 1].sum(axis=(0, 1))
  np.testing.assert_allclose(result.model.head.layers[0].bias[...], expected, rtol=1e-5)
  assert_same_logits(dense, result.model, (4, 4, 2))


def two_conv_net(input_shape, bias, tap) -> nnx.Module:
  """conv3x3 (pad 1) 1 -> 3, ReLU, conv3x3 (pad 1) 3 -> 3, ReLU, [pool,] Linear: channel 0 of
  the first conv has no incoming weight and ``bias``; the second conv reads it only through
  kernel ``tap``."""
  rng = np.random.default_rng(0)
  pool = ("M",) if input_shape[0] > 1 else ()
  spec = models.PlainConvNetSpec((3, 3, *pool), 3, 1, False, ())

  def fill(path, shape):
    value = rng.normal(size=shape)
    if path == ("blocks", 0, "conv", "kernel"):
      value[..., 0] = 0.0
    if path == ("blocks", 0, "conv", "bias"):
      value[0] = bias
    if path == ("blocks", 1, "conv", "kernel"):
      value[:, :, 0] = 0.0
      value[tap[0], tap[1], 0] = 1.0
    return value

  return _with_state(
      lambda: models.PlainConvNet(spec, input_shape=input_shape, num_classes=2, rngs=nnx.Rngs(0)),
      fill,
  )


@pytest.mark.parametrize(
    "input_shape, bias, tap, kept",
    [
        # A corner tap sees the zero padding at the border and the constant inside: the
        # constant's contribution depends on the position, so the channel stays.
        ((4, 4, 1), 0.8, (0, 0), True),
        # The centre tap always sees the image: folded into the bias, removed.
        ((4, 4, 1), 0.8, (1, 1), False),
        # relu(-0.8) = 0 contributes nothing anywhere: removed whatever the tap.
        ((4, 4, 1), -0.8, (0, 0), False),
        # On a 2x2 map a corner tap still reads the image at one output position: kept.
        ((2, 2, 1), 0.8, (0, 0), True),
        # On a 1x1 map a corner tap only ever reads padding: its weight is as good as pruned.
        ((1, 1, 1), 0.8, (0, 0), False),
    ],
)
def test_constant_seen_through_zero_padding_is_kept_only_when_the_fold_would_be_inexact(
    input_shape, bias, tap, kept
):
  dense = two_conv_net(input_shape, bias, tap)
  result = compaction.compact(dense, input_shape)
  assert result.widths.conv[0] == (3 if kept else 2)
  assert_same_logits(dense, result.model, input_shape)


def test_layers_can_lose_all_units_but_one():
  dense = random_model(named("conv6", (8, 8, 3)), 0.5, seed=4, dead=0.0)
  kernels = dense.blocks[2].conv.kernel, dense.blocks[3].conv.kernel
  kernels[0][...] = kernels[0][...].at[..., 1:].set(0.0)  # conv 2: only channel 0 has inputs
  kernels[1][...] = kernels[1][...].at[:, :, 1:].set(0.0)  # and only it is read
  hidden = dense.head.layers[1].kernel
  hidden[...] = hidden[...].at[:, 1:].set(0.0)  # dense layer 1: only unit 0 has inputs
  dense.head.layers[2].kernel[...] = dense.head.layers[2].kernel[...].at[1:].set(0.0)
  result = compaction.compact(dense, (8, 8, 3))
  assert result.widths.conv[2] == 1 and result.widths.hidden[1] == 1
  assert_same_logits(dense, result.model, (8, 8, 3))


def test_a_layer_that_loses_every_unit_keeps_one_and_stays_exact():
  dense = random_model(named("lenet300", (8, 8, 1)), 0.5, seed=5, dead=0.0)
  kernel = dense.head.layers[2].kernel
  kernel[...] = jnp.zeros_like(kernel[...])  # nothing reads hidden layer 2: logits = biases
  result = compaction.compact(dense, (8, 8, 1))
  assert result.widths.hidden == (1, 1)
  assert_same_logits(dense, result.model, (8, 8, 1))


def test_residual_channel_stays_while_any_block_writes_it_and_goes_when_none_does():
  dense = random_model(named("resnet18", (8, 8, 3)), 0.0, seed=6, dead=0.0)
  blocks = dense.blocks

  def zero(variable, index):
    variable[...] = variable[...].at[index].set(0.0)

  # Stream channel 5: the stem writes a constant, but block 0's residual branch writes a
  # varying value into it, so every tensor of the stage needs it.
  zero(dense.stem.conv.kernel, (..., 5))
  # Stream channel 6: constant everywhere (stem and both residual branches write nothing)
  # and read only by block 2's 1x1 projection, which folds it into its BatchNorm's mean.
  for kernel in (
      dense.stem.conv.kernel,
      blocks[0].second.conv.kernel,
      blocks[1].second.conv.kernel,
  ):
    zero(kernel, (..., 6))
  # Stream channel 7: varying, read only by block 2's projection, whose output an add joins
  # to the residual branch: it stays.
  for block in blocks[:3]:
    zero(block.first.conv.kernel, (slice(None), slice(None), [6, 7]))
  result = compaction.compact(dense, (8, 8, 3))
  assert result.widths.stages == (63, 128, 256, 512)
  assert_same_logits(dense, result.model, (8, 8, 3))


def _zero(variable, index):
  variable[...] = variable[...].at[index].set(0.0)


def _set(variable, index, value):
  variable[...] = variable[...].at[index].set(value)


def test_resnet_inner_layer_that_loses_all_units_but_one_stays_exact():
  dense = random_model(named("resnet18", (8, 8, 3)), 0.0, seed=8, dead=0.0)
  first = dense.blocks[1].first
  # Block 1's first conv: channels 1.. have no incoming weight, so each is the constant
  # relu(BatchNorm(0)); a large negative offset makes that 0, which the 3x3 conv after it can
  # drop at every position, padding or not.
  _zero(first.conv.kernel, (..., slice(1, None)))
  _set(first.norm.bias, slice(1, None), -5.0)
  result = compaction.compact(dense, (8, 8, 3))
  assert result.widths.inner[1] == 1
  assert (
      result.widths.inner[:1] + result.widths.inner[2:]
      == models.default_widths("resnet18").inner[:1] + models.default_widths("resnet18").inner[2:]
  )
  assert_same_logits(dense, result.model, (8, 8, 3))


def test_resnet_channel_whose_only_live_weight_is_its_batch_norm_offset_is_folded():
  dense = random_model(named("resnet18", (8, 8, 3)), 0.0, seed=9, dead=0.0)
  first = dense.blocks[7].first
  # Block 7 works on a 1x1 map (8 -> 4 -> 2 -> 1): its second conv's off-centre taps read only
  # padding, so the constant relu(BatchNorm(0)) of channel 3 folds into that conv's BatchNorm.
  _zero(first.conv.kernel, (..., 3))
  _set(first.norm.bias, 3, 1.5)
  norm = first.norm
  constant = (0.0 - norm.mean[...][3]) * norm.scale[...][3]
  constant = constant / np.sqrt(norm.var[...][3] + 1e-5) + 1.5
  assert constant > 0.5  # a real constant, not a zero that could simply be dropped
  result = compaction.compact(dense, (8, 8, 3))
  assert result.widths.inner[7] == 511
  assert_same_logits(dense, result.model, (8, 8, 3))


def test_densenet_bottleneck_that_loses_all_units_but_one_stays_exact():
  dense = random_model(tiny_densenet, 0.0, seed=10, dead=0.0)
  layer = dense.layers[0]
  _zero(layer.bottleneck.conv.kernel, (..., slice(1, None)))
  _set(layer.expand.norm.bias, slice(1, None), -5.0)  # relu(BatchNorm(0)) = 0 on channels 1..
  result = compaction.compact(dense, (16, 16, 3))
  assert result.widths.bottleneck == (1, 8, 8, 8, 8)
  assert_same_logits(dense, result.model, (16, 16, 3))


def test_densenet_constant_channel_is_folded_through_the_concatenation():
  dense = random_model(tiny_densenet, 0.0, seed=11, dead=0.0)
  # Growth channel 0 of the last layer before the transition has no incoming weight: it is
  # 0, concatenated, then read by the transition's BatchNorm + ReLU as a non-zero constant
  # through a 1x1 conv, whose BatchNorm readers take it.
  _zero(dense.layers[1].expand.conv.kernel, (..., 0))
  result = compaction.compact(dense, (16, 16, 3))
  assert result.widths.growth == (4, 3, 4, 4, 4)
  assert_same_logits(dense, result.model, (16, 16, 3))


@pytest.mark.parametrize(
    "factory, input_shape",
    [
        (named("lenet5", (28, 28, 1)), (28, 28, 1)),
        (named("resnet18", (8, 8, 3)), (8, 8, 3)),
        (tiny_densenet, (16, 16, 3)),
    ],
)
def test_compacting_twice_changes_nothing(factory, input_shape):
  once = compaction.compact(random_model(factory, 0.9, seed=7), input_shape)
  twice = compaction.compact(once.model, input_shape)
  assert once.rounds >= 1 and twice.rounds == 0
  assert twice.widths == once.widths
  before, after = _flat_state(once.model), _flat_state(twice.model)
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))


def test_original_model_is_left_untouched():
  dense = random_model(named("lenet5", (28, 28, 1)), 0.9)
  before = {path: np.array(leaf) for path, leaf in _flat_state(dense).items()}
  compaction.compact(dense, (28, 28, 1))
  for path, leaf in _flat_state(dense).items():
    np.testing.assert_array_equal(leaf, before[path])


def test_widths_rebuild_the_compact_architecture():
  result = compaction.compact(random_model(tiny_densenet, 0.8), (16, 16, 3))
  rebuilt = nnx.eval_shape(
      lambda: models.DenseNet(
          input_shape=(16, 16, 3),
          num_classes=3,
          rngs=nnx.Rngs(0),
          widths=result.widths,
          **TINY_DENSENET,
      )
  )
  shapes = lambda model: {path: leaf.shape for path, leaf in _flat_state(model).items()}
  assert shapes(rebuilt) == shapes(result.model)


def test_compact_params_export_and_load(tmp_path):
  dense = random_model(named("lenet5", (28, 28, 1)), 0.95)
  compact = compaction.compact(dense, (28, 28, 1)).model
  params = nnx.to_pure_dict(nnx.state(compact, nnx.Param))
  flipout.export(params, tmp_path / "compact.npz")
  flipout.export(params, tmp_path / "compact_int8.npz", int8=True)
  exact = traverse_util.flatten_dict(flipout.load(tmp_path / "compact.npz"))
  int8 = traverse_util.flatten_dict(flipout.load(tmp_path / "compact_int8.npz"))
  for path, leaf in traverse_util.flatten_dict(params).items():
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(exact[path], leaf)
    if leaf.ndim >= 2:  # int8 kernels: within one per-channel step (export's bound), zeros kept
      step = np.abs(leaf).reshape(-1, leaf.shape[-1]).max(axis=0) / 127
      assert np.all(np.abs(int8[path] - leaf) <= step * (1 + 1e-6))
      np.testing.assert_array_equal(int8[path] == 0, leaf == 0)
  # The loaded params fit the compact model and give its logits.
  state = nnx.state(compact, nnx.Param)
  nnx.replace_by_pure_dict(state, flipout.load(tmp_path / "compact.npz"))
  nnx.update(compact, state)
  assert_same_logits(dense, compact, (28, 28, 1))


def test_rejects_modules_that_are_not_experiment_models():
  with pytest.raises(TypeError, match="Linear"):
    compaction.compact(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), (1, 1, 2))
