"""Which units of a traced program can go, and what their removal leaves to fold.

A unit is a group of positions that ``rules.links`` ties together across values (a
channel of a conv output, of the BatchNorm and ReLU after it and of the next conv's input, of
the kernels and biases that touch it). A group goes when none of its positions is pinned and
each of them either is read by nothing the outputs depend on, or does not depend on the
model's input; where such a constant is summed by a linear op, the op's output gets the
constant's contribution added (``Plan.folds``), computed from the concrete values, so that
position-dependent contributions (zero padding) are exact too. A reshape that flattens
features may lose single features (a gather after it) but loses a component (a channel) only
when all of the component's features go.

Positions are numbered per (value, axis); groups are the connected components of the links'
graph (``scipy.sparse.csgraph``), with every pin joined to one extra node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from flipout_jax._src.compact import facts as facts_lib
from flipout_jax._src.compact import linear as linear
from flipout_jax._src.compact import rounding as rounding
from flipout_jax._src.compact import rules as rules
from flipout_jax._src.compact import stacked as stacked
from flipout_jax._src.compact.program import Aval, Eqn, Literal, Program, Values, concrete
from flipout_jax._src.compact.program import value_id

Mask = rules.Mask
Where = rules.Where
Ids: TypeAlias = npt.NDArray[np.intp]  # position numbers, or component labels


class Plan(NamedTuple):
  """What compaction does to a program.

  Attributes:
    keep: per value id, per axis, the kept positions (None: all of them).
    folds: per equation index, a constant added to its output (already cut to the kept
      positions; size-1 axes broadcast, among them the batch axis).
    gathers: per reshape equation index, ``(axis, indices)`` of the flattened features kept
      of the reshape's output.
    merges: per reshape equation index, ``{output axis: merged input axes}``.
    absorbed: per fold a param takes instead (``folds`` still holds it), ``(param leaf
      number, sign)``: the leaf (a bias or a normalisation's mean) gets ``sign * constant``.
    batched: the (value, axis) pairs tied to the arguments' batch axis (sizes that may change
      from call to call).
    kept_by: per pin reason, how many positions it kept that were otherwise removable.
    bodies: per scan equation index, the plan of its body where units go inside it
      (``stacked``).
  """

  keep: dict[int, list[Mask | None]]
  folds: dict[int, np.ndarray]
  gathers: dict[int, tuple[int, npt.NDArray[np.int32]]]
  merges: dict[int, dict[int, tuple[int, ...]]]
  absorbed: dict[int, tuple[int, int]]
  batched: frozenset[Where]
  kept_by: dict[str, int]
  bodies: dict[int, Plan] = {}


def _normalize(axes: rules.Axes) -> rules.Axes:
  if axes is None or any(not row.any() for row in axes):
    return None
  return axes


def _merge_axes(old: rules.Axes, new: rules.Axes) -> rules.Axes:
  if old is None:
    return new
  if new is None:
    return old
  return [a | b for a, b in zip(old, new)]


def values_read(program: Program) -> set[int]:
  """The ids of the values whose concrete contents the analysis reads: the operands of the
  linear ops (which of their elements are nonzero, and the constants folded through them)
  and of scans (the stacked params their bodies are analysed with)."""
  return {
      x
      for eqn in program.eqns
      if eqn.primitive.name in rules.LINEAR or eqn.primitive.name == "scan"
      for x in eqn.inputs
      if not isinstance(x, Literal)
  }


def _flow(
    program: Program, values: Values, num_params: int
) -> tuple[list[rules.Axes], list[rules.Axes], dict[int, list[rules.Axes]]]:
  """Forward variation and backward reads of every value, and each linear op's own reads."""
  avals = program.avals
  varies: list[rules.Axes] = [None] * len(avals)
  for index in program.inputs[num_params:]:
    varies[index] = [np.ones(size, bool) for size in avals[index].shape]

  def operand_axes(eqn: Eqn, table: list[rules.Axes]) -> list[rules.Axes]:
    return [None if isinstance(x, Literal) else table[x] for x in eqn.inputs]

  for eqn in program.eqns:
    axes_in = operand_axes(eqn, varies)
    outs: list[rules.Axes]
    if all(axes is None for axes in axes_in):
      outs = [None for _ in eqn.outputs]  # a function of constants is a constant
    elif eqn.primitive.name in rules.LINEAR:
      outs = [linear.forward(eqn, avals, values, axes_in)]
    else:
      outs = rules.forward(eqn, avals, axes_in)
    for index, axes in zip(eqn.outputs, outs):
      varies[index] = _normalize(axes)
  reads: list[rules.Axes] = [None] * len(avals)
  for output in program.outputs:
    if not isinstance(output, Literal):
      reads[output] = [np.ones(size, bool) for size in avals[output].shape]
  linear_reads = {}
  for position in reversed(range(len(program.eqns))):
    eqn = program.eqns[position]
    axes_out = [reads[x] for x in eqn.outputs]
    if eqn.primitive.name in rules.LINEAR:
      ins = linear.backward(eqn, avals, values, operand_axes(eqn, varies), axes_out[0])
    else:
      ins = rules.backward(eqn, avals, axes_out)
    ins = [_normalize(axes) for axes in ins]
    if eqn.primitive.name in rules.LINEAR:
      linear_reads[position] = ins
    for x, axes in zip(eqn.inputs, ins):
      if not isinstance(x, Literal):
        reads[x] = _merge_axes(reads[x], axes)
  return varies, reads, linear_reads


