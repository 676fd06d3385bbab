"""Post-training int8 quantization (PTQ) of the experiments' NNX models with qwix.

Weights: per-output-channel symmetric int8. Activations (the inputs of every
convolution and dense layer): static-range symmetric int8, calibrated on a
few batches. Both through qwix 0.1.8's documented static-range (SRQ) flow for
NNX:

1. ``qwix.quantize_model(model, qwix.QtProvider(rules), batch)`` wraps the
   model so that each call records, per quantized op, the running mean of the
   activation range in a ``qwix.QuantStat`` variable;
2. the model is run on the calibration batches (eagerly: qwix updates the
   statistics inside a ``custom_vjp``, which cannot mutate NNX variables under
   ``nnx.jit``);
3. ``qwix.quantize_model(calibrated, qwix.PtqProvider(rules), batch)`` turns
   the statistics into fixed activation scales and the float kernels into int8
   values plus float32 scales.

qwix's numerics (``qwix/_src/core``): symmetric int8 uses
``scale = absmax / 127.5`` and rounds to nearest in ``[-128, 127]``, so zero
maps to zero, and a live weight with ``|w| < scale / 2`` (under 1/255 of its
channel's largest magnitude) also rounds to zero. The activation range of an
op is the per-example absolute maximum averaged over the calibration examples
(``act_batch_axes=(0,)``), one scale per op; larger inputs are clipped.
BatchNorm, pooling and elementwise ops stay float32.
"""

from collections.abc import Callable, Iterable, Mapping
import os
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import qwix

import flipout_jax as flipout

# Every conv/dense op of the model: weights and input activations int8, the
# activations with a static (calibrated) symmetric range.
_RULES = (
    qwix.QuantizationRule(
        module_path=".*",
        weight_qtype=jnp.int8,
        weight_calibration_method="absmax",
        act_qtype=jnp.int8,
        act_calibration_method="absmax",
        act_static_scale=True,
    ),
)


class Int8Sparsity(NamedTuple):
  """Zeros of the float kernels against the int8 kernels that replace them.

  Attributes:
    float_sparsity: fraction of exact zeros in the quantized layers' float kernels.
    int8_sparsity: fraction of zeros in their int8 values.
    zeros_lost: float zeros that became nonzero int8 values (symmetric
      quantization maps 0 to 0, so this is 0 unless something is wrong).
    zeros_gained: live float weights that rounded to int8 zero
      (``|w| < scale / 2``); 0 means the zero positions are identical.
    size: number of weights compared.
  """

  float_sparsity: float
  int8_sparsity: float
  zeros_lost: int
  zeros_gained: int
  size: int

  @property
  def same_zeros(self) -> bool:
    """Whether float and int8 kernels have exactly the same zero positions."""
    return self.zeros_lost == 0 and self.zeros_gained == 0


class FileSizes(NamedTuple):
  """Bytes on disk of one set of params written three ways."""

  dense_float32: int
  sparse_float32: int
  sparse_int8: int


