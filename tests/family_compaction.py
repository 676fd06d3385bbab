"""The per-family compaction experiments.compaction had before flipout.compact: the tests'
oracle (the library must remove at least as many parameters on every family), kept as it was.

Compaction: a pruned network rewritten as a smaller dense one with the same predictions.

Pruning zeroes weights but leaves every layer as wide as before, so a pruned network costs as
much to run as a dense one. Compaction removes every unit that cannot change the output, in
inference mode (BatchNorm uses its running statistics):

* a unit with no live outgoing weight (nothing reads it), and
* a unit with no live incoming weight: its value is then a constant (its bias through
  BatchNorm, ReLU and pooling), whose effect on the next layer is folded into that layer's
  bias, exactly: a constant ``v`` in channel ``c`` adds ``v * sum_taps K[tap, c, o]`` to
  output ``o``. A layer without a bias takes the constant into the BatchNorm that reads its
  output instead (``mean -= delta``, as BatchNorm is affine in its input); a DenseNet layer's
  output takes it into every BatchNorm that reads the channel after the concatenations.

Units are output channels of convolutions, units of Linear layers and the flattened inputs of
the first Linear layer of LeNet/Conv-6/VGG (a gather). Removing some makes others removable,
so the analysis repeats to a fixed point.

What is kept, and why:

* A constant channel read by a zero-padded convolution through a kernel tap that sees the
  image at some output positions and the padding at others: the constant's contribution then
  depends on the position, no bias can hold it, and the unit stays (a zero constant, e.g. a
  ReLU of a negative bias, contributes nothing and goes). Taps that never see the image (a
  3x3 kernel on a 1x1 map) contribute nothing and are ignored.
* Channels of a residual stream (ResNet) or of a concatenation (DenseNet) are one axis for
  all the tensors that carry them: a channel goes only when every tensor on the axis can
  lose it (unread or folded), in every block that reads or writes the stream.
* The network's input channels and its logits; and one unit of a layer that would lose all
  (Flax layers have width >= 1; a network whose output ignores its input is left so).

The analysis runs on a small graph of the model (layers, BatchNorms, ReLUs, pools, adds,
concatenations over named channel axes) built per family; it works in float64 on host and
rounds each folded parameter to float32 once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from experiments import compaction, models

_INPUT = "input"
_LOGITS = "logits"
# Reduction axes of a (kernel_h, kernel_w, in, out) kernel.
_TAPS_AND_INPUTS = (0, 1, 2)

Widths = models.PlainWidths | models.ResNetWidths | models.DenseNetWidths


class Compacted(NamedTuple):
  """A compacted network.

  Attributes:
    model: the compact model, in eval mode; same class as the original.
    widths: its per-layer widths (``models.create_model(name, ..., widths=widths)`` builds
      its architecture).
    rounds: analysis rounds that removed something before the fixed point.
  """

  model: nnx.Module
  widths: Widths
  rounds: int


class _Op(NamedTuple):
  """One step of the forward pass, on whole tensors named ``srcs`` -> ``out``."""

  kind: str  # "layer", "norm", "relu", "pool", "add" or "concat"
  srcs: tuple[str, ...]
  out: str
  path: tuple = ()  # layer, norm: the module's path in the model state
  axis: str = ""  # layer: the channel axis of its outputs
  # layer: "conv", "dense" (2-D kernel on a vector), "flatten" (2-D kernel on a flattened
  # map); pool: "max", "avg" or "mean" (global average).
  mode: str = ""
  bias: bool = False
  stride: int = 1
  padding: int = 0
  epsilon: float = 0.0
  rows: tuple[int, ...] | None = None  # flatten: the flattened features the kernel rows read


class _Graph(NamedTuple):
  """Ops in forward order; each tensor's channel axes and spatial size ((1, 1): a vector)."""

  ops: tuple[_Op, ...]
  tensors: dict[str, tuple[tuple[str, ...], tuple[int, int]]]


def _symmetric(value, name: str) -> int:
  """Stride or padding (an int, ``"VALID"``, or equal ints per side and axis) as one int."""
  values = {0} if value == "VALID" else set() if isinstance(value, str) else set(np.ravel(value))
  if len(values) != 1:
    raise NotImplementedError(f"compaction supports only symmetric {name}, got {value!r}")
  return int(values.pop())


