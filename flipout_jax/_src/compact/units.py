"""The units of a function's params as compaction sees them: the interface through which
pruning by units (``unit_groups``) reads the program, without reaching into the analysis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import numpy.typing as npt

from flipout_jax._src.compact import analysis
from flipout_jax._src.compact import facts as facts_lib
from flipout_jax._src.compact.program import trace


class ParamUnits(NamedTuple):
  """Per param leaf, per axis, the unit (connected component) of each position; positions
  that compaction must keep whatever their weights share the unit ``pinned``."""

  units: list[list[npt.NDArray[np.intp]]]
  pinned: int


def param_units(
    apply_fn: Callable[..., Any], params: Any, *args: Any, batch_axis: int | None = 0
) -> ParamUnits:
  """The units of every axis of every leaf of ``params`` in ``apply_fn(params, *args)``'s
  traced program (the graph of coupled positions of ``analysis``)."""
  leaves = jax.tree.leaves(params)
  program = trace(apply_fn, params, *args)
  facts, _ = facts_lib.facts_of(program, len(leaves), batch_axis)
  positions = analysis._Positions(program.avals)  # pylint: disable=protected-access
  component, _ = analysis._groups(positions, facts)  # pylint: disable=protected-access
  units = [
      [component[positions.of((index, axis))] for axis in range(len(program.avals[index].shape))]
      for index in program.inputs[: len(leaves)]
  ]
  return ParamUnits(units, int(component[-1]))