def quantize_model(model: nnx.Module, calibration_batches: Iterable) -> nnx.Module:
  """Post-training int8 quantization of an NNX model with qwix.

  Kernels of every convolution and dense layer become per-output-channel
  symmetric int8 (``q = round(w / s)``, ``s_c = max|w[..., c]| / 127.5``);
  the input activation of each such layer is quantized to int8 with a static
  scale ``s = mean over calibration examples of max|x| / 127.5``. The
  calibration runs the model in eval mode (BatchNorm uses its running
  averages); ``model`` itself is not changed.

  Args:
    model: a float NNX model, e.g. from ``experiments.models.create_model``.
    calibration_batches: one or more input batches (arrays the model accepts,
      e.g. normalized NHWC float32 training images).

  Returns:
    A new NNX module in eval mode computing ``logits = model(images)`` with
    int8 weights and activations; call it directly or through ``nnx.jit``.

  Raises:
    TypeError: ``model`` is not an NNX module (Linen models are not handled).
    ValueError: no calibration batch; or a layer qwix cannot quantize (the
      message names the layer), including a kernel that qwix did not see
      used by a convolution, dot or einsum and so left in float.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
  batches = [jnp.asarray(batch) for batch in calibration_batches]
  if not batches:
    raise ValueError("calibration_batches: need at least one batch, got none")
  _check_batch_shapes(batches)
  float_model = nnx.clone(model)
  float_model.eval()
  try:
    # An abstract run separates a batch the model cannot take from a layer
    # qwix cannot quantize.
    nnx.eval_shape(lambda module, inputs: module(inputs), float_model, batches[0])
  except Exception as error:  # whatever the model raises on such input
    raise ValueError(
        f"calibration_batches: the model cannot run on a batch of shape "
        f"{batches[0].shape}: {type(error).__name__}: {_first_line(error)}"
    ) from error
  try:
    calibrating = qwix.quantize_model(float_model, qwix.QtProvider(_RULES), batches[0])
    for batch in batches:
      calibrating(batch)
    quantized = qwix.quantize_model(calibrating, qwix.PtqProvider(_RULES), batches[0])
  except Exception as error:  # qwix fails in many ways on layers it cannot handle.
    raise ValueError(
        f"qwix cannot quantize layer {_failing_layer(error)}: "
        f"{type(error).__name__}: {_first_line(error)}"
    ) from error
  _check_kernels_quantized(quantized)
  return quantized


def evaluate(apply_fn: Callable | nnx.Module, images, labels, batch_size: int) -> float:
  """Top-1 accuracy of ``argmax(apply_fn(images_batch))`` against ``labels``.

  Args:
    apply_fn: images batch -> logits; an ``nnx.Module`` (float or quantized)
      is called through ``nnx.jit``, any other callable as given.
    images: (N, ...) inputs as ``apply_fn`` expects them (e.g. normalized).
    labels: (N,) integer class labels.
    batch_size: images per call; the last batch may be smaller.

  Returns:
    The fraction of correctly classified images, in [0, 1].

  Raises:
    ValueError: ``batch_size`` not a positive int, no images, or images and
      labels of different lengths.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  labels = np.asarray(labels)
  if len(images) != len(labels) or len(labels) == 0:
    raise ValueError(
        f"images and labels must be non-empty and of equal length, "
        f"got {len(images)} and {len(labels)}"
    )
  if isinstance(apply_fn, nnx.Module):
    apply_fn = _jitted_module_call(apply_fn)
  correct = 0
  for start in range(0, len(labels), batch_size):
    logits = apply_fn(jnp.asarray(images[start : start + batch_size]))
    correct += int(
        np.sum(np.argmax(np.asarray(logits), axis=-1) == labels[start : start + batch_size])
    )
  return correct / len(labels)


def quantized_kernels(quantized_model: nnx.Module) -> dict[str, np.ndarray]:
  """The int8 values of every kernel qwix quantized, by '/'-joined param path.

  Paths are those of the float model's params, e.g. ``"features/0/kernel"``.
  """
  kernels = {}
  for path, value in _flat_state(quantized_model).items():
    # qwix stores a quantized kernel as WithAux(array=QArray(qvalue, scale)).
    if path[-2:] == ("array", "qvalue"):
      kernels["/".join(map(str, path[:-2]))] = np.asarray(value)
  return kernels


def int8_weight_sparsity(float_model: nnx.Module, quantized_model: nnx.Module) -> Int8Sparsity:
  """Compares the zeros of the float kernels with those of their int8 values.

  Symmetric quantization maps 0 to 0, so every pruned weight stays exactly
  zero (``zeros_lost == 0``); the int8 sparsity equals the float sparsity
  unless some live weight is below half a quantization step
  (``zeros_gained > 0``).

  Args:
    float_model: the model given to :func:`quantize_model`.
    quantized_model: what :func:`quantize_model` returned for it.

  Returns:
    An :class:`Int8Sparsity` over all quantized kernels.
  """
  float_params = {
      "/".join(map(str, path)): value for path, value in _flat_state(float_model, nnx.Param).items()
  }
  size = float_zeros = int8_zeros = zeros_lost = zeros_gained = 0
  for name, int8_values in quantized_kernels(quantized_model).items():
    float_zero = np.asarray(float_params[name]).reshape(int8_values.shape) == 0
    int8_zero = int8_values == 0
    size += int8_values.size
    float_zeros += int(float_zero.sum())
    int8_zeros += int(int8_zero.sum())
    zeros_lost += int((float_zero & ~int8_zero).sum())
    zeros_gained += int((~float_zero & int8_zero).sum())
  return Int8Sparsity(
      float_sparsity=float_zeros / max(size, 1),
      int8_sparsity=int8_zeros / max(size, 1),
      zeros_lost=zeros_lost,
      zeros_gained=zeros_gained,
      size=size,
  )


