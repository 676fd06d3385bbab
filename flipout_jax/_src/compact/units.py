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
from flipout_jax._src.compact import flop_count as flops_lib
from flipout_jax._src.compact import rules
from flipout_jax._src.compact.program import Atom, Eqn, Literal, Program, trace


class LinearTerm(NamedTuple):
  """The FLOPs of one linear op as a function of which units are live.

  ``flops = coefficient * sum over blocks b of prod over factors f of
  (number of live positions among factors[f][b])``: each factor is an axis of the product
  (an operand's or the output's), ``(blocks, size, k)``: the units each of its positions
  needs (a position lives while all its ``k`` do); a grouped convolution's feature axes
  have one block per group, every other axis one block.
  """

  name: str
  coefficient: float
  factors: tuple[npt.NDArray[np.intp], ...]


class ParamUnits(NamedTuple):
  """Per param leaf, per axis, the unit (connected component) of each position; positions
  that compaction must keep whatever their weights share the unit ``pinned``."""

  units: list[list[npt.NDArray[np.intp]]]
  pinned: int
  linear: list[LinearTerm]  # the program's FLOPs as a function of its live units


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
  return ParamUnits(units, int(component[-1]), linear_terms(program, positions, component, facts))


class _Units:
  """Each position's units: its own and, for a feature flattened by a reshape (a conv's
  ``(h, w, c)`` read by a Dense layer), those of the positions it was made of, since it
  lives only while all of them do (as compaction cuts it)."""

  def __init__(
      self,
      program: Program,
      positions: analysis._Positions,  # pylint: disable=protected-access
      component: npt.NDArray[np.intp],
      merges: list[rules.Merge],
  ):
    self._avals, self._positions, self._component = program.avals, positions, component
    self.pinned = int(component[-1])
    self._parts: dict[int, set[int]] = {}
    for fact in merges:
      flat = component[positions.of((fact.target, fact.axis))]
      parts = [component[positions.of((fact.source, d))] for d in fact.axes]
      index = np.unravel_index(np.arange(flat.size), [p.size for p in parts])
      stacked = np.stack([p[i] for p, i in zip(parts, index)], axis=-1)
      for unit, made_of in zip(flat.tolist(), stacked.tolist()):
        self._parts.setdefault(unit, set()).update(made_of)
    self._memo: dict[int, frozenset[int]] = {}

  def _needs(self, unit: int) -> frozenset[int]:
    if unit not in self._memo:
      self._memo[unit] = frozenset()  # a reshape cycle ends here
      found = {unit}
      for part in self._parts.get(unit, ()):
        found |= self._needs(part)
      self._memo[unit] = frozenset(found - {self.pinned})
    return self._memo[unit]

  def shape(self, atom: Atom) -> tuple[int, ...]:
    return tuple(atom.value.shape if isinstance(atom, Literal) else self._avals[atom].shape)

  def rows(self, atom: Atom, axis: int, blocks: int = 1) -> npt.NDArray[np.intp]:
    """``(blocks, size / blocks, k)``: the units each position of the axis needs, padded
    with the pinned unit (always there)."""
    if isinstance(atom, Literal):
      return np.full((blocks, np.shape(atom.value)[axis] // blocks, 1), self.pinned)
    needs = [self._needs(int(u)) for u in self._component[self._positions.of((atom, axis))]]
    width = max(1, max(map(len, needs), default=1))
    padded = [sorted(n) + [self.pinned] * (width - len(n)) for n in needs]
    return np.asarray(padded, np.intp).reshape(blocks, -1, width)


def _linear_term(eqn: Eqn, units: _Units, position: int) -> LinearTerm:
  """The :class:`LinearTerm` of a ``dot_general`` or convolution."""
  name = f"{eqn.primitive.name}@{position}"
  lhs, rhs = eqn.inputs[:2]
  if eqn.primitive.name == "dot_general":
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    free = lambda atom, taken: [d for d in range(len(units.shape(atom))) if d not in taken]
    axes = [(lhs, d) for d in (*lhs_b, *lhs_c, *free(lhs, (*lhs_c, *lhs_b)))]
    axes += [(rhs, d) for d in free(rhs, (*rhs_c, *rhs_b))]
    return LinearTerm(name, 2.0, tuple(units.rows(*axis) for axis in axes))
  lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
  out = eqn.outputs[0]
  window = [units.rows(rhs, d) for d in rhs_spec[2:]]
  if int(eqn.params["batch_group_count"]) > 1:  # rare (a grouped conv's gradient): dense
    dense = [units.rows(out, d) * 0 + units.pinned for d in range(len(units.shape(out)))]
    return LinearTerm(name, 2.0 * units.shape(rhs)[rhs_spec[1]], tuple(dense + window))
  groups = int(eqn.params["feature_group_count"])
  factors = [units.rows(lhs, lhs_spec[0])] + [units.rows(out, d) for d in out_spec[2:]] + window
  features = [units.rows(lhs, lhs_spec[1], groups), units.rows(rhs, rhs_spec[0], groups)]
  return LinearTerm(name, 2.0, tuple(factors + features))


def linear_terms(
    program: Program,
    positions: analysis._Positions,  # pylint: disable=protected-access
    component: npt.NDArray[np.intp],
    facts: list[rules.Fact],
) -> list[LinearTerm]:
  """The :class:`LinearTerm` of each linear op of the flat program, in execution order;
  the linear ops of a loop's body count as a constant (their dense FLOPs)."""
  merges = [fact for fact in facts if isinstance(fact, rules.Merge)]
  units = _Units(program, positions, component, merges)
  terms = []
  for position, eqn in enumerate(program.eqns):
    if eqn.primitive.name in rules.LINEAR:
      terms.append(_linear_term(eqn, units, position))
    elif fixed := flops_lib.nested_flops(eqn.primitive.name, eqn.params):
      terms.append(LinearTerm(f"{eqn.primitive.name}@{position}", float(fixed), ()))
  return terms
