"""Tests for experiments.models: reference parameter counts, shapes, BatchNorm modes, FLOPs.

Models are built abstractly (``nnx.eval_shape``: shapes only) wherever values do not matter,
and filled with NumPy random weights where they do: on CPU every distinct initialiser shape
costs an XLA compile (~0.5 s each), which would make real ResNet/DenseNet builds dominate the
suite. Only LeNet-5 is built with its real initialisers.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import models

CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)
DIGITS = (8, 8, 1)
IMAGENETTE = (224, 224, 3)

# Expected counts, derived by hand from the reference layer lists (not from this code).
# A conv k x k, in -> out has k*k*in*out weights (+ out bias where the reference has one);
# BatchNorm has 2*out params (scale, offset; running stats are not params); Linear in*out + out.
REFERENCE_PARAM_COUNTS = [
    # VGG (kuangliu, conv with bias + BN = 9*in*out + 3*out per conv, head 512*10+10 = 5,130):
    # vgg11: 9*(3*64 + 64*128 + 128*256 + 256*256 + 256*512 + 3*512*512) = 9,217,728,
    #        3*(64+128+2*256+4*512) = 8,256; + 5,130                       = 9,231,114
    ("vgg11", CIFAR, 10, 9_231_114),
    # vgg13: 9*(3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 256*256 + 256*512 + 3*512*512)
    #        = 9,402,048; 3*(2*64 + 2*128 + 2*256 + 4*512) = 8,832; + 5,130 = 9,416,010
    ("vgg13", CIFAR, 10, 9_416_010),
    # vgg16: 9*(3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 2*256*256 + 256*512 + 5*512*512)
    #        = 14,710,464; 3*(2*64 + 2*128 + 3*256 + 6*512) = 12,672; + 5,130 = 14,728,266
    ("vgg16", CIFAR, 10, 14_728_266),
    # vgg19: 9*(3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 3*256*256 + 256*512 + 7*512*512)
    #        = 20,018,880; 3*(2*64 + 2*128 + 4*256 + 8*512) = 16,512; + 5,130 = 20,040,522
    ("vgg19", CIFAR, 10, 20_040_522),
    # ResNet18 (bias-free convs + BN): stem 3*9*64 + 128 = 1,856;
    # stage1 2*(2*(9*64*64 + 128)) = 147,968;
    # stage2 (9*64*128 + 9*128*128 + 64*128 + 3*256) + (2*9*128*128 + 2*256) = 525,568;
    # stage3 (9*128*256 + 9*256*256 + 128*256 + 3*512) + (2*9*256*256 + 2*512) = 2,099,712;
    # stage4 (9*256*512 + 9*512*512 + 256*512 + 3*1024) + (2*9*512*512 + 2*1024) = 8,393,728;
    # head 512*10 + 10 = 5,130.  Total 11,173,962 (the PyTorch reference's count).
    ("resnet18", CIFAR, 10, 11_173_962),
    # DenseNet121 = torchvision densenet121 (7,978,856 with 1,000 classes) minus its
    # 1024*1000 + 1000 classifier plus 1024*10 + 10:  7,978,856 - 1,025,000 + 10,250.
    ("densenet121", IMAGENETTE, 10, 6_964_106),
    # LeNet-300-100: 784*300+300 + 300*100+100 + 100*10+10 = 235,500 + 30,100 + 1,010
    ("lenet300", MNIST, 10, 266_610),
    # on 8x8 digits: 64*300+300 + 30,100 + 1,010
    ("lenet300", DIGITS, 10, 50_610),
    # LeNet5: 25*1*20+20 + 25*20*50+50 + (4*4*50)*500+500 + 500*10+10
    #       = 520 + 25,050 + 400,500 + 5,010
    ("lenet5", MNIST, 10, 431_080),
    # Conv6 convs: 27*64+64 + 576*64+64 + 576*128+128 + 1152*128+128 + 1152*256+256
    #              + 2304*256+256 = 1,145,408; 32 -> 4 after three pools:
    # fc (4*4*256)*256+256 + 256*256+256 + 256*10+10 = 1,048,832 + 65,792 + 2,570
    ("conv6", CIFAR, 10, 2_262_602),
    # on 28x28x1: first conv 9*1*64+64 = 640 (1,792 - 1,152 less); 28 -> 14 -> 7 -> 3:
    # 1,144,256 + (3*3*256)*256+256 + 65,792 + 2,570 = 1,144,256 + 590,080 + 68,362
    ("conv6", MNIST, 10, 1_802_698),
]

BATCH_NORM_MODELS = [("vgg11", CIFAR), ("resnet18", CIFAR), ("densenet121", IMAGENETTE)]


@functools.lru_cache(maxsize=None)
def _abstract_model(name, input_shape, num_classes=10):
  """Model with ShapeDtypeStruct leaves: built by tracing only (cached across tests)."""
  return nnx.eval_shape(
      lambda: models.create_model(
          name, input_shape=input_shape, num_classes=num_classes, rngs=nnx.Rngs(0)
      )
  )


def _param_count(model):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _batch_norms(model):
  return [module for _, module in nnx.iter_modules(model) if isinstance(module, nnx.BatchNorm)]


def test_model_names_match_interface():
  assert models.MODEL_NAMES == (
      "vgg11",
      "vgg13",
      "vgg16",
      "vgg19",
      "resnet18",
      "densenet121",
      "lenet300",
      "lenet5",
      "conv6",
      "small_cnn",
      "vgg_small",
  )


@pytest.mark.parametrize("name, input_shape, num_classes, expected", REFERENCE_PARAM_COUNTS)
def test_parameter_count_matches_reference(name, input_shape, num_classes, expected):
  assert _param_count(_abstract_model(name, input_shape, num_classes)) == expected


@pytest.mark.parametrize(
    "name, input_shape",
    [
        *((name, CIFAR) for name in ("vgg11", "vgg13", "vgg16", "vgg19", "resnet18", "conv6")),
        ("densenet121", IMAGENETTE),
        ("lenet300", MNIST),
        ("lenet300", DIGITS),
        ("lenet5", MNIST),
        ("conv6", MNIST),
    ],
)
def test_forward_gives_one_logit_per_class(name, input_shape):
  model = _abstract_model(name, input_shape)
  # Eval mode: tracing train-mode BatchNorm updates costs Flax seconds on DenseNet-121; the
  # train-mode forward is exercised for real in the BatchNorm tests below.
  model.eval()
  images = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  logits = nnx.eval_shape(lambda module, batch: module(batch), model, images)
  assert logits.shape == (3, 10)
  assert logits.dtype == jnp.float32


def test_num_classes_sets_logit_count():
  model = _abstract_model("lenet300", DIGITS, 3)
  # 7 fewer classes than the 10-class count: 7 * (100 weights + 1 bias) fewer params.
  assert _param_count(model) == 50_610 - 7 * 101
  images = jax.ShapeDtypeStruct((5, *DIGITS), jnp.float32)
  assert nnx.eval_shape(lambda module, batch: module(batch), model, images).shape == (5, 3)


def test_kernels_use_flax_layout_in_then_out():
  model = _abstract_model("lenet5", MNIST)
  kernel_shapes = [
      leaf.shape
      for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))
      if path[-1] == "kernel"
  ]
  assert kernel_shapes == [(5, 5, 1, 20), (5, 5, 20, 50), (800, 500), (500, 10)]


@pytest.mark.parametrize("name, input_shape", BATCH_NORM_MODELS)
def test_train_and_eval_switch_every_batch_norm(name, input_shape):
  model = _abstract_model(name, input_shape)
  norms = _batch_norms(model)
  assert norms
  model.eval()
  assert all(norm.use_running_average for norm in norms)
  model.train()
  assert not any(norm.use_running_average for norm in norms)


def _with_random_weights(abstract_model, seed=0):
  """Concrete copy of an abstract model: He-normal kernels, BatchNorm in its initial state.

  NumPy draws the values, so no XLA initialiser is compiled; biases and running means are 0,
  BatchNorm scales and running variances 1 (as Flax initialises them).
  """
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(abstract_model)

  def fill(path, leaf):
    variable_name = path[-2].key
    if variable_name == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      return rng.normal(0.0, math.sqrt(2.0 / fan_in), leaf.shape).astype(leaf.dtype)
    if variable_name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  # jnp.asarray is a device transfer, not a compiled computation.
  filled = jax.tree_util.tree_map_with_path(lambda path, leaf: jnp.asarray(fill(path, leaf)), state)
  return nnx.merge(graphdef, filled)


@pytest.fixture(scope="module")
def small_resnet():
  """ResNet-18 on 8x8 images (three stride-2 stages leave 1x1), NumPy-initialised."""
  return _with_random_weights(_abstract_model("resnet18", (8, 8, 3)))


def _batch_stats(model):
  return [np.array(leaf, copy=True) for leaf in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


def test_train_mode_normalises_with_batch_statistics(small_resnet):
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  others = images.at[1:].multiply(3.0).at[1:].add(1.0)  # image 0 unchanged
  small_resnet.train()
  stats_before = _batch_stats(small_resnet)
  first_logits = small_resnet(images)[0]
  assert any(
      not np.array_equal(before, after)
      for before, after in zip(stats_before, _batch_stats(small_resnet))
  )
  # Image 0's logits depend on the rest of the batch through the batch statistics.
  assert not np.allclose(first_logits, small_resnet(others)[0], atol=1e-4)


def test_eval_mode_uses_running_averages(small_resnet):
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  others = images.at[1:].multiply(3.0).at[1:].add(1.0)
  small_resnet.train()
  train_logits = small_resnet(images)
  small_resnet.eval()
  stats_before = _batch_stats(small_resnet)
  eval_logits = small_resnet(images)
  for before, after in zip(stats_before, _batch_stats(small_resnet), strict=True):
    np.testing.assert_array_equal(before, after)
  np.testing.assert_allclose(eval_logits[0], small_resnet(others)[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(train_logits, eval_logits, atol=1e-4)
  small_resnet.train()


def test_unknown_name_lists_allowed_names():
  with pytest.raises(ValueError, match="name") as error:
    models.create_model("vgg20", input_shape=CIFAR, num_classes=10, rngs=nnx.Rngs(0))
  for allowed in models.MODEL_NAMES:
    assert allowed in str(error.value)


@pytest.mark.parametrize(
    "input_shape, num_classes, argument",
    [
        ((32, 32), 10, "input_shape"),
        ((32, 0, 3), 10, "input_shape"),
        (CIFAR, 0, "num_classes"),
        ((16, 16, 3), 10, "input_shape"),  # five 2x2 pools leave nothing of 16x16
    ],
)
def test_bad_shapes_raise_value_error_naming_argument(input_shape, num_classes, argument):
  with pytest.raises(ValueError, match=argument):
    models.create_model("vgg11", input_shape=input_shape, num_classes=num_classes, rngs=nnx.Rngs(0))


def test_flops_reject_malformed_input_shape():
  with pytest.raises(ValueError, match="input_shape"):
    models.inference_flops(_abstract_model("lenet300", DIGITS), (8, 8))


class _TinyNet(nnx.Module):
  """conv3x3 stride 2 valid (1 -> 2 channels) -> BN -> flatten -> Linear(18 -> 4)."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 2, (3, 3), strides=2, padding="VALID", rngs=rngs)
    self.norm = nnx.BatchNorm(2, rngs=rngs)
    self.linear = nnx.Linear(18, 4, rngs=rngs)

  def __call__(self, x):
    x = self.norm(self.conv(x))
    return self.linear(x.reshape(x.shape[0], -1))


