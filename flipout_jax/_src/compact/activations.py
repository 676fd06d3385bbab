"""The norms of the inputs each kernel multiplies, read from the model's traced program (the
calibration statistic of one-shot pruning such as Wanda)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax._src.compact.program import Eqn, Literal, Program, evaluate, trace

# Ops through which an operand is still the parameter itself, its axes unchanged.
_CASTS = frozenset(("convert_element_type", "copy", "copy_p"))


def _param_of(program: Program, producers: dict[int, Eqn], atom, params: dict[int, int]):
  """The params leaf number ``atom`` is (behind casts only), or None."""
  while not isinstance(atom, Literal) and atom not in params and atom in producers:
    eqn = producers[atom]
    if eqn.primitive.name not in _CASTS:
      return None
    atom = eqn.inputs[0]
  return None if isinstance(atom, Literal) else params.get(atom)


def _squares(eqn: Eqn, values: list, kernel_side: int, kernel_ndim: int):
  """Per input feature of the kernel, the sum of squares of the activations it multiplies,
  shaped to broadcast against the kernel; None for a use this does not read."""
  other = eqn.inputs[1 - kernel_side]
  activation = jnp.asarray(other.value if isinstance(other, Literal) else values[other])
  if eqn.primitive.name == "dot_general":
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    if lhs_b or rhs_b:  # a batched product (attention scores): no kernel
      return None
    act_c, kernel_c = (rhs_c, lhs_c) if kernel_side == 0 else (lhs_c, rhs_c)
    others = tuple(d for d in range(activation.ndim) if d not in act_c)
    summed = jnp.sum(jnp.square(activation.astype(jnp.float32)), axis=others)
    # summed keeps the contracted axes in ascending order; reorder them as the kernel's.
    pairs = sorted(zip(kernel_c, act_c))
    summed = jnp.transpose(summed, [sorted(act_c).index(a) for _, a in pairs])
    shape = [1] * kernel_ndim
    for axis, act_axis in pairs:
      shape[axis] = activation.shape[act_axis]
    return summed.reshape(shape)
  if kernel_side != 1 or eqn.params["feature_group_count"] != 1:
    return None  # a grouped convolution's kernel meets a slice of the channels
  if eqn.params["batch_group_count"] != 1:
    return None
  lhs_spec, rhs_spec, _ = eqn.params["dimension_numbers"]
  channel = lhs_spec[1]
  others = tuple(d for d in range(activation.ndim) if d != channel)
  summed = jnp.sum(jnp.square(activation.astype(jnp.float32)), axis=others)
  shape = [1] * kernel_ndim
  shape[rhs_spec[1]] = summed.shape[0]
  return summed.reshape(shape)


def activation_norms(apply_fn: Callable[..., Any], params: Any, *args: Any) -> Any:
  r"""The L2 norm of each input feature of each kernel over ``args``, for one-shot pruning.

  ``apply_fn(params, *args)`` is any JAX function of the model (as for :func:`compact`);
  ``args`` are calibration inputs. For every params leaf that a matrix product or an
  ungrouped convolution multiplies (directly or through a dtype cast), the norm
  :math:`\lVert X_j \rVert_2` of the activations each of its input features ``j`` meets,
  over every example and position of the calibration batch (all uses of a kernel read
  twice, such as a tied embedding, summed). Wanda scores a weight :math:`|W_{ij}|
  \lVert X_j \rVert_2`. Computed by one jit-compiled replay of the traced program.

  Example::

    norms = flipout.activation_norms(apply_fn, params, calibration_batch)
    masks = flipout.wanda(params, norms, 0.5)

  Args:
    apply_fn: ``apply_fn(params, *args)``, a pure function.
    params: a pytree of arrays.
    *args: the calibration inputs.

  Returns:
    A tree shaped like ``params``: at each such kernel a float32 array of norms that
    broadcasts against it (size 1 along its output axes and, for a convolution, its
    window), ``None`` elsewhere.

  Raises:
    TypeError: ``apply_fn`` is not callable.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  leaves, treedef = jax.tree.flatten(params)
  program = trace(apply_fn, params, *args)
  numbers = {index: number for number, index in enumerate(program.inputs[: len(leaves)])}
  producers = {out: eqn for eqn in program.eqns for out in eqn.outputs}
  uses = []  # (eqn, operand side of the kernel, leaf number)
  for eqn in program.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      for side in (0, 1):
        number = _param_of(program, producers, eqn.inputs[side], numbers)
        if number is not None and np.ndim(leaves[number]) >= 2:
          uses.append((eqn, side, number))

  def replay(params: Any, *args: Any) -> dict[int, jax.Array]:
    values = evaluate(program, jax.tree.leaves((params, args)))
    sums: dict[int, jax.Array] = {}
    for eqn, side, number in uses:
      squares = _squares(eqn, values, side, np.ndim(leaves[number]))
      if squares is not None:
        sums[number] = squares if number not in sums else sums[number] + squares
    return {number: jnp.sqrt(total) for number, total in sums.items()}

  norms = jax.jit(replay)(params, *args)
  return jax.tree.unflatten(treedef, [norms.get(number) for number in range(len(leaves))])