def model_file_sizes(params: Mapping, directory) -> FileSizes:
  """Writes ``params`` dense float32, sparse float32 and sparse int8; returns the bytes.

  The files ``dense_float32.npz`` (every weight, uncompressed),
  ``sparse_float32.npz`` and ``sparse_int8.npz`` (``flipout_jax`` exports:
  live weights plus a bitmask of their positions) are written to
  ``directory``, which must exist.

  Args:
    params: a nested dict of float arrays, e.g.
      ``nnx.state(model, nnx.Param).to_pure_dict()``.
    directory: where to write the three files.

  Returns:
    The sizes of the three files.
  """
  directory = os.fspath(directory)
  dense_path = os.path.join(directory, "dense_float32.npz")
  leaves = jax.tree_util.tree_leaves(params)
  np.savez(dense_path, *[np.asarray(leaf, np.float32) for leaf in leaves])
  return FileSizes(
      dense_float32=os.path.getsize(dense_path),
      sparse_float32=flipout.export(params, os.path.join(directory, "sparse_float32.npz")),
      sparse_int8=flipout.export(params, os.path.join(directory, "sparse_int8.npz"), int8=True),
  )


def _check_batch_shapes(batches: list[jax.Array]) -> None:
  shapes = {batch.shape[1:] for batch in batches}
  if any(batch.ndim == 0 or batch.shape[0] == 0 for batch in batches) or len(shapes) > 1:
    raise ValueError(
        "calibration_batches: need non-empty batches of one example shape, "
        f"got shapes {sorted({batch.shape for batch in batches})}"
    )


def _jitted_module_call(module: nnx.Module) -> Callable:
  call = nnx.jit(lambda model, inputs: model(inputs))
  return lambda inputs: call(module, inputs)


def _flat_state(model: nnx.Module, *filters) -> dict[tuple, jax.Array]:
  state = nnx.to_pure_dict(nnx.state(model, *filters))
  return {
      tuple(_key_name(key) for key in path): value
      for path, value in jax.tree_util.tree_flatten_with_path(state)[0]
  }


def _key_name(key) -> str | int:
  # A pure dict's keys: DictKey, or SequenceKey for list-valued state.
  return key.key if isinstance(key, jax.tree_util.DictKey) else key.idx


def _failing_layer(error: BaseException) -> str:
  """The innermost qwix-wrapped module on the error's traceback, as 'path' (Class)."""
  module = None
  traceback = error.__traceback__
  while traceback is not None:
    candidate = traceback.tb_frame.f_locals.get("self")
    if isinstance(candidate, nnx.Module) and hasattr(candidate, "qwix_path"):
      module = candidate
    traceback = traceback.tb_next
  if module is None:
    return "<unknown>"
  path = "/".join(map(str, module.qwix_path)) or "<model>"
  return f"{path!r} ({type(module).__name__})"


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [""])[0]


def _check_kernels_quantized(quantized: nnx.Module) -> None:
  """Refuses a result with float kernels left (ops qwix did not intercept)."""
  left_float = []
  for path, module in nnx.iter_modules(quantized):
    for name, value in vars(module).items():
      if isinstance(value, nnx.Param) and value.ndim >= 2:
        left_float.append("/".join(map(str, (*path, name))))
  if left_float:
    raise ValueError(
        "qwix cannot quantize layer(s) whose kernels it did not see used by a "
        "convolution, dot or einsum, left float: " + ", ".join(left_float)
    )