def _tiny_net():
  return _with_random_weights(nnx.eval_shape(lambda: _TinyNet(nnx.Rngs(0))))


def test_flops_of_hand_computable_network():
  net = _tiny_net()
  # 7x7 input, 3x3 stride-2 valid conv -> 3x3 = 9 output positions, 3*3*1*2 = 18 MACs each;
  # Linear 18*4 = 72 MACs.  FLOPs = 2 * (9*18 + 72) = 468.  BN and biases are not counted.
  assert models.inference_flops(net, (7, 7, 1)) == (468, 468)
  # Zero 9 of the 18 conv weights: 9 positions * 9 MACs fewer = 162 FLOPs fewer.
  net.conv.kernel[...] = net.conv.kernel[...].at[:, :, :, 0].set(0.0)
  assert models.inference_flops(net, (7, 7, 1)) == (468, 468 - 162)


def test_flops_leave_model_state_and_mode_untouched():
  net = _tiny_net()
  stats_before = _batch_stats(net)
  models.inference_flops(net, (7, 7, 1))
  assert net.norm.use_running_average is False
  for before, after in zip(stats_before, _batch_stats(net), strict=True):
    np.testing.assert_array_equal(before, after)
  assert net.conv.conv_general_dilated is jax.lax.conv_general_dilated