class _Positions:
  """Numbers every position of every (value, axis)."""

  def __init__(self, avals: Sequence[Aval]):
    self.base: dict[Where, int] = {}
    total = 0
    for index, aval in enumerate(avals):
      for axis, size in enumerate(aval.shape):
        self.base[(index, axis)] = total
        total += size
    self.size = total
    self._avals = avals

  def shape(self, where: Where) -> int:
    """The size of the axis ``where``."""
    return self._avals[where[0]].shape[where[1]]

  def of(self, where: Where) -> Ids:
    """The numbers of the positions of ``where``."""
    return self.base[where] + np.arange(self.shape(where))


def _row(table: Sequence[rules.Axes], index: int, axis: int, size: int) -> Mask:
  axes = table[index]
  return np.zeros(size, bool) if axes is None else axes[axis]


def bare_plan(batched: frozenset[Where]) -> Plan:
  """A plan that removes nothing: a loop's body replayed at another batch size."""
  return Plan({}, {}, {}, {}, {}, batched, {})


def _groups(positions: _Positions, facts: Iterable[rules.Fact]) -> tuple[Ids, dict[str, list[Ids]]]:
  """Each position's group (graph component; pinned ones share the last node's) and, per pin
  reason, the positions it pinned."""
  pin_node = positions.size
  edges_from: list[Ids] = []
  edges_to: list[Ids] = []
  pinned_by: dict[str, list[Ids]] = {}
  for fact in facts:
    if isinstance(fact, rules.Unify):
      size = positions.shape(fact.first)
      edges_from.append(positions.of(fact.first))
      edges_to.append(positions.base[fact.second] + fact.offset + np.arange(size))
    elif isinstance(fact, rules.Pin):
      where = positions.of(fact.where)
      edges_from.append(where)
      edges_to.append(np.full(where.size, pin_node))
      if where.size > 1 and fact.report:  # a broadcast size-1 axis holds no unit
        pinned_by.setdefault(fact.reason, []).append(where)
    elif isinstance(fact, rules.Blocks):  # each position to its block's first in ``second``
      for axis, size in ((fact.first, fact.first_size), (fact.second, fact.second_size)):
        edges_from.append(positions.of(axis))
        blocks = np.arange(positions.shape(axis)) // size
        edges_to.append(positions.base[fact.second] + blocks * fact.second_size)
  return facts_lib.components(positions.size + 1, edges_from, edges_to), pinned_by


