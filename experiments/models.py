"""Flax NNX image classifiers used in the FlipOut experiments, and their inference FLOPs.

Every model takes NHWC float32 images and returns logits. Train/eval mode follows the NNX
convention: ``model.train()`` makes BatchNorm normalise with batch statistics and update its
running averages (``nnx.BatchStat``), ``model.eval()`` makes it use the running averages.
Models are created in train mode (the NNX default).

Architectures follow the reference implementations whose parameter counts the papers quote:

* ``vgg11/13/16/19``: kuangliu/pytorch-cifar VGG (3x3 conv with bias, BatchNorm, ReLU; 2x2
  max-pools; one Linear 512 -> classes head).
* ``resnet18``: kuangliu/pytorch-cifar ResNet18 (3x3 stem, no max-pool, BasicBlocks
  [2, 2, 2, 2], 1x1 conv + BN projection shortcuts, global average pool).
* ``densenet121``: torchvision DenseNet-121 (growth 32, blocks (6, 12, 24, 16), bottleneck
  width 4 * growth, compression 0.5, 7x7/2 stem and 3x3/2 max-pool).
* ``lenet300``: LeNet-300-100 (flatten -> 300 -> 100 -> classes, ReLU).
* ``lenet5``: the Caffe LeNet-5 of the pruning literature (conv5x5 20, pool, conv5x5 50,
  pool, fc 500, fc classes; valid padding). ReLU follows every hidden layer.
* ``conv6``: Conv-6 of Frankle & Carbin (conv3x3 64, 64, pool, 128, 128, pool, 256, 256,
  pool, fc 256, 256, classes; same padding).

Convolutions pad symmetrically by ``kernel_size // 2`` like PyTorch (Flax's ``'SAME'`` pads
strided convolutions asymmetrically, which would shift every stride-2 feature map by a pixel
relative to the references).
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import validation

MODEL_NAMES: tuple[str, ...] = (
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

# Marks a 2x2 stride-2 max-pool in a convolution configuration.
_POOL = "M"

# He-normal with fan_out (untruncated, like torch.nn.init.kaiming_normal_), as torchvision
# initialises ResNet convolutions: it keeps the variance of the backward signal constant
# through ReLU layers.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class PlainConvNetSpec(NamedTuple):
  """Layer table of a :class:`PlainConvNet`.

  Attributes:
    conv_config: output channels of each convolution, with ``"M"`` for a 2x2 max-pool.
    kernel_size: side of every (square, stride-1) convolution kernel.
    padding: zero padding on each side of every convolution.
    batch_norm: whether BatchNorm follows each convolution.
    hidden_widths: widths of the hidden Linear layers before the classifier.
  """

  conv_config: tuple[int | str, ...]
  kernel_size: int
  padding: int
  batch_norm: bool
  hidden_widths: tuple[int, ...]


class PlainWidths(NamedTuple):
  """Per-layer widths of a :class:`PlainConvNet` (e.g. a compacted one): each convolution's
  outputs (pools stay where the spec has them), the hidden Linear widths, and the increasing
  indices of the flattened conv-stack output (or image) the first Linear reads (None: all)."""

  conv: tuple[int, ...]
  hidden: tuple[int, ...]
  input_features: tuple[int, ...] | None = None


class ResNetWidths(NamedTuple):
  """Per-layer widths of a :class:`ResNet18`: each stage's residual stream (the stem writes
  stage 0's), and the outputs of each basic block's first convolution."""

  stages: tuple[int, ...]
  inner: tuple[int, ...]


class DenseNetWidths(NamedTuple):
  """Per-layer widths of a :class:`DenseNet`: the stem's outputs, each dense layer's 1x1
  bottleneck outputs and appended channels (``growth``), each transition's outputs."""

  stem: int
  bottleneck: tuple[int, ...]
  growth: tuple[int, ...]
  transition: tuple[int, ...]