@pytest.fixture(scope="module")
def lenet5():
  """LeNet-5 built with its real initialisers (the one real build in this file)."""
  return models.create_model("lenet5", input_shape=MNIST, num_classes=10, rngs=nnx.Rngs(0))


def test_real_initialisation_gives_he_fan_out_convs_and_finite_logits(lenet5):
  # conv1 kernel (5, 5, 1, 20): fan_out = 5*5*20 = 500, He std = sqrt(2 / 500) = 0.063;
  # 500 draws estimate the std within a few percent.
  kernel = np.asarray(lenet5.blocks[0].conv.kernel[...])
  assert kernel.std() == pytest.approx(math.sqrt(2.0 / 500), rel=0.15)
  logits = lenet5(jnp.ones((2, *MNIST)))
  assert logits.shape == (2, 10)
  assert np.isfinite(np.asarray(logits)).all()


def test_lenet5_flops_and_pruned_flops(lenet5):
  # conv1: 24x24 positions * 5*5*1*20 = 288,000 MACs; conv2: 8x8 * 5*5*20*50 = 1,600,000;
  # fc1 800*500 = 400,000; fc2 500*10 = 5,000.  2 * 2,293,000 FLOPs.
  dense = 2 * (24 * 24 * 500 + 8 * 8 * 25_000 + 400_000 + 5_000)
  assert models.inference_flops(lenet5, MNIST) == (dense, dense)
  fc1 = lenet5.head.layers[0]
  fc1.kernel[...] = fc1.kernel[...].at[:400].set(0.0)  # half of fc1: 200,000 MACs gone
  assert models.inference_flops(lenet5, MNIST) == (dense, dense - 2 * 200_000)


