"""FLOPs of a JAX function's linear ops, counted from its traced program."""

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jex_core
import numpy as np


def _shape(atom: Any) -> tuple[int, ...]:
  return tuple(atom.aval.shape)


def linear_op_flops(eqn: jex_core.JaxprEqn) -> int:
  """``2 x`` the multiply-adds of one ``dot_general`` or ``conv_general_dilated``, else 0.

  A dot's count is ``2 * prod(output shape) * prod(contracted sizes)``; a convolution's is
  ``2 * prod(output shape) * (input features per group) * prod(window)``, so a grouped or
  depthwise convolution counts only the inputs each output reads.
  """
  name = eqn.primitive.name
  if name == "dot_general":
    lhs = _shape(eqn.invars[0])
    (contracting, _), _ = eqn.params["dimension_numbers"]
    out = _shape(eqn.outvars[0])
    return (
        2
        * int(np.prod(out, dtype=np.int64))
        * int(np.prod([lhs[d] for d in contracting], dtype=np.int64))
    )
  if name == "conv_general_dilated":
    rhs = _shape(eqn.invars[1])
    _, rhs_spec, _ = eqn.params["dimension_numbers"]
    out = _shape(eqn.outvars[0])
    per_output = rhs[rhs_spec[1]] * int(np.prod([rhs[d] for d in rhs_spec[2:]], dtype=np.int64))
    # batch_group_count splits the batch the way feature_group_count splits features: the
    # kernel's input axis already holds one group's features.
    return 2 * int(np.prod(out, dtype=np.int64)) * per_output
  return 0


def _bodies(params: dict[str, Any]) -> list[jex_core.Jaxpr]:
  found = []
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex_core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jex_core.Jaxpr):
        found.append(item)
  return found


def nested_flops(primitive: str, params: dict[str, Any]) -> int:
  """FLOPs of the sub-programs of one equation: a ``scan``'s body ``length`` times, a
  ``cond``'s costliest branch, any other call's bodies once."""
  counts = [jaxpr_flops(body) for body in _bodies(params)]
  if primitive == "cond":
    return max(counts, default=0)
  return int(params.get("length", 1)) * sum(counts) if primitive == "scan" else sum(counts)


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> int:
  """FLOPs of every linear op of ``jaxpr``, nested calls and loop bodies included."""
  return sum(
      linear_op_flops(eqn) + nested_flops(eqn.primitive.name, eqn.params) for eqn in jaxpr.eqns
  )


def flops(fn: Callable[..., Any], *args: Any) -> int:
  """FLOPs (twice the multiply-adds) of the matrix products and convolutions of ``fn(*args)``.

  Read from ``fn``'s traced program (:func:`jax.make_jaxpr`), so it counts what the function
  computes at these shapes, for any JAX function: a dense model, a compacted one
  (``flipout.compact(...).apply``), a ``scan`` over stacked layers (its body ``length``
  times). A ``while`` body counts once (its trip count is not static), a ``cond`` its
  costliest branch. Elementwise ops, reductions and normalisations are not counted.

  Example::

    dense = flipout.flops(apply_fn, params, x)
    small = flipout.flops(compacted.apply, compacted.params, x)
    print(f"{1 - small / dense:.0%} of the FLOPs removed")

  Args:
    fn: any function JAX can trace.
    *args: its arguments (only shapes and dtypes matter).

  Returns:
    The count for one call at these shapes (divide by the batch for FLOPs per example).

  Raises:
    TypeError: ``fn`` is not callable.
  """
  if not callable(fn):
    raise TypeError(f"fn must be callable, got {type(fn).__name__}")
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