def _summed(
    program: Program,
    varies: Sequence[rules.Axes],
    linear_reads: dict[int, list[rules.Axes]],
    contracts: Sequence[rules.Contract],
    fact: rules.Contract,
) -> tuple[Mask, Mask]:
  """For the positions a linear op sums over (``fact``: its lhs axis): whether each reaches a
  read output (not inert), and whether its contribution is an input-independent constant."""
  eqn = program.eqns[fact.eqn]
  lhs, rhs = (value_id(x) for x in eqn.inputs)
  rhs_axis = _partner(contracts, fact)
  size, rhs_size = program.avals[lhs].shape[fact.axis], program.avals[rhs].shape[rhs_axis]
  # Nothing reaches a read output through a position the rhs reads none through, or where
  # the lhs is zero and constant.
  reads_here = linear_reads[fact.eqn]
  rhs_row = lambda table, index: linear.on_lhs(eqn, _row(table, index, rhs_axis, rhs_size))
  reaches = _row(reads_here, 0, fact.axis, size) & rhs_row(reads_here, 1)
  constant = ~_row(varies, lhs, fact.axis, size) & ~rhs_row(varies, rhs)
  return reaches, constant


def _close_merges(
    program: Program,
    positions: _Positions,
    component: Ids,
    bad: Mask,
    merges: Sequence[rules.Merge | rules.Split],
) -> None:
  """A flattened feature kept keeps each of its components (a channel goes whole or not);
  where a reshape splits the features (``Split``), the features of kept components are kept
  too, since nothing can put back a feature the split needs."""

  def mark(ids: Ids) -> bool:
    changed = not bad[ids].all()
    bad[ids] = True
    return changed

  changed = True
  while changed:
    changed = False
    for fact in merges:
      if isinstance(fact, rules.Merge):
        flat, parts = (fact.target, fact.axis), [(fact.source, d) for d in fact.axes]
      else:
        flat, parts = (fact.source, fact.axis), [(fact.target, d) for d in fact.axes]
      flat_units = component[positions.of(flat)]
      part_units = [component[positions.of(where)] for where in parts]
      grid = bad[flat_units].reshape([ids.size for ids in part_units])
      for k, ids in enumerate(part_units):
        blocked = rules.any_over(grid, tuple(j for j in range(grid.ndim) if j != k))
        changed |= mark(ids[blocked])
      if isinstance(fact, rules.Split):
        product = rules.full_mask(grid.shape, [bad[ids] for ids in part_units]).reshape(-1)
        changed |= mark(flat_units[product])


def analyse(
    program: Program,
    values: Values,
    num_params: int,
    batch_axis: int | None,
    constants: str,
    round_to: int = 1,
    folds: bool = True,
) -> Plan:
  """The plan removing every unit of ``program`` that cannot change its outputs.

  ``constants="params"`` keeps the units whose removal would leave a constant that no bias
  or normalisation offset among the params can take (``Plan.absorbed``). ``round_to`` keeps
  removable units until every width is a multiple of it (``rounding``). ``folds=False``
  keeps every unit whose removal leaves a nonzero constant (a scan's body, whose values are
  only "nonzero in some layer").
  """
  avals = program.avals
  facts, batched = facts_lib.facts_of(program, num_params, batch_axis)
  positions = _Positions(avals)
  component, pinned_by = _groups(positions, facts)
  varies, reads, linear_reads = _flow(program, values, num_params)
  bad = np.zeros(component.max() + 1, bool)
  bad[component[-1]] = True
  dead = np.zeros(positions.size, bool)
  for (index, axis), base in positions.base.items():
    size = avals[index].shape[axis]
    live = _row(varies, index, axis, size) & _row(reads, index, axis, size)
    dead[base : base + size] = ~live
    bad[component[base : base + size][live]] = True
  contracts = [fact for fact in facts if isinstance(fact, rules.Contract)]
  lhs_contracts = [fact for fact in contracts if fact.operand == 0]
  summed = {fact: _summed(program, varies, linear_reads, contracts, fact) for fact in lhs_contracts}
  lhs_of = lambda fact: value_id(program.eqns[fact.eqn].inputs[0])
  for fact, (reaches, constant) in summed.items():
    where = positions.of((lhs_of(fact), fact.axis))
    bad[component[where][reaches & ~constant if folds else reaches]] = True
  merges = [fact for fact in facts if isinstance(fact, rules.Merge)]
  splits = [fact for fact in facts if isinstance(fact, rules.Split)]
  kept_by = {
      reason: int(sum(dead[where].sum() for where in wheres))
      for reason, wheres in pinned_by.items()
  }
  widths = rounding.Widths(component, positions.base, positions.shape, merges)
  while True:
    linear.keep_a_group(facts, lambda where: component[positions.of(where)], bad)
    _close_merges(program, positions, component, bad, [*merges, *splits])
    if widths.keep_back(bad, round_to):
      continue  # a unit kept back widens other axes and keeps its channels: close again
    removed = ~bad[component[:-1]]
    keep: dict[int, list[Mask | None]] = {}
    for (index, axis), base in positions.base.items():
      row = ~removed[base : base + avals[index].shape[axis]]
      if not row.all():
        keep.setdefault(index, [None] * len(avals[index].shape))[axis] = row
    plan = Plan(keep, {}, {}, {}, {}, batched, {r: n for r, n in kept_by.items() if n})
    _fill_merges(program, plan, merges)
    _fill_folds(program, values, plan, summed)
    plan.absorbed.update(_absorptions(program, plan, num_params))
    refused = [i for i in plan.folds if i not in plan.absorbed]
    if constants == "program" or not refused:
      return _with_bodies(program, values, num_params, plan, round_to)
    # Keep the positions that add to the refused constants (those reaching a read output).
    before = bad.copy()
    for fact, (reaches, _) in summed.items():
      if fact.eqn in refused:
        bad[component[positions.of((lhs_of(fact), fact.axis))][reaches]] = True
    if (bad == before).all():
      raise AssertionError("compaction: a refused constant comes from no removed position")


