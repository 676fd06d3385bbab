"""Which output units of a model's kernels go together, read from its traced program.

``prune(structure="unit")`` removes whole output units. In a residual network the output
channel ``c`` of every conv that adds into the same stream is one unit of the stream, and
``flipout.compact`` can remove it only when all of them are gone; a unit that is an output
of the model (a logit) cannot be removed at all. :func:`unit_groups` reads this from the
same graph of coupled positions that compaction uses (``compact.param_units``): each output
unit of a prunable kernel gets the id of its position's connected component, and units
whose component holds a pinned position (an argument or output of the function, an op that
mixes features such as LayerNorm's mean) get ``-1``. It also records the program's FLOPs
as a function of which groups are live (:class:`UnitFlops`), for ``units(cost="flops")``.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from flipout_jax._src import compact as compact_lib
from flipout_jax._src import layout as layout_lib
from flipout_jax._src import prunable as prunable_lib


class UnitFlops(NamedTuple):
  """A model's FLOPs per example as a function of which unit groups are live.

  Each linear op (``dot_general``, convolution) is a term ``coefficient * sum_b prod_f
  live(factors[f][b])``: a factor is an axis of the product, ``(blocks, size, k)`` group
  ids, and ``live`` counts its positions whose ``k`` groups are all live (``num_groups``
  stands for one always there: the batch, a spatial axis, a unit never pruned; a feature
  flattened from a conv's ``(h, w, c)`` needs its channel's group). A grouped
  convolution's feature factors have one row per feature group; every other factor one
  row. Loop bodies count as constants.
  """

  terms: tuple[tuple[float, tuple[np.ndarray, ...]], ...]
  num_groups: int

  def count(self, live, xp=np):
    """FLOPs per example with the groups ``live`` (bool, ``(num_groups,)``) kept.

    ``xp``: ``numpy`` (exact enough in float64) or ``jax.numpy`` (float32, traceable)."""
    dtype = xp.float64 if xp is np else xp.float32
    there = xp.concatenate([xp.asarray(live, dtype), xp.ones(1, dtype)])
    total = xp.zeros((), dtype)
    for coefficient, factors in self.terms:
      product = xp.ones(1, dtype)
      for factor in factors:
        product = product * there[factor].prod(axis=-1).sum(axis=-1)
      total = total + coefficient * product.sum()
    return total

  @property
  def dense(self) -> float:
    """FLOPs per example with every group live."""
    return float(self.count(np.ones(self.num_groups, bool)))


@dataclasses.dataclass(frozen=True)
class UnitGroups:
  """What :func:`unit_groups` read from a model.

  Attributes:
    ids: a tree shaped like params with the group id of each output unit (``-1``: never
      pruned) at each prunable kernel and at each follower (a 1-D leaf such as a bias or a
      BatchNorm scale whose every entry belongs to a unit of a prunable kernel), ``None``
      elsewhere.
    flops: the model's :class:`UnitFlops`.
    where: a tree of bools, True at the kernels and the followers: ``prune(...,
      where=groups.where)`` masks a unit's bias and norm parameters with its weights, so
      a pruned unit outputs exact zeros (a live bias would keep a constant channel, which
      compaction cannot remove where a padded convolution reads it).
    kernels: a tree of bools, True at the prunable kernels only.
  """

  ids: Any
  flops: UnitFlops
  where: Any = None
  kernels: Any = None


def _flop_terms(linear, labels: np.ndarray, pinned: int, examples: int) -> UnitFlops:
  """The linear ops' terms over group ids, constant factors folded into the coefficients."""
  num_groups = len(labels)

  def group_of(units: np.ndarray) -> np.ndarray:
    at = np.minimum(np.searchsorted(labels, units), max(num_groups - 1, 0))
    found = (units != pinned) & (labels[at] == units) if num_groups else np.zeros_like(units, bool)
    return np.where(found, at, num_groups)

  terms = []
  for term in linear:
    coefficient = term.coefficient / max(examples, 1)
    factors = [group_of(f) for f in term.factors]
    blocks = max((f.shape[0] for f in factors), default=1)
    kept = []
    for factor in factors:
      if (factor == num_groups).all():
        coefficient *= factor.shape[1]
      else:
        kept.append(factor)
    if all(f.shape[0] == 1 for f in kept):  # every per-group factor folded: G equal blocks
      coefficient *= blocks
    terms.append((float(coefficient), tuple(kept)))
  return UnitFlops(tuple(terms), num_groups)


