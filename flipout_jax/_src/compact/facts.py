"""The facts of a traced program that compaction reasons on: per equation, which positions
are one unit (``Unify``, ``Blocks``), which are kept (``Pin``), merged (``Merge``) or summed
(``Contract``); the arguments and outputs pinned; and which (value, axis) rows are the batch
axis: those ``Unify`` ties to an argument's ``batch_axis``. Shared by the analysis
(``analysis``), ``unit_groups`` and the replay at other batch sizes (``run``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.sparse import csgraph

from flipout_jax._src.compact import linear as linear
from flipout_jax._src.compact import loops as loops
from flipout_jax._src.compact import passing as passing
from flipout_jax._src.compact import rules as rules
from flipout_jax._src.compact import stacked as stacked
from flipout_jax._src.compact.program import Aval, Eqn, Literal, Program, value_id

Where = rules.Where
Ids: TypeAlias = npt.NDArray[np.intp]  # position numbers, or component labels


def components(nodes: int, edges_from: list[Ids], edges_to: list[Ids]) -> Ids:
  first = np.concatenate(edges_from) if edges_from else np.zeros(0, np.int64)
  second = np.concatenate(edges_to) if edges_to else np.zeros(0, np.int64)
  graph = sparse.coo_matrix((np.ones(first.size, bool), (first, second)), shape=(nodes, nodes))
  return csgraph.connected_components(graph, directed=False)[1]


def links(index: int, eqn: Eqn, avals: Sequence[Aval]) -> list[rules.Fact]:
  """The facts of equation ``index``: each primitive's rule (``rules``,
  ``linear``'s convolutions, ``passing``, ``loops``)."""
  if eqn.primitive.name in passing.PASSING:
    return passing.links(eqn, avals)
  if eqn.primitive.name in loops.LOOPS:
    return loops.links(eqn, avals, links)
  if eqn.primitive.name == "conv_general_dilated":
    return linear.conv_links(index, eqn, avals)
  return rules.links(index, eqn, avals)


_ARGUMENT = "an argument or output of the function"


def facts_of(
    program: Program, num_params: int, batch_axis: int | None
) -> tuple[list[rules.Fact], frozenset[Where]]:
  """Every link of the program, the arguments and outputs pinned; and the batched axes."""
  avals = program.avals
  facts = [fact for i, eqn in enumerate(program.eqns) for fact in links(i, eqn, avals)]
  reason = _ARGUMENT
  for index in [*program.inputs[num_params:], *program.outputs]:
    if not isinstance(index, Literal):  # a literal output is a scalar: no axis to pin
      facts += [rules.Pin((index, d), reason) for d in range(len(avals[index].shape))]
  owned = {
      value_id(program.eqns[position].inputs[k])
      for position, operands in stacked.owned_operands(program, num_params).items()
      for k in operands
  }
  # A scan's own params are cut by its body's analysis: its pins on them keep nothing.
  facts = [
      fact._replace(report=False)
      if isinstance(fact, rules.Pin) and fact.where[0] in owned
      else fact
      for fact in facts
  ]
  batched = _batched_axes(program, facts, num_params, batch_axis)
  for merge in [fact for fact in facts if isinstance(fact, rules.Merge)]:
    if any((merge.source, d) in batched for d in merge.axes):
      facts.append(rules.Pin((merge.target, merge.axis), "reshape merging the batch axis"))
  for split in [fact for fact in facts if isinstance(fact, rules.Split)]:
    if (split.source, split.axis) in batched:
      reason = "reshape splitting the batch axis"
      facts += [rules.Pin((split.target, d), reason) for d in split.axes]
  return facts, batched


def replay_blockers(program: Program, num_params: int, batch_axis: int | None) -> list[str]:
  """The ops that keep ``program`` from being replayed at another batch size: those that mix
  along the batch axis (a mean over the batch has its size in a literal), merge it into
  another axis, or join values along it. Empty: every op is elementwise along it."""
  facts, batched = facts_of(program, num_params, batch_axis)
  found = set()
  for fact in facts:
    ignored = (_ARGUMENT, passing.IOTA_REASON, loops.KEPT_PASSING)
    if isinstance(fact, rules.Pin) and fact.where in batched and fact.reason not in ignored:
      found.add(fact.reason)
    elif isinstance(fact, rules.Contract) and _where_of(program, fact) in batched:
      found.add(f"{program.eqns[fact.eqn].primitive.name} summing over the batch axis")
    elif isinstance(fact, rules.Unify) and fact.offset and fact.second in batched:
      found.add("a concatenation or split along the batch axis")
    elif isinstance(fact, rules.Merge) and any((fact.source, d) in batched for d in fact.axes):
      found.add("reshape merging the batch axis with another")
    elif isinstance(fact, rules.Split) and (fact.source, fact.axis) in batched:
      found.add("reshape splitting the batch axis")
  return sorted(found)


def _batched_axes(
    program: Program, facts: Sequence[rules.Fact], num_params: int, batch_axis: int | None
) -> frozenset[Where]:
  """The (value, axis) pairs that ``Unify`` facts tie to an argument's ``batch_axis``."""
  if batch_axis is None:
    return frozenset()
  nodes = {where: i for i, where in enumerate(sorted({w for f in facts for w in _wheres(f)}))}
  seeds = [
      (index, batch_axis)
      for index in program.inputs[num_params:]
      if len(program.avals[index].shape) > batch_axis
  ]
  for where in seeds:
    nodes.setdefault(where, len(nodes))
  pairs = [(nodes[f.first], nodes[f.second]) for f in facts if isinstance(f, rules.Unify)]
  labels = components(
      len(nodes),
      [np.array([a for a, _ in pairs], np.int64)],
      [np.array([b for _, b in pairs], np.int64)],
  )
  batch_labels = {labels[nodes[where]] for where in seeds}
  return frozenset(where for where, node in nodes.items() if labels[node] in batch_labels)


def _wheres(fact: rules.Fact) -> tuple[Where, ...]:
  if isinstance(fact, rules.Unify):
    return (fact.first, fact.second)
  if isinstance(fact, rules.Pin):
    return (fact.where,)
  return ()


def _where_of(program: Program, fact: rules.Contract) -> Where:
  return (value_id(program.eqns[fact.eqn].inputs[fact.operand]), fact.axis)
