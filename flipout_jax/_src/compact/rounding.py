"""Compacted widths rounded up to a multiple of ``round_to``, by keeping removable units.

Matrix units work in tiles (8 or 16 elements on a GPU's tensor cores, 128 on a TPU), so a
layer 107 wide costs about as much as one 112 wide, and often more (padding, unaligned loads).
``Widths.keep_back`` keeps removed units until every axis that loses positions keeps a
multiple of ``round_to`` of them; an axis that would keep none keeps none (0 is a multiple),
and one whose units cannot add up to a multiple before it is full stays whole.

Keeping a removable unit is sound: it carries nothing an output reads, or a constant that the
program then still computes instead of folding it (the analysis computes the folds for the
units finally removed). Which units, on each axis: first those that keep no other unit (a
flattened feature whose channels stay; one of a removed channel would keep that channel, a
whole channel of the convolution for one feature of the dense layer), then the others; within
each, the lowest positions first; each unit whole (a unit may hold several positions of an
axis: a feature group of a grouped convolution). A unit kept back also widens the other axes it is on (a
residual stream's values, a parameter read twice) and may keep its channels; so the analysis
closes the kept set and rounds again until nothing changes. Each round keeps at least one more
unit, so it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from flipout_jax._src.compact import rules as rules

Ids = npt.NDArray[np.intp]
Where = rules.Where


class Widths:
  """The axes of a program's values, to round their kept counts.

  Args:
    component: each position's unit (the last entry: the pinned node's, not a position).
    base: per (value, axis), the number of its first position (in position order).
    shape: the size of an axis.
    merges: the program's flattening reshapes.
  """

  def __init__(
      self,
      component: Ids,
      base: Mapping[Where, int],
      shape: Callable[[Where], int],
      merges: Sequence[rules.Merge],
  ):
    self._component = component
    self._starts = np.array(list(base.values()), np.intp)
    self._sizes = np.array([shape(where) for where in base], np.intp)
    units = lambda where: component[base[where] + np.arange(shape(where))]
    # Per reshape: the units of the flattened axis, and of each axis flattened into it.
    self._merges = [
        (units((m.target, m.axis)), [units((m.source, d)) for d in m.axes]) for m in merges
    ]

  def _keeps_others(self, bad: rules.Mask) -> rules.Mask:
    """Per unit, whether keeping it keeps another unit: a flattened feature of a removed
    channel."""
    found = np.zeros(bad.size, bool)
    for flat, sources in self._merges:
      sizes = [ids.size for ids in sources]
      stays = rules.full_mask(sizes, [bad[ids] for ids in sources]).reshape(-1)
      found[flat[~stays]] = True
    return found

  def keep_back(self, bad: rules.Mask, round_to: int) -> bool:
    """Marks ``bad`` (per unit, whether it is kept) removed units of every axis whose kept
    count is neither 0, nor its size, nor a multiple of ``round_to``, until it is one of those.

    Returns:
      Whether it kept any unit (then the kept set needs closing and rounding again).
    """
    if round_to == 1 or not self._starts.size:
      return False
    starts, sizes, component = self._starts, self._sizes, self._component
    totals = np.concatenate([[0], np.cumsum(bad[component[:-1]])])
    counts = totals[starts + sizes] - totals[starts]
    changed = False
    # Most axes are whole or a multiple already: only the others are looked at one by one.
    for k in np.flatnonzero((counts != 0) & (counts != sizes) & (counts % round_to != 0)):
      units = component[starts[k] : starts[k] + sizes[k]]
      row = bad[units]  # again: units kept back for an earlier axis may be on this one
      count = int(row.sum())
      if count in (0, units.size) or count % round_to == 0:
        continue
      labels, first, per_unit = np.unique(units[~row], return_index=True, return_counts=True)
      order = np.lexsort((first, self._keeps_others(bad)[labels]))
      reached = np.flatnonzero((count + np.cumsum(per_unit[order])) % round_to == 0)
      take = reached[0] + 1 if reached.size else order.size
      bad[labels[order[:take]]] = True
      changed = True
    return changed