def _with_bodies(
    program: Program, values: Values, num_params: int, plan: Plan, round_to: int
) -> Plan:
  """``plan`` with the units inside scans' bodies removed where dead in every layer."""
  analyse_body = lambda body, body_values, owned: analyse(
      body, body_values, owned, None, "program", round_to, folds=False
  )
  bodies, keep = stacked.body_plans(program, values, num_params, values_read, analyse_body)
  if not bodies:
    return plan
  kept_by = dict(plan.kept_by)
  for body in bodies.values():
    for reason, count in body.kept_by.items():
      kept_by[reason] = kept_by.get(reason, 0) + count
  return plan._replace(keep={**plan.keep, **keep}, bodies=bodies, kept_by=kept_by)


_OFFSET_PATH = frozenset(("reshape", "broadcast_in_dim", "convert_element_type"))


def _absorptions(program: Program, plan: Plan, num_params: int) -> dict[int, tuple[int, int]]:
  """Folds a parameter can take: the op's output goes only into ``+ b`` or ``- b`` where
  ``b`` is a vector param (reshaped or broadcast) read nowhere else, and the constant varies
  along ``b``'s axis only. Maps each such fold to ``(param leaf number, sign)``."""
  consumers: dict[int, list[int]] = {}
  producers = {out: eqn for eqn in program.eqns for out in eqn.outputs}
  for position, eqn in enumerate(program.eqns):
    for x in eqn.inputs:
      if not isinstance(x, Literal):
        consumers.setdefault(x, []).append(position)
  leaf_of = {index: k for k, index in enumerate(program.inputs[:num_params])}
  found = {}
  for position, constant in plan.folds.items():
    out = program.eqns[position].outputs[0]
    users = consumers.get(out, [])
    if len(users) != 1 or out in program.outputs:
      continue
    user = program.eqns[users[0]]
    name = user.primitive.name
    if name not in ("add", "sub") or (name == "sub" and user.inputs[0] != out):
      continue
    offset = user.inputs[1] if user.inputs[0] == out else user.inputs[0]
    if isinstance(offset, Literal):
      continue
    spread = [d for d, size in enumerate(program.avals[offset].shape) if size != 1]
    if any(size != 1 and d not in spread for d, size in enumerate(constant.shape)):
      continue
    x = offset
    while x not in leaf_of and x in producers and producers[x].primitive.name in _OFFSET_PATH:
      if len(consumers.get(x, [])) != 1:
        break
      x = producers[x].inputs[0]
    if x in leaf_of and len(consumers.get(x, [])) == 1 and len(program.avals[x].shape) == 1:
      found[position] = (leaf_of[x], 1 if name == "add" else -1)
  return found