class _Builder:
  """Records a forward pass as ops, tracking each tensor's axes and spatial size."""

  def __init__(self, input_shape: tuple[int, int, int]):
    self.ops: list[_Op] = []
    self.tensors = {_INPUT: ((_INPUT,), tuple(input_shape[:2]))}

  def _emit(self, kind: str, srcs, axes, spatial, **fields) -> str:
    out = f"t{len(self.ops)}"
    self.ops.append(_Op(kind, tuple(srcs), out, **fields))
    self.tensors[out] = (tuple(axes), tuple(spatial))
    return out

  def layer(self, src: str, module, path: tuple, axis: str, mode: str = "conv", rows=None) -> str:
    """A Conv or Linear ``module`` at ``path`` whose outputs open ``axis``."""
    fields = dict(path=path, axis=axis, mode=mode, bias=module.use_bias, rows=rows)
    if mode != "conv":
      return self._emit("layer", [src], [axis], (1, 1), **fields)
    stride = _symmetric(module.strides, "strides")
    padding = _symmetric(module.padding, "padding")
    spatial = [
        (size + 2 * padding - kernel) // stride + 1
        for size, kernel in zip(self.tensors[src][1], module.kernel_size)
    ]
    return self._emit("layer", [src], [axis], spatial, stride=stride, padding=padding, **fields)

  def norm(self, src: str, module: nnx.BatchNorm, path: tuple) -> str:
    return self._emit("norm", [src], *self.tensors[src], path=path, epsilon=module.epsilon)

  def relu(self, src: str) -> str:
    return self._emit("relu", [src], *self.tensors[src])

  def pool(self, src: str, mode: str, window: int = 1, stride: int = 1, padding: int = 0) -> str:
    spatial = [(size + 2 * padding - window) // stride + 1 for size in self.tensors[src][1]]
    if mode == "mean":
      spatial = (1, 1)
    fields = dict(mode=mode, stride=stride, padding=padding)
    return self._emit("pool", [src], self.tensors[src][0], spatial, **fields)

  def add(self, first: str, second: str) -> str:
    return self._emit("add", [first, second], *self.tensors[first])

  def concat(self, srcs: Sequence[str]) -> str:
    axes = [axis for src in srcs for axis in self.tensors[src][0]]
    return self._emit("concat", srcs, axes, self.tensors[srcs[0]][1])

  def graph(self) -> _Graph:
    return _Graph(tuple(self.ops), self.tensors)


def _plain_graph(model: models.PlainConvNet, builder: _Builder) -> str:
  """Conv[-BN]-ReLU[-pool] blocks, then Linear layers (the first reads the flattened map)."""
  x = _INPUT
  for index, (block, pool) in enumerate(zip(model.blocks, model.pool_after)):
    x = builder.layer(x, block.conv, ("blocks", index, "conv"), f"conv{index}")
    if block.norm is not None:
      x = builder.norm(x, block.norm, ("blocks", index, "norm"))
    x = builder.relu(x)
    if pool:
      x = builder.pool(x, "max", 2, 2)
  layers = model.head.layers
  for index, layer in enumerate(layers):
    last = index == len(layers) - 1
    mode, rows = ("flatten", model.head.input_features) if index == 0 else ("dense", None)
    axis = _LOGITS if last else f"dense{index}"
    x = builder.layer(x, layer, ("head", "layers", index), axis, mode, rows)
    x = x if last else builder.relu(x)
  return x


def _conv_norm(builder: _Builder, x: str, unit, path: tuple, axis: str) -> str:
  """A models._ConvNorm: convolution then BatchNorm."""
  x = builder.layer(x, unit.conv, (*path, "conv"), axis)
  return builder.norm(x, unit.norm, (*path, "norm"))


def _resnet_graph(model: models.ResNet18, builder: _Builder) -> str:
  """Stem, basic blocks (a projection shortcut opens the next stage's stream axis), head."""
  stage = 0
  x = builder.relu(_conv_norm(builder, _INPUT, model.stem, ("stem",), "stream0"))
  for index, block in enumerate(model.blocks):
    path = ("blocks", index)
    stage += block.shortcut is not None
    inner = builder.relu(_conv_norm(builder, x, block.first, (*path, "first"), f"inner{index}"))
    residual = _conv_norm(builder, inner, block.second, (*path, "second"), f"stream{stage}")
    if block.shortcut is not None:
      x = _conv_norm(builder, x, block.shortcut, (*path, "shortcut"), f"stream{stage}")
    x = builder.relu(builder.add(residual, x))
  return builder.layer(builder.pool(x, "mean"), model.head, ("head",), _LOGITS, "dense")


def _norm_relu_conv(builder: _Builder, x: str, unit, path: tuple, axis: str) -> str:
  """A models._NormReLUConv: BatchNorm, ReLU, then a bias-free convolution."""
  x = builder.relu(builder.norm(x, unit.norm, (*path, "norm")))
  return builder.layer(x, unit.conv, (*path, "conv"), axis)


def _densenet_graph(model: models.DenseNet, builder: _Builder) -> str:
  """Stem and max-pool, dense layers concatenating their growth channels, transitions, head.

  Every dense layer's growth channels and every transition's outputs are axes of their own:
  the concatenated stream is the list of those axes, so a channel is tracked through every
  later concatenation and every BatchNorm that reads it.
  """
  x = builder.relu(_conv_norm(builder, _INPUT, model.stem, ("stem",), "stem"))
  x = builder.pool(x, "max", 3, 2, 1)
  for index, layer in enumerate(model.layers):
    path = ("layers", index)
    if hasattr(layer, "bottleneck"):
      inner = _norm_relu_conv(builder, x, layer.bottleneck, (*path, "bottleneck"), f"b{index}")
      growth = _norm_relu_conv(builder, inner, layer.expand, (*path, "expand"), f"g{index}")
      x = builder.concat([x, growth])
    else:
      x = _norm_relu_conv(builder, x, layer.compress, (*path, "compress"), f"t{index}")
      x = builder.pool(x, "avg", 2, 2)
  x = builder.pool(builder.relu(builder.norm(x, model.final_norm, ("final_norm",))), "mean")
  return builder.layer(x, model.head, ("head",), _LOGITS, "dense")


_FAMILIES: dict[type, Callable] = {
    models.PlainConvNet: _plain_graph,
    models.ResNet18: _resnet_graph,
    models.DenseNet: _densenet_graph,
}


def _build_graph(model: nnx.Module, input_shape: tuple[int, int, int]) -> _Graph:
  if type(model) not in _FAMILIES:
    raise TypeError(f"cannot compact a {type(model).__name__}: not a model of experiments.models")
  builder = _Builder(input_shape)
  _FAMILIES[type(model)](model, builder)
  return builder.graph()


# ---------------------------------------------------------------------------------------------
# Working state: every kernel as (kernel_h, kernel_w, in, out) in float64.
# ---------------------------------------------------------------------------------------------


def _widths_of(graph: _Graph, state: dict, input_channels: int) -> dict[str, int]:
  """The current width of every axis, read off the layer kernels (and the input)."""
  widths = {_INPUT: input_channels}
  for op in graph.ops:
    if op.kind == "layer":
      widths[op.axis] = state[(*op.path, "kernel")].shape[-1]
  return widths


def _to_working(graph: _Graph, state: dict, input_channels: int) -> dict:
  """float64 copies; Linear kernels as 1x1 convolutions, the flattening one as a VALID
  convolution covering the whole map (its gathered rows scattered back to their places)."""
  state = {path: np.array(leaf, np.float64) for path, leaf in state.items()}
  channels = {_INPUT: input_channels}
  for op in graph.ops:
    if op.kind != "layer":
      continue
    kernel = state[(*op.path, "kernel")]
    if op.mode == "dense":
      kernel = kernel[None, None]
    elif op.mode == "flatten":
      axes, (height, width) = graph.tensors[op.srcs[0]]
      full = np.zeros((height * width * sum(channels[axis] for axis in axes), kernel.shape[-1]))
      full[slice(None) if op.rows is None else np.asarray(op.rows)] = kernel
      kernel = full.reshape(height, width, -1, kernel.shape[-1])
    state[(*op.path, "kernel")] = kernel
    channels[op.axis] = kernel.shape[-1]
  return state


def _from_working(graph: _Graph, state: dict) -> tuple[dict, tuple[int, ...] | None]:
  """Native kernel shapes back; the flattening kernel keeps only its rows with a live weight
  (returned as the gather indices; None when every row is live)."""
  state, rows = dict(state), None
  for op in graph.ops:
    if op.kind == "layer" and op.mode != "conv":
      kernel = state[(*op.path, "kernel")].reshape(-1, state[(*op.path, "kernel")].shape[-1])
      if op.mode == "flatten":
        live = np.flatnonzero(kernel.any(axis=1))
        live = live if live.size else np.arange(1)  # a Linear layer needs one input
        if live.size < kernel.shape[0]:
          rows, kernel = tuple(live.tolist()), kernel[live]
      state[(*op.path, "kernel")] = kernel
  return state, rows


def _coverage(size: int, kernel: int, stride: int, padding: int) -> tuple[np.ndarray, np.ndarray]:
  """Per kernel offset along one axis: whether it reads the image at every output position,
  and whether at none (only padding)."""
  outputs = (size + 2 * padding - kernel) // stride + 1
  positions = np.arange(outputs)[:, None] * stride + np.arange(kernel)[None, :] - padding
  inside = (positions >= 0) & (positions < size)
  return inside.all(axis=0), ~inside.any(axis=0)


def _effective_kernel(graph: _Graph, state: dict, op: _Op):
  """The kernel without its never-seen taps, and which taps always / only sometimes see the
  image (a constant channel seen through a sometimes-tap gives a position-dependent sum)."""
  kernel = state[(*op.path, "kernel")]
  if op.mode != "conv":
    always = np.ones(kernel.shape[:2], bool)
    return kernel, always, ~always
  (rows_always, rows_never), (cols_always, cols_never) = (
      _coverage(size, taps, op.stride, op.padding)
      for size, taps in zip(graph.tensors[op.srcs[0]][1], kernel.shape[:2])
  )
  always = rows_always[:, None] & cols_always[None, :]
  never = rows_never[:, None] | cols_never[None, :]
  return np.where(never[:, :, None, None], 0.0, kernel), always, ~always & ~never


# ---------------------------------------------------------------------------------------------
# Analysis: which channels are constant, which are read, where a constant can be folded.
# ---------------------------------------------------------------------------------------------


def _batch_norm(state: dict, op: _Op, x: np.ndarray) -> np.ndarray:
  """Inference BatchNorm of per-channel constants (NaN: not constant, stays NaN)."""
  leaf = lambda name, default: state.get((*op.path, name), default)
  scale = leaf("scale", 1.0) / np.sqrt(leaf("var", 1.0) + op.epsilon)
  return (x - leaf("mean", 0.0)) * scale + leaf("bias", 0.0)


def _layer_constants(graph: _Graph, state: dict, op: _Op, x: np.ndarray) -> np.ndarray:
  """Outputs whose live weights all read constants through always-taps are constants."""
  kernel, always, partial = _effective_kernel(graph, state, op)
  varying = np.isnan(x)[:, None] | (partial[:, :, None, None] & (x != 0)[:, None])
  blocked = ((kernel != 0) & varying).any(axis=_TAPS_AND_INPUTS)
  bias = state[(*op.path, "bias")] if op.bias else 0.0
  sums = np.einsum("hwco,c->o", kernel * always[:, :, None, None], np.nan_to_num(x))
  return np.where(blocked, np.nan, bias + sums)


def _constants(graph: _Graph, state: dict, input_channels: int) -> dict[str, np.ndarray]:
  """Per tensor, the value of each channel that is the same for every input and position."""
  values = {_INPUT: np.full(input_channels, np.nan)}
  for op in graph.ops:
    x = [values[src] for src in op.srcs]
    if op.kind == "layer":
      values[op.out] = _layer_constants(graph, state, op, x[0])
    elif op.kind == "norm":
      values[op.out] = _batch_norm(state, op, x[0])
    elif op.kind == "relu":
      values[op.out] = np.maximum(x[0], 0.0)  # NaN stays NaN
    elif op.kind == "pool":
      # Max-pools pad with -inf, so a constant stays one; an average over zero padding not.
      exact = op.mode != "avg" or op.padding == 0
      values[op.out] = x[0] if exact else np.full_like(x[0], np.nan)
    elif op.kind == "add":
      values[op.out] = x[0] + x[1]
    else:
      values[op.out] = np.concatenate(x)
  return values


def _consumers(graph: _Graph) -> dict[str, list[_Op]]:
  consumers: dict[str, list[_Op]] = {}
  for op in graph.ops:
    for src in op.srcs:
      consumers.setdefault(src, []).append(op)
  return consumers


def _absorbers(graph, consumers, widths, tensor: str, offset: int = 0):
  """The BatchNorms (with the offset of ``tensor``'s channels in their input) that take a
  constant added to ``tensor`` into their mean; None when another consumer would see it."""
  found = []
  for op in consumers.get(tensor, ()):
    if op.kind == "norm":
      found.append((op, offset))
      continue
    # Pools, adds and concatenations pass a constant shift on unchanged (an average over
    # zero padding would not); a ReLU or a layer does not.
    if op.kind not in ("pool", "add", "concat") or (op.mode == "avg" and op.padding):
      return None
    before = op.srcs[: op.srcs.index(tensor)] if op.kind == "concat" else ()
    shift = sum(widths[axis] for src in before for axis in graph.tensors[src][0])
    inner = _absorbers(graph, consumers, widths, op.out, offset + shift)
    if inner is None:
      return None
    found += inner
  return found if tensor in consumers else None


def _fold_targets(graph: _Graph, widths: dict) -> dict[str, list | None]:
  """Per bias-free layer output, where a constant added to it goes (None: nowhere)."""
  consumers = _consumers(graph)
  return {
      op.out: _absorbers(graph, consumers, widths, op.out)
      for op in graph.ops
      if op.kind == "layer" and not op.bias
  }


def _exact_folds(op: _Op, x: np.ndarray, partial: np.ndarray, targets) -> np.ndarray:
  """(tap, channel): whether that input's contribution is a constant that can be folded."""
  foldable = op.bias or targets.get(op.out) is not None
  # A nonzero constant seen through a tap that reads zero padding at some output positions
  # adds a position-dependent amount that no bias holds: the fold would be inexact, so the
  # channel counts as read and is kept. A zero constant adds nothing anywhere.
  nonzero = (x != 0)[None, None, :]
  return ~np.isnan(x)[None, None, :] & ~(nonzero & (partial[:, :, None] | (not foldable)))


def _used(graph, state, values, widths, targets) -> dict[str, np.ndarray]:
  """Per tensor, the channels whose value the logits depend on (other than through folds)."""
  used = {name: np.zeros(len(values[name]), bool) for name in values}
  used[graph.ops[-1].out][:] = True
  for op in reversed(graph.ops):
    out = used[op.out]
    if op.kind == "layer":
      kernel, _, partial = _effective_kernel(graph, state, op)
      exact = _exact_folds(op, values[op.srcs[0]], partial, targets)
      reads = (kernel != 0) & ~exact[..., None] & out
      used[op.srcs[0]] |= reads.any(axis=(0, 1, 3))
    elif op.kind == "concat":
      ends = np.cumsum([len(values[src]) for src in op.srcs])[:-1]
      for src, part in zip(op.srcs, np.split(out, ends)):
        used[src] |= part
    else:
      for src in op.srcs:
        used[src] |= out
  return used


def _keep(graph: _Graph, used: dict, widths: dict) -> dict[str, np.ndarray]:
  """Per axis, the channels some tensor on it needs (at least one per axis; all of the input
  and of the logits)."""
  keep = {axis: np.zeros(width, bool) for axis, width in widths.items()}
  for name, (axes, _) in graph.tensors.items():
    ends = np.cumsum([widths[axis] for axis in axes])[:-1]
    for axis, part in zip(axes, np.split(used[name], ends)):
      keep[axis] |= part
  keep[_INPUT][:] = keep[_LOGITS][:] = True
  for mask in keep.values():
    mask[0] |= not mask.any()  # Flax layers need width >= 1
  return keep


def _mask_of(graph: _Graph, keep: dict, tensor: str) -> np.ndarray:
  """The kept channels of ``tensor`` (all of the network input)."""
  return np.concatenate([keep[axis] for axis in graph.tensors[tensor][0]])


# ---------------------------------------------------------------------------------------------
# Rewriting: fold the removed constants, then cut the removed channels.
# ---------------------------------------------------------------------------------------------


def _fold(graph, state, values, keep, targets) -> None:
  """Adds each removed constant input channel's contribution to its reader's bias (or, for a
  bias-free reader, subtracts it from the running mean of the BatchNorms after it)."""
  for op in graph.ops:
    if op.kind != "layer":
      continue
    x = values[op.srcs[0]]
    folded = ~_mask_of(graph, keep, op.srcs[0]) & ~np.isnan(x) & (x != 0)
    if not folded.any():
      continue
    kernel, always, _ = _effective_kernel(graph, state, op)
    # Only always-taps: a removed constant reaches an output through a sometimes-tap only if
    # that output is unread (else the channel would be kept), so its value does not matter.
    delta = np.einsum("hwco,c->o", (kernel * always[:, :, None, None])[:, :, folded], x[folded])
    if op.bias:
      state[(*op.path, "bias")] += delta
    # A bias-free layer whose output goes nowhere foldable only sends removed constants to
    # unread outputs (else they would be kept): nothing to fold.
    for norm, offset in targets.get(op.out) or ():
      state[(*norm.path, "mean")][offset : offset + delta.size] -= delta


def _cut(graph: _Graph, state: dict, keep: dict) -> None:
  """Slices every kernel, bias and BatchNorm leaf down to the kept channels."""
  for op in graph.ops:
    if op.kind == "layer":
      inputs, outputs = _mask_of(graph, keep, op.srcs[0]), keep[op.axis]
      kernel = (*op.path, "kernel")
      state[kernel] = state[kernel][:, :, inputs][..., outputs]
      if op.bias:
        state[(*op.path, "bias")] = state[(*op.path, "bias")][outputs]
    elif op.kind == "norm":
      channels = _mask_of(graph, keep, op.srcs[0])
      for leaf in ("scale", "bias", "mean", "var"):
        if (*op.path, leaf) in state:
          state[(*op.path, leaf)] = state[(*op.path, leaf)][channels]


def _compact_state(graph: _Graph, state: dict, input_channels: int) -> int:
  """Removes and folds units in ``state`` (working form) until none is left; returns rounds."""
  rounds = 0
  while True:
    widths = _widths_of(graph, state, input_channels)
    values = _constants(graph, state, input_channels)
    targets = _fold_targets(graph, widths)
    keep = _keep(graph, _used(graph, state, values, widths, targets), widths)
    if all(mask.all() for mask in keep.values()):
      return rounds
    _fold(graph, state, values, keep, targets)
    _cut(graph, state, keep)
    rounds += 1


# ---------------------------------------------------------------------------------------------
# The compact model.
# ---------------------------------------------------------------------------------------------


def _family_widths(model: nnx.Module, widths: dict, rows) -> Widths:
  """The constructor widths of the compact ``model`` from its axis widths."""
  if isinstance(model, models.ResNet18):
    stages = sum(axis.startswith("stream") for axis in widths)
    return models.ResNetWidths(
        tuple(widths[f"stream{stage}"] for stage in range(stages)),
        tuple(widths[f"inner{index}"] for index in range(len(model.blocks))),
    )
  if isinstance(model, models.DenseNet):
    dense = [i for i, layer in enumerate(model.layers) if hasattr(layer, "bottleneck")]
    transitions = [i for i in range(len(model.layers)) if i not in dense]
    return models.DenseNetWidths(
        widths["stem"],
        tuple(widths[f"b{index}"] for index in dense),
        tuple(widths[f"g{index}"] for index in dense),
        tuple(widths[f"t{index}"] for index in transitions),
    )
  return models.PlainWidths(
      tuple(widths[f"conv{index}"] for index in range(len(model.blocks))),
      tuple(widths[f"dense{index}"] for index in range(len(model.head.layers) - 1)),
      rows,
  )


def compact(model: nnx.Module, input_shape: Sequence[int]) -> Compacted:
  """Removes every unit of ``model`` that cannot change its inference-mode logits.

  Units with no live outgoing weight are dropped; units with no live incoming weight are
  constants, folded into the next layer's bias (or the BatchNorm after it) and dropped; this
  repeats to a fixed point (see the module docstring for what stays and why). Pruned weights
  are the exact zeros of the kernels. ``model`` is left untouched.

  Args:
    model: a model of ``experiments.models`` (any mode; BatchNorm is taken in inference mode,
      with its running statistics).
    input_shape: ``(height, width, channels)`` of one input image (the spatial size decides
      which kernel taps see zero padding).

  Returns:
    The compact model (eval mode; its kernels keep their remaining zeros), its widths and the
    number of rounds that removed something.

  Raises:
    TypeError: ``model`` is not one of the experiments' model classes.
  """
  input_shape = tuple(int(size) for size in input_shape)
  graph = _build_graph(model, input_shape)
  state = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  dtypes = {path: np.asarray(leaf).dtype for path, leaf in state.items()}
  working = _to_working(graph, state, input_shape[2])
  rounds = _compact_state(graph, working, input_shape[2])
  working, rows = _from_working(graph, working)
  widths = _family_widths(model, _widths_of(graph, working, input_shape[2]), rows)
  final = {path: leaf.astype(dtypes[path]) for path, leaf in working.items()}
  num_classes = working[(*graph.ops[-1].path, "kernel")].shape[-1]
  return Compacted(
      compaction.rebuild(model, widths, input_shape, num_classes, final), widths, rounds
  )


parameter_count = compaction.parameter_count  # one count for the oracle and the adapter