# --- Per-layer widths (compacted networks). ---------------------------------------------------


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_default_widths_build_the_reference_model(name):
  input_shape = CIFAR if name != "lenet300" else DIGITS
  rebuilt = nnx.eval_shape(
      lambda: models.create_model(
          name,
          input_shape=input_shape,
          num_classes=10,
          rngs=nnx.Rngs(0),
          widths=models.default_widths(name),
      )
  )
  shapes = lambda model: jax.tree.map(lambda leaf: leaf.shape, nnx.state(model))
  assert shapes(rebuilt) == shapes(_abstract_model(name, input_shape))


def _narrow(name, widths, input_shape=CIFAR):
  return nnx.eval_shape(
      lambda: models.create_model(
          name, input_shape=input_shape, num_classes=10, rngs=nnx.Rngs(0), widths=widths
      )
  )


def test_resnet_widths_set_stream_and_inner_channels():
  model = _narrow("resnet18", models.ResNetWidths((8, 16, 16, 32), (1, 2, 3, 4, 5, 6, 7, 8)))
  assert model.stem.conv.kernel.shape == (3, 3, 3, 8)
  assert model.blocks[1].first.conv.kernel.shape == (3, 3, 8, 2)
  assert model.blocks[1].second.conv.kernel.shape == (3, 3, 2, 8)
  assert model.blocks[1].shortcut is None  # same stream: identity
  assert model.blocks[2].shortcut.conv.kernel.shape == (1, 1, 8, 16)
  # Stage 3 keeps 16 channels but still halves the map: a projection all the same.
  assert model.blocks[4].shortcut.conv.kernel.shape == (1, 1, 16, 16)
  assert model.head.kernel.shape == (32, 10)


def test_densenet_widths_track_the_concatenated_channels():
  widths = models.DenseNetWidths(
      stem=5, bottleneck=(3,) * 58, growth=(2,) * 58, transition=(7, 6, 4)
  )
  model = _narrow("densenet121", widths)
  assert model.stem.conv.kernel.shape == (7, 7, 3, 5)
  assert model.layers[1].bottleneck.conv.kernel.shape == (1, 1, 5 + 2, 3)
  assert model.layers[1].expand.conv.kernel.shape == (3, 3, 3, 2)
  assert model.layers[6].compress.conv.kernel.shape == (1, 1, 5 + 6 * 2, 7)
  assert model.final_norm.scale.shape == (4 + 16 * 2,)


def test_plain_widths_with_input_features_gather_the_flattened_input():
  widths = models.PlainWidths(conv=(), hidden=(4, 3), input_features=(0, 5, 63))
  model = _with_random_weights(_narrow("lenet300", widths, DIGITS))
  assert model.head.layers[0].kernel.shape == (3, 4)
  images = jax.random.normal(jax.random.key(0), (2, *DIGITS))
  flat = images.reshape(2, -1)[:, jnp.array([0, 5, 63])]
  first = model.head.layers[0]
  hidden = nnx.relu(
      nnx.relu(flat @ first.kernel[...] + first.bias[...]) @ model.head.layers[1].kernel[...]
  )
  expected = hidden @ model.head.layers[2].kernel[...]
  np.testing.assert_allclose(model(images), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, widths",
    [
        ("resnet18", models.PlainWidths((), (300, 100))),  # another family's widths
        ("resnet18", models.ResNetWidths((64, 128, 256), (64,) * 8)),  # a stage missing
        (
            "vgg11",
            models.PlainWidths((64,) * 7, ()),
        ),  # VGG11 has 8 convolutions
        ("vgg11", models.PlainWidths((64, 0, 1, 1, 1, 1, 1, 1), ())),  # a width of 0
        ("lenet300", models.PlainWidths((), (300, 100), input_features=(3, 2))),
        ("lenet300", models.PlainWidths((), (300, 100), input_features=(0, 64))),
        ("densenet121", models.DenseNetWidths(64, (128,) * 58, (32,) * 58, (128, 256))),
    ],
)
def test_malformed_widths_raise_value_error(name, widths):
  with pytest.raises(ValueError, match="widths|input_features"):
    _narrow(name, widths, DIGITS if name == "lenet300" else CIFAR)