_VGG_HEAD: tuple[int, ...] = ()  # kuangliu VGG: a single Linear 512 -> classes


def _vgg(*stages: tuple[int, ...]) -> PlainConvNetSpec:
  """VGG spec from the conv widths of its five stages; a 2x2 max-pool closes each stage."""
  config = tuple(entry for stage in stages for entry in (*stage, _POOL))
  return PlainConvNetSpec(config, 3, 1, True, _VGG_HEAD)


_PLAIN_SPECS: dict[str, PlainConvNetSpec] = {
    "vgg11": _vgg((64,), (128,), (256,) * 2, (512,) * 2, (512,) * 2),
    "vgg13": _vgg((64,) * 2, (128,) * 2, (256,) * 2, (512,) * 2, (512,) * 2),
    "vgg16": _vgg((64,) * 2, (128,) * 2, (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": _vgg((64,) * 2, (128,) * 2, (256,) * 4, (512,) * 4, (512,) * 4),
    "lenet300": PlainConvNetSpec((), 1, 0, False, (300, 100)),
    "lenet5": PlainConvNetSpec((20, _POOL, 50, _POOL), 5, 0, False, (500,)),
    "conv6": PlainConvNetSpec(
        (64, 64, _POOL, 128, 128, _POOL, 256, 256, _POOL), 3, 1, False, (256, 256)
    ),
    # Issue 35's structured study: a small CNN (conv 32, conv 64, dense 128) and a VGG-style
    # net of two BatchNorm stages, sized for Fashion-MNIST on a CPU.
    "small_cnn": PlainConvNetSpec((32, _POOL, 64, _POOL), 3, 1, False, (128,)),
    "vgg_small": PlainConvNetSpec((16, 16, _POOL, 32, 32, _POOL), 3, 1, True, (64,)),
}


def _batch_norm(num_features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm with PyTorch's defaults (running-average momentum 0.1 == Flax 0.9, eps 1e-5)."""
  return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int | None = None,
    use_bias: bool = False,
) -> nnx.Conv:
  """Square convolution, symmetric padding (``kernel_size // 2`` unless given), He fan-out."""
  return nnx.Conv(
      in_channels,
      out_channels,
      (kernel_size, kernel_size),
      strides=stride,
      padding=kernel_size // 2 if padding is None else padding,
      use_bias=use_bias,
      kernel_init=_CONV_INIT,
      rngs=rngs,
  )


class _ConvNorm(nnx.Module):
  """Convolution followed by an optional BatchNorm; no activation (callers add it)."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      kernel_size: int,
      *,
      rngs: nnx.Rngs,
      stride: int = 1,
      padding: int | None = None,
      use_bias: bool = False,
      batch_norm: bool = True,
  ):
    self.conv = _conv(
        in_channels,
        out_channels,
        kernel_size,
        rngs=rngs,
        stride=stride,
        padding=padding,
        use_bias=use_bias,
    )
    self.norm = _batch_norm(out_channels, rngs) if batch_norm else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    return x if self.norm is None else self.norm(x)


class _NormReLUConv(nnx.Module):
  """Pre-activation unit of DenseNet: BatchNorm, ReLU, then a bias-free convolution."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs):
    self.norm = _batch_norm(in_channels, rngs)
    self.conv = _conv(in_channels, out_channels, kernel_size, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(nnx.relu(self.norm(x)))


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


def _global_average_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2))


class _DenseStack(nnx.Module):
  """Linear layers ``in -> hidden_widths... -> num_classes`` with ReLU between them; with
  ``input_features`` the first reads only those inputs (a compacted network's gather)."""

  def __init__(
      self,
      in_features: int,
      hidden_widths: Sequence[int],
      num_classes: int,
      *,
      rngs: nnx.Rngs,
      input_features: Sequence[int] | None = None,
  ):
    self.input_features = None if input_features is None else tuple(input_features)
    if self.input_features is not None:
      bounds = (-1, *self.input_features, in_features)
      if any(a >= b for a, b in zip(bounds, bounds[1:])):  # () reads nothing: no live input
        raise ValueError(f"input_features must be increasing indices below {in_features}")
      in_features = len(self.input_features)
    widths = (in_features, *hidden_widths, num_classes)
    self.layers = nnx.List(
        [nnx.Linear(fan_in, fan_out, rngs=rngs) for fan_in, fan_out in zip(widths, widths[1:])]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.input_features is not None:
      x = jnp.take(x, np.asarray(self.input_features), axis=1)
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def _conv_stack_output_shape(
    spec: PlainConvNetSpec, input_shape: tuple[int, int, int]
) -> tuple[int, int, int]:
  """Output (H, W, C) of the conv stack: conv ``n + 2p - k + 1`` (stride 1), pool ``n // 2``."""
  height, width, channels = input_shape
  for entry in spec.conv_config:
    if entry == _POOL:
      height, width = height // 2, width // 2
    else:
      shrink = spec.kernel_size - 1 - 2 * spec.padding
      height, width, channels = height - shrink, width - shrink, entry
  return height, width, channels


class PlainConvNet(nnx.Module):
  """Conv[-BN]-ReLU stack with 2x2 max-pools, flatten, then an MLP head.

  One class covers VGG11/13/16/19, LeNet-5, Conv-6 and (with no convolutions) LeNet-300-100;
  each is a row of the layer table ``_PLAIN_SPECS``. Convolutions carry a bias, as in all
  four references (kuangliu's VGG keeps the conv bias although BatchNorm follows it).
  ``widths`` replaces the spec's layer widths (a compacted network).
  """

  def __init__(
      self,
      spec: PlainConvNetSpec,
      *,
      input_shape: tuple[int, int, int],
      num_classes: int,
      rngs: nnx.Rngs,
      widths: PlainWidths | None = None,
  ):
    if widths is not None:
      conv = iter(widths.conv)
      config = tuple(entry if entry == _POOL else next(conv) for entry in spec.conv_config)
      spec = spec._replace(conv_config=config, hidden_widths=tuple(widths.hidden))
    self.spec = spec
    height, width, channels = _conv_stack_output_shape(spec, input_shape)
    if height < 1 or width < 1:
      raise ValueError(
          f"input_shape={tuple(input_shape)} is too small for this network: its "
          "convolutions and pools shrink the image to nothing; use a larger input_shape"
      )
    in_channels = input_shape[2]
    blocks, pool_after = [], []
    options = dict(rngs=rngs, padding=spec.padding, use_bias=True, batch_norm=spec.batch_norm)
    for entry in spec.conv_config:
      if entry == _POOL:
        pool_after[-1] = True
        continue
      blocks.append(_ConvNorm(in_channels, entry, spec.kernel_size, **options))
      pool_after.append(False)
      in_channels = entry
    self.blocks = nnx.List(blocks)
    self.pool_after = tuple(pool_after)
    self.head = _DenseStack(
        height * width * channels,
        spec.hidden_widths,
        num_classes,
        rngs=rngs,
        input_features=None if widths is None else widths.input_features,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    for block, pool in zip(self.blocks, self.pool_after):
      x = nnx.relu(block(x))
      if pool:
        x = _max_pool_2x2(x)
    return self.head(x.reshape(x.shape[0], -1))


class _BasicBlock(nnx.Module):
  """ResNet basic block: ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``.

  The shortcut is the identity, or a 1x1 conv + BN projection when stride or width change.
  """

  def __init__(
      self, in_channels: int, inner: int, out_channels: int, stride: int, *, rngs: nnx.Rngs
  ):
    self.first = _ConvNorm(in_channels, inner, 3, stride=stride, rngs=rngs)
    self.second = _ConvNorm(inner, out_channels, 3, rngs=rngs)
    needs_projection = stride != 1 or in_channels != out_channels
    self.shortcut = (
        _ConvNorm(in_channels, out_channels, 1, stride=stride, rngs=rngs)
        if needs_projection
        else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = self.second(nnx.relu(self.first(x)))
    identity = x if self.shortcut is None else self.shortcut(x)
    return nnx.relu(residual + identity)


class ResNet18(nnx.Module):
  """ResNet-18 for CIFAR (kuangliu layout): 3x3 stem, four stages of two basic blocks.

  Stage widths 64, 128, 256, 512 with stride 2 at the first block of stages 2-4; global
  average pool and one Linear 512 -> classes. Convolutions have no bias (BatchNorm follows);
  ``widths`` changes the layer widths (a compacted network)."""

  def __init__(
      self,
      *,
      input_shape: tuple[int, int, int],
      num_classes: int,
      rngs: nnx.Rngs,
      widths: ResNetWidths | None = None,
  ):
    widths = default_widths("resnet18") if widths is None else widths
    self.stem = _ConvNorm(input_shape[2], widths.stages[0], 3, rngs=rngs)
    blocks, in_channels = [], widths.stages[0]
    for stage, width in enumerate(widths.stages):
      for index in range(2):
        stride = 2 if stage > 0 and index == 0 else 1
        inner = widths.inner[len(blocks)]
        blocks.append(_BasicBlock(in_channels, inner, width, stride, rngs=rngs))
        in_channels = width
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(in_channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(_global_average_pool(x))


class _DenseLayer(nnx.Module):
  """DenseNet-BC layer: BN-ReLU-conv1x1 to ``bottleneck`` (``bn_size * growth`` in the reference),
  BN-ReLU-conv3x3 to ``growth``; its output is concatenated to its input along channels."""

  def __init__(self, in_channels: int, bottleneck: int, growth: int, *, rngs: nnx.Rngs):
    self.bottleneck = _NormReLUConv(in_channels, bottleneck, 1, rngs=rngs)
    self.expand = _NormReLUConv(bottleneck, growth, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, self.expand(self.bottleneck(x))], axis=-1)


class _Transition(nnx.Module):
  """DenseNet transition: BN-ReLU-conv1x1 (channel compression), then 2x2 average pool."""

  def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
    self.compress = _NormReLUConv(in_channels, out_channels, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.avg_pool(self.compress(x), (2, 2), strides=(2, 2))


class DenseNet(nnx.Module):
  """DenseNet-BC as in torchvision; the defaults give DenseNet-121.

  Stem: conv7x7/2 (pad 3) 2*growth channels, BN, ReLU, max-pool 3x3/2 (pad 1). Then dense
  blocks of ``block_config`` layers, each adding ``growth_rate`` channels, separated by
  transitions that multiply the channel count by ``compression``; a final BN-ReLU, global
  average pool and Linear to ``num_classes``. ``widths`` replaces the widths that
  ``growth_rate``, ``bn_size`` and ``compression`` give (a compacted network).
  """

  def __init__(
      self,
      *,
      input_shape: tuple[int, int, int],
      num_classes: int,
      rngs: nnx.Rngs,
      growth_rate: int = 32,
      block_config: Sequence[int] = (6, 12, 24, 16),
      bn_size: int = 4,
      compression: float = 0.5,
      widths: DenseNetWidths | None = None,
  ):
    if widths is None:
      widths = _densenet_widths(growth_rate, block_config, bn_size, compression)
    self.block_config = tuple(block_config)
    channels = widths.stem
    self.stem = _ConvNorm(input_shape[2], channels, 7, stride=2, padding=3, rngs=rngs)
    layers, dense_widths = [], iter(zip(widths.bottleneck, widths.growth))
    for block_index, num_layers in enumerate(block_config):
      for bottleneck, growth in itertools.islice(dense_widths, num_layers):
        layers.append(_DenseLayer(channels, bottleneck, growth, rngs=rngs))
        channels += growth
      if block_index < len(block_config) - 1:
        layers.append(_Transition(channels, widths.transition[block_index], rngs=rngs))
        channels = widths.transition[block_index]
    self.layers = nnx.List(layers)
    self.final_norm = _batch_norm(channels, rngs)
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem(x))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for layer in self.layers:
      x = layer(x)
    return self.head(_global_average_pool(nnx.relu(self.final_norm(x))))


def _densenet_widths(
    growth_rate: int, block_config: Sequence[int], bn_size: int, compression: float
) -> DenseNetWidths:
  """The widths of a uniform DenseNet-BC: every layer ``bn_size * growth`` then ``growth``."""
  transitions, channels, layers = [], 2 * growth_rate, sum(block_config)
  for num_layers in block_config[:-1]:
    channels = int((channels + num_layers * growth_rate) * compression)
    transitions.append(channels)
  bottleneck, growth = (bn_size * growth_rate,) * layers, (growth_rate,) * layers
  return DenseNetWidths(2 * growth_rate, bottleneck, growth, tuple(transitions))


def _is_positive_int(value) -> bool:
  return validation.is_int(value) and value > 0


def _checked_input_shape(input_shape) -> tuple[int, int, int]:
  """``input_shape`` as a tuple of three Python ints, or ValueError naming the argument."""
  if (
      not isinstance(input_shape, Sequence)
      or len(input_shape) != 3
      or not all(_is_positive_int(size) for size in input_shape)
  ):
    raise ValueError(
        f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}"
    )
  return tuple(int(size) for size in input_shape)


def default_widths(name: str) -> PlainWidths | ResNetWidths | DenseNetWidths:
  """The per-layer widths of the reference model ``name`` (one of ``MODEL_NAMES``)."""
  if name == "resnet18":
    return ResNetWidths((64, 128, 256, 512), (64, 64, 128, 128, 256, 256, 512, 512))
  if name == "densenet121":
    return _densenet_widths(32, (6, 12, 24, 16), 4, 0.5)
  spec = _PLAIN_SPECS[name]
  return PlainWidths(tuple(e for e in spec.conv_config if e != _POOL), spec.hidden_widths)


def _check_widths(name: str, widths) -> None:
  """ValueError unless ``widths`` is shaped like ``default_widths(name)``, of positive ints."""
  reference = default_widths(name)  # _DenseStack checks input_features against its input size
  pairs = zip(widths, reference[:2] if name in _PLAIN_SPECS else reference)
  if not isinstance(widths, type(reference)) or not all(
      np.shape(value) == np.shape(expected) and all(map(_is_positive_int, np.ravel(value)))
      for value, expected in pairs
  ):
    raise ValueError(f"widths of {name} must be shaped like {reference}, got {widths!r}")


def create_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    rngs: nnx.Rngs,
    widths: PlainWidths | ResNetWidths | DenseNetWidths | None = None,
) -> nnx.Module:
  """Builds the classifier ``name`` (one of :data:`MODEL_NAMES`) for NHWC ``input_shape`` images.

  Args:
    name: model name, one of ``MODEL_NAMES``.
    input_shape: ``(height, width, channels)`` of one image; fixes the first layer's input
      channels and, for the flattening networks, the width of the first Linear layer.
    num_classes: number of logits.
    rngs: parameter initialisation randomness.
    widths: per-layer widths (e.g. of a compacted network); None: the reference widths.

  Returns:
    The model, in train mode.

  Raises:
    ValueError: ``name`` is not in ``MODEL_NAMES``, ``input_shape``/``num_classes``/``widths``
      are malformed, or ``input_shape`` is too small for the network.
  """
  if name not in MODEL_NAMES:
    raise ValueError(f"name must be one of {', '.join(MODEL_NAMES)}; got {name!r}")
  input_shape = _checked_input_shape(input_shape)
  if not _is_positive_int(num_classes):
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  num_classes = int(num_classes)
  if widths is not None:
    _check_widths(name, widths)
  kwargs = dict(input_shape=input_shape, num_classes=num_classes, rngs=rngs, widths=widths)
  if name == "resnet18":
    return ResNet18(**kwargs)
  if name == "densenet121":
    return DenseNet(**kwargs)
  return PlainConvNet(_PLAIN_SPECS[name], **kwargs)


def _recording(operation: Callable, path: tuple, positions: dict) -> Callable:
  """Wraps a conv/dot primitive so each call adds its output positions to ``positions[path]``."""

  def recorded(*args, **kwargs):
    output = operation(*args, **kwargs)
    # Features are the last axis for both NHWC convs and Linear; with a batch of one every
    # other output entry is one place where the whole kernel is applied.
    positions[path] += math.prod(output.shape[:-1])
    return output

  return recorded


def _output_positions(model: nnx.Module, input_shape: tuple[int, int, int]) -> dict[tuple, int]:
  """Per conv/linear path, how many output positions it computes for one image.

  Runs the forward pass abstractly (``jax.eval_shape``, nothing is computed) on a copy of the
  model made by ``nnx.merge`` inside the trace. On that copy each ``nnx.Conv`` and
  ``nnx.Linear`` gets its ``conv_general_dilated`` / ``dot_general`` attribute (the hook Flax
  provides for swapping the primitive) wrapped in a recorder. Working on a copy leaves the
  caller's model, its mode and its BatchNorm statistics untouched, and no class is patched.
  The copy runs in eval mode (same shapes, cheaper to trace).
  """
  graphdef, state = nnx.split(model)
  positions: dict[tuple, int] = collections.defaultdict(int)

  def forward(state, images):
    replica = nnx.merge(graphdef, state)
    # Shapes are the same in both modes; eval mode skips tracing the running-statistic
    # updates, which Flax makes costly under tracing (seconds for DenseNet-121).
    replica.eval()
    for path, module in nnx.iter_modules(replica):
      if isinstance(module, nnx.Conv):
        module.conv_general_dilated = _recording(module.conv_general_dilated, path, positions)
      elif isinstance(module, nnx.Linear):
        module.dot_general = _recording(module.dot_general, path, positions)
    return replica(images)

  jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return dict(positions)


def inference_flops(model: nnx.Module, input_shape: tuple[int, int, int]) -> tuple[int, int]:
  """Dense and live FLOPs of the conv and linear layers for one ``input_shape`` image.

  For every ``nnx.Conv`` and ``nnx.Linear`` layer ``l`` with kernel ``W_l`` applied at
  ``P_l`` output positions (``H_out * W_out`` for a conv, 1 for a Linear on a flat vector),
  one multiply-accumulate is spent per kernel entry per position, counted as 2 FLOPs:

      dense = 2 * sum_l P_l * size(W_l)
      live  = 2 * sum_l P_l * nnz(W_l)

  where ``nnz`` counts the kernel entries that are not exactly zero (pruned weights are exact
  zeros). Biases, BatchNorm, activations and pooling are not counted, as in the pruning
  literature. Padding positions count as work (the kernel is applied there too). ``P_l`` comes
  from an abstract forward pass (see ``_output_positions``), so layers the forward pass never
  calls count zero and shared layers count once per call.

  Call it outside ``jit``: the live count reads the kernel values.

  Returns:
    ``(dense_flops, live_flops)`` as Python ints.
  """
  positions = _output_positions(model, _checked_input_shape(input_shape))
  dense_flops = live_flops = 0
  for path, module in nnx.iter_modules(model):
    if isinstance(module, (nnx.Conv, nnx.Linear)) and path in positions:
      kernel = np.asarray(module.kernel[...])
      dense_flops += 2 * positions[path] * kernel.size
      live_flops += 2 * positions[path] * int(np.count_nonzero(kernel))
  return dense_flops, live_flops
