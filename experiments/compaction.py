"""Compaction of the experiments' models through the library: ``flipout.compact``, then the
compact params in a model of the same family at the compact widths.

``flipout.compact`` works on any function of params; for the experiments a compact network
should also be a model of ``experiments.models`` again (qwix quantizes Flax modules, and
exports record the family and its widths, see ``model_export``). So compaction runs with
``constants="params"``: a removed unit's constant goes only into a bias or a BatchNorm's
running mean, units whose constant no param can take stay (a nonzero constant channel read
through zero padding), and the compact params fit the family's own code. The widths are read
off the compact kernels; the first Linear layer of LeNet/Conv-6/VGG reads the flattened
features that survive (``PlainWidths.input_features``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

import flipout_jax as flipout
from experiments import models

Widths = models.PlainWidths | models.ResNetWidths | models.DenseNetWidths


class Compacted(NamedTuple):
  """A compacted network.

  Attributes:
    model: the compact model, in eval mode; same class as the original.
    widths: its per-layer widths (``models.create_model(name, ..., widths=widths)`` builds
      its architecture).
    rounds: analysis rounds that removed something before the fixed point.
    report: the library's :class:`flipout_jax.CompactionReport`.
  """

  model: nnx.Module
  widths: Widths
  rounds: int
  report: flipout.CompactionReport


def _out(state: dict, *path) -> int:
  return int(state[(*path, "kernel")].shape[-1])


def _plain_widths(model, state: dict, kept: dict) -> models.PlainWidths:
  conv = tuple(_out(state, "blocks", i, "conv") for i in range(len(model.blocks)))
  hidden = tuple(_out(state, "head", "layers", i) for i in range(len(model.head.layers) - 1))
  rows = kept[("head", "layers", 0, "kernel")][0]  # flattened features of the dense model
  features = model.head.layers[0].kernel.shape[0]
  if model.blocks:
    # A flattened feature (position, channel) of the compact conv output: its channel
    # renumbered among the kept channels.
    channels = kept[("blocks", len(model.blocks) - 1, "conv", "kernel")][3]
    dense_channels = model.blocks[-1].conv.kernel.shape[3]
    positions, channel = np.divmod(rows, dense_channels)
    rows = positions * len(channels) + np.searchsorted(channels, channel)
    features = features // dense_channels * len(channels)
  every = len(rows) == features  # kept rows are increasing, so then they are all of them
  return models.PlainWidths(conv, hidden, None if every else tuple(rows.tolist()))


def _family_widths(model: nnx.Module, state: dict, kept: dict) -> Widths:
  """The constructor widths of the compact ``model`` read off its compact kernels."""
  if isinstance(model, models.ResNet18):
    stages = [_out(state, "stem", "conv")]
    for i, block in enumerate(model.blocks):
      if block.shortcut is not None:
        stages.append(_out(state, "blocks", i, "shortcut", "conv"))
    inner = tuple(_out(state, "blocks", i, "first", "conv") for i in range(len(model.blocks)))
    return models.ResNetWidths(tuple(stages), inner)
  if isinstance(model, models.DenseNet):
    dense = [i for i, layer in enumerate(model.layers) if hasattr(layer, "bottleneck")]
    transitions = [i for i in range(len(model.layers)) if i not in dense]
    return models.DenseNetWidths(
        _out(state, "stem", "conv"),
        tuple(_out(state, "layers", i, "bottleneck", "conv") for i in dense),
        tuple(_out(state, "layers", i, "expand", "conv") for i in dense),
        tuple(_out(state, "layers", i, "compress", "conv") for i in transitions),
    )
  return _plain_widths(model, state, kept)


def rebuild(model: nnx.Module, widths: Widths, input_shape, num_classes: int, state: dict):
  """A model of ``model``'s class with ``widths``, holding ``state`` (flat, by path)."""

  def create() -> nnx.Module:
    kwargs = dict(input_shape=input_shape, num_classes=num_classes, widths=widths)
    if isinstance(model, models.PlainConvNet):
      return models.PlainConvNet(model.spec, rngs=nnx.Rngs(0), **kwargs)
    if isinstance(model, models.DenseNet):
      return models.DenseNet(block_config=model.block_config, rngs=nnx.Rngs(0), **kwargs)
    return models.ResNet18(rngs=nnx.Rngs(0), **kwargs)

  # Shapes only: no initialiser runs (on CPU each would be an XLA compile).
  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  leaves = traverse_util.flatten_dict(nnx.to_pure_dict(abstract))
  if set(leaves) != set(state) or any(leaves[p].shape != state[p].shape for p in leaves):
    raise AssertionError("compaction produced a state that does not fit the compact model")
  filled = {path: jnp.asarray(state[path], leaf.dtype) for path, leaf in leaves.items()}
  nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(filled))
  compact_model = nnx.merge(graphdef, abstract)
  compact_model.eval()
  return compact_model


def compact(model: nnx.Module, input_shape: Sequence[int]) -> Compacted:
  """Removes every unit of ``model`` that cannot change its inference-mode logits.

  Args:
    model: a model of ``experiments.models`` (any mode; BatchNorm is taken in inference mode,
      with its running statistics).
    input_shape: ``(height, width, channels)`` of one input image (the spatial size decides
      which kernel taps see zero padding).

  Returns:
    The compact model (eval mode; its kernels keep their remaining zeros), its widths, the
    rounds and the library's report.

  Raises:
    TypeError: ``model`` is not one of the experiments' model classes.
  """
  if not isinstance(model, (models.PlainConvNet, models.ResNet18, models.DenseNet)):
    raise TypeError(f"cannot compact a {type(model).__name__}: not a model of experiments.models")
  input_shape = tuple(int(size) for size in input_shape)
  inference = nnx.merge(*nnx.split(model))  # new module objects on the same arrays
  inference.eval()
  graphdef, state = nnx.split(inference)
  params = nnx.to_pure_dict(state)
  # Any images do: the analysis does not depend on their values.
  images = jnp.zeros((2, *input_shape))
  apply = lambda params, images: nnx.merge(graphdef, params)(images)
  compacted = flipout.compact(apply, params, images, constants="params")
  flat = traverse_util.flatten_dict(compacted.params)
  kept = traverse_util.flatten_dict(compacted.kept, is_leaf=lambda _, x: isinstance(x, tuple))
  widths = _family_widths(model, flat, kept)
  compact_model = rebuild(model, widths, input_shape, _num_classes(model), flat)
  return Compacted(compact_model, widths, compacted.report.rounds, compacted.report)


def _num_classes(model: nnx.Module) -> int:
  head = model.head.layers[-1] if isinstance(model, models.PlainConvNet) else model.head
  return int(head.kernel.shape[-1])


def parameter_count(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param`` entries) of ``model``."""
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