def _followers(leaves, units, labels: np.ndarray, kernels: set[int]) -> dict[int, np.ndarray]:
  """The 1-D float leaves (not kernels) whose every entry is a unit in ``labels`` (a bias, a
  norm's scale or offset of prunable units): leaf number -> the units of its entries."""
  found = {}
  for number, leaf in enumerate(leaves):
    if number not in kernels and np.ndim(leaf) == 1 and np.issubdtype(leaf.dtype, np.floating):
      entries = units[number][0]
      if entries.size and np.isin(entries, labels).all():
        found[number] = entries
  return found


def unit_groups(
    apply_fn: Callable,
    params: Any,
    *example_args: Any,
    where: Any = None,
    kernel_layout: layout_lib.KernelLayout = "in_out",
    batch_axis: int | None = 0,
) -> Any:
  """Which output units of the prunable kernels go together, for ``structure=units(groups)``.

  ``apply_fn(params, *args)`` is any pure JAX function of the model, as for
  :func:`compact`. Units of different kernels tied by the program (added into one
  residual stream, read by one normalisation or the same parameter read twice) get the
  same id and are pruned together; units ``compact`` must keep whatever their weights (the
  model's outputs, units feeding an op that mixes features) get ``-1`` and are never
  pruned as units.

  Example::

    groups = flipout.unit_groups(lambda p, x: model.apply({"params": p}, x), params, x)
    structure = flipout.units(groups)  # or units(groups, cost="flops"): a FLOP target
    tx = optax.chain(optax.sgd(0.1), flipout.prune(0.9, total_steps=n, structure=structure))

  Args:
    apply_fn: ``apply_fn(params, *args)``, a pure function.
    params: a pytree of arrays (its values do not matter, only shapes and the program).
    *example_args: arguments to trace with (shapes and dtypes matter).
    where: prunable leaves, as in :func:`prune`.
    kernel_layout: which axis of a kernel holds its output units, as in :func:`units`.
    batch_axis: the axis of the arguments that is the batch, as in :func:`compact`.

  Returns:
    A :class:`UnitGroups`: ``ids``, a tree shaped like ``params`` with an int32 array of
    one id per output unit at each prunable leaf (ids ``0 .. G-1``, or ``-1``) and ``None``
    elsewhere; ``flops``, the traced program's FLOPs per example as a function of which
    groups are live (the batch is ``example_args``' ``batch_axis``).

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
  units, pinned, linear = compact_lib.param_units(
      apply_fn, params, *example_args, batch_axis=batch_axis
  )
  found: dict[int, np.ndarray] = {}
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
  kernels = set(found)
  found.update(_followers(leaves, units, labels, kernels))
  ids = [
      np.where(c == pinned, -1, np.searchsorted(labels, c)).astype(np.int32)
      if c is not None
      else None
      for c in (found.get(number) for number in range(len(leaves)))
  ]
  structure = jax.tree.structure(params)
  shapes = [tuple(getattr(leaf, "shape", np.shape(leaf))) for leaf in jax.tree.leaves(example_args)]
  examples = shapes[0][batch_axis] if batch_axis is not None and shapes and shapes[0] else 1
  return UnitGroups(
      jax.tree.unflatten(structure, ids),
      _flop_terms(linear, labels.astype(np.int64), pinned, examples),
      jax.tree.unflatten(structure, [number in found for number in range(len(leaves))]),
      jax.tree.unflatten(structure, [number in kernels for number in range(len(leaves))]),
  )