def _contracted_rhs_axes(eqn: Eqn, lhs_axes: Sequence[int]) -> list[int]:
  """The rhs axes summed with ``lhs_axes`` of a linear op."""
  if eqn.primitive.name == "dot_general":
    (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
    return [rhs_c[list(lhs_c).index(axis)] for axis in lhs_axes]
  return [eqn.params["dimension_numbers"][1][1]]  # a convolution's kernel input features


def _partner(contracts: Sequence[rules.Contract], fact: rules.Contract) -> int:
  """The other operand's axis contracted with ``fact``'s axis (same order in the op)."""
  own = [c.axis for c in contracts if c.eqn == fact.eqn and c.operand == fact.operand]
  other = [c.axis for c in contracts if c.eqn == fact.eqn and c.operand != fact.operand]
  return other[own.index(fact.axis)]


def kept_row(plan: Plan, index: int, axis: int, size: int) -> Mask:
  """The kept positions of ``(index, axis)`` as a bool array of ``size``."""
  rows = plan.keep.get(index)
  row = None if rows is None else rows[axis]
  return np.ones(size, bool) if row is None else row


def _fill_merges(program: Program, plan: Plan, merges: Sequence[rules.Merge]) -> None:
  """Per flattening reshape: its merged axes, and a gather where single features go."""
  by_eqn = {eqn.outputs[0]: position for position, eqn in enumerate(program.eqns)}
  for merge in merges:
    position = by_eqn[merge.target]
    plan.merges.setdefault(position, {})[merge.axis] = merge.axes
    sizes = [program.avals[merge.source].shape[d] for d in merge.axes]
    components = [kept_row(plan, merge.source, d, size) for d, size in zip(merge.axes, sizes)]
    flat_kept = kept_row(plan, merge.target, merge.axis, int(np.prod(sizes)))
    survivors = rules.full_mask(sizes, components).reshape(-1)
    if (flat_kept == survivors).all():
      continue
    # New index of each kept flattened feature among the survivors of its components.
    renumber = np.cumsum(survivors) - 1
    plan.gathers[position] = (merge.axis, renumber[flat_kept].astype(np.int32))


def _fill_folds(
    program: Program, values: Values, plan: Plan, summed: dict[rules.Contract, tuple[Mask, Mask]]
) -> None:
  """Per linear op that loses constant inputs, the constant they add to its read outputs
  (``summed``: per lhs contraction fact, which positions reach a read output)."""
  by_eqn: dict[int, list[tuple[int, Mask]]] = {}
  for fact, (reaches, _) in summed.items():
    lhs = value_id(program.eqns[fact.eqn].inputs[0])
    row = reaches & ~kept_row(plan, lhs, fact.axis, reaches.size)
    by_eqn.setdefault(fact.eqn, []).append((fact.axis, row))
  for position, rows in by_eqn.items():
    if not any(row.any() for _, row in rows):
      continue
    eqn = program.eqns[position]
    lhs_axes = [axis for axis, _ in rows]
    axes = (lhs_axes, _contracted_rhs_axes(eqn, lhs_axes))
    gone_rows = ([row for _, row in rows], [linear.on_rhs(eqn, row) for _, row in rows])
    operands = []
    for x, contracted, gone_row in zip(eqn.inputs, axes, gone_rows):
      shape = rules.shape_of(program.avals, x)
      gone = np.zeros(shape, bool)
      for axis, row in zip(contracted, gone_row):
        every = [np.ones(size, bool) for size in shape]
        every[axis] = row
        gone |= rules.full_mask(shape, every)
      operands.append(np.where(gone, concrete(values, x), 0))
    constant = np.asarray(eqn.primitive.bind(*operands, **eqn.params))
    if not constant.any():
      continue
    out = eqn.outputs[0]
    for axis, size in enumerate(constant.shape):
      batch = (out, axis) in plan.batched
      if batch or (size > 1 and (constant == constant.take([0], axis)).all()):
        constant = constant.take([0], axis)
      else:
        constant = constant.compress(kept_row(plan, out, axis, size), axis)
    if constant.any():  # a removed group's constant reaches only the group's removed outputs
      plan.folds[position] = constant
