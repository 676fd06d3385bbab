"""Which output units of a model's kernels go together, read from its traced program.

``prune(structure="unit")`` removes whole output units. In a residual network the output
channel ``c`` of every conv that adds into the same stream is one unit of the stream, and
``flipout.compact`` can remove it only when all of them are gone; a unit that is an output
of the model (a logit) cannot be removed at all. :func:`unit_groups` reads this from the
same graph of coupled positions that compaction uses (``compact.param_units``): each output
unit of a prunable kernel gets the id of its position's connected component, and units
whose component holds a pinned position (an argument or output of the function, an op that
mixes features such as LayerNorm's mean) get ``-1``.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flipout_jax._src import compact as compact_lib
from flipout_jax._src import layout as layout_lib
from flipout_jax._src import prunable as prunable_lib


def unit_groups(
    apply_fn: Callable,
    params: Any,
    *example_args: Any,
    where: Any = None,
    kernel_layout: layout_lib.KernelLayout = "in_out",
    batch_axis: int | None = 0,
) -> Any:
  """Group ids of the output units of each prunable kernel, for ``prune(structure=units(groups))``.

  ``apply_fn(params, *args)`` is any pure JAX function of the model, as for
  :func:`compact`. Units of different kernels tied by the program (added into one
  residual stream, read by one normalisation or the same parameter read twice) get the
  same id and are pruned together; units ``compact`` must keep whatever their weights (the
  model's outputs, units feeding an op that mixes features) get ``-1`` and are never
  pruned as units.

  Example::

    groups = flipout.unit_groups(lambda p, x: model.apply({"params": p}, x), params, x)
    structure = flipout.units(groups)
    tx = optax.chain(optax.sgd(0.1), flipout.prune(0.9, total_steps=n, structure=structure))

  Args:
    apply_fn: ``apply_fn(params, *args)``, a pure function.
    params: a pytree of arrays (its values do not matter, only shapes and the program).
    *example_args: arguments to trace with (shapes and dtypes matter).
    where: prunable leaves, as in :func:`prune`.
    kernel_layout: which axis of a kernel holds its output units, as in :func:`units`.
    batch_axis: the axis of the arguments that is the batch, as in :func:`compact`.

  Returns:
    A tree shaped like ``params``: an int32 array with one id per output unit at each
    prunable leaf (ids ``0 .. G-1``, or ``-1``), ``None`` elsewhere.

  Raises:
    TypeError: ``apply_fn`` is not callable.
    ValueError: ``where`` or ``kernel_layout`` is invalid, or a prunable leaf has fewer
      than 2 dimensions.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  prunable_lib.check_where(where)
  layout_lib.check_argument(kernel_layout)
  prunable = prunable_lib.prunable_tree(params, where)
  leaves = jax.tree.leaves(params)
  units, pinned = compact_lib.param_units(apply_fn, params, *example_args, batch_axis=batch_axis)
  found = {}
  for number, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(params)):
    if not jax.tree.leaves(prunable)[number]:
      continue
    if np.ndim(leaf) < 2:
      raise ValueError(
          f"unit_groups: the prunable leaf {jax.tree_util.keystr(path)} has shape "
          f"{np.shape(leaf)}; units need kernels of 2+ dimensions (leave it out of `where`)"
      )
    axis = layout_lib.unit_axes(kernel_layout, path, leaf)[0]
    found[number] = units[number][axis]
  labels = np.unique(np.concatenate([c[c != pinned] for c in found.values()] or [[]]))
  ids = [
      np.where(c == pinned, -1, np.searchsorted(labels, c)).astype(np.int32)
      if c is not None
      else None
      for c in (found.get(number) for number in range(len(leaves)))
  ]
  return jax.tree.unflatten(jax.tree.structure(params), ids)
