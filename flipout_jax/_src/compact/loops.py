"""Links of loops (``lax.scan``, ``lax.while_loop``, ``fori_loop``): the axes along which the
loop's body is elementwise pass through the loop, so a model that scans over time or over
stacked layers keeps its batch axis (``compacted.apply`` takes other batch sizes).

The body is traced to a flat program of its own and linked by the same rules; each carry's
output is joined to its input (the next iteration reads what this one wrote). A group of
(value, axis) rows joined that way passes when no op in it mixes along its axis (no pin, no
contraction, no concatenation or reshape merging along it): the loop's operands and outputs
in such a group are one unit row (``Unify``). A ``while_loop`` whose condition reads a carry
mixes that carry: its trip count depends on every position of it.

Every axis of a loop's operands and outputs is pinned too: the outer analysis never cuts a
loop's carries or outputs. A scan's own params (stacked layers, constant weights) lose the
units dead in every iteration by an analysis of the body (``stacked``); a
``while_loop``'s body keeps all of its units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

from flipout_jax._src.compact import rules as rules
from flipout_jax._src.compact.program import Aval, Eqn, Literal, Program, trace, value_id

LOOPS = frozenset(("scan", "while"))
# A row that passes through the loop is kept too (a loop's carries are never cut), but
# the loop is elementwise along it, so it keeps no replay at another batch size from running.
KEPT_PASSING = "a loop's carries and outputs (kept whole; a scan's own params lose dead units)"
Links = Callable[[int, Eqn, Sequence[Aval]], list[rules.Fact]]
Node = tuple[int, int]  # (value id, axis), of the body or of the loop's own operands


def _program(closed: jex_core.ClosedJaxpr) -> Program:
  specs = [
      jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
      for v in closed.jaxpr.invars
  ]
  return trace(jex_core.jaxpr_as_fun(closed), *specs)


class _Rows:
  """Union-find over (value, axis) rows, with the rows an op mixes along marked."""

  def __init__(self) -> None:
    self.parent: dict[Node, Node] = {}
    self.mixed: set[Node] = set()

  def find(self, node: Node) -> Node:
    self.parent.setdefault(node, node)
    while self.parent[node] != node:
      self.parent[node] = self.parent[self.parent[node]]
      node = self.parent[node]
    return node

  def join(self, first: Node, second: Node) -> None:
    self.parent[self.find(first)] = self.find(second)

  def passes(self, node: Node) -> bool:
    root = self.find(node)
    return all(self.find(m) != root for m in self.mixed)


def _body_rows(body: Program, links: Links, carries: Sequence[tuple[int, int]]) -> _Rows:
  """The body's rows, joined by its links and by ``carries`` ((output, input) positions)."""
  rows = _Rows()
  for index, eqn in enumerate(body.eqns):
    for fact in links(index, eqn, body.avals):
      if isinstance(fact, rules.Unify) and not fact.offset:
        rows.join(fact.first, fact.second)
      elif isinstance(fact, rules.Unify):
        rows.mixed.update((fact.first, fact.second))
      elif isinstance(fact, rules.Pin):
        rows.mixed.add(fact.where)
      elif isinstance(fact, rules.Contract):
        rows.mixed.add((value_id(eqn.inputs[fact.operand]), fact.axis))
      elif isinstance(fact, rules.Merge):
        rows.mixed.update((fact.source, d) for d in fact.axes)
        rows.mixed.add((fact.target, fact.axis))
      elif isinstance(fact, rules.Split):
        rows.mixed.update((fact.target, d) for d in fact.axes)
        rows.mixed.add((fact.source, fact.axis))
      else:  # a grouped convolution's groups: features in blocks, not row to row
        rows.mixed.update((fact.first, fact.second))
  for out_position, in_position in carries:
    out = body.outputs[out_position]
    if isinstance(out, Literal):
      continue
    for d in range(len(body.avals[out].shape)):
      rows.join((out, d), (body.inputs[in_position], d))
  return rows


def _loop_facts(
    eqn: Eqn,
    avals: Sequence[Aval],
    rows: _Rows,
    body: Program,
    operand_of: Sequence[tuple[int, int] | None],
    output_of: Sequence[tuple[int, int] | None],
    reason: str,
) -> list[rules.Fact]:
  """Unify the loop's rows whose body rows pass together; pin every row of the loop.

  ``operand_of[k]``: (body input position, axis shift) of the loop's operand k, so that its
  axis ``d + shift`` is the body input's axis d (a scan's xs: shift 1), or None where it is no
  body input (a while loop's condition constants); ``output_of`` alike."""
  outer: dict[Node, Node] = {}  # a passing body row's root -> the first loop row joined to it
  facts: list[rules.Fact] = []
  sides = (
      (eqn.inputs, body.inputs, operand_of),
      (eqn.outputs, body.outputs, output_of),
  )
  for atoms, body_atoms, mapping in sides:
    for atom, entry in zip(atoms, mapping):
      if isinstance(atom, Literal):
        continue
      passing = set()
      inner = None if entry is None else body_atoms[entry[0]]
      if entry is not None and isinstance(inner, int):
        shift = entry[1]
        for d in range(len(body.avals[inner].shape)):
          if rows.passes((inner, d)):
            passing.add(d + shift)
            root = rows.find((inner, d))
            if root in outer:
              facts.append(rules.Unify(outer[root], (atom, d + shift)))
            else:
              outer[root] = (atom, d + shift)
      facts += [
          rules.Pin((atom, d), KEPT_PASSING if d in passing else reason)
          for d in range(len(avals[atom].shape))
      ]
  return facts


def scan_program(eqn: Eqn) -> Program:
  """A scan's body as a flat program (inputs: its constants, carries and ``xs``)."""
  return _program(eqn.params["jaxpr"])


def _scan_body(eqn: Eqn, links: Links) -> tuple[Program, _Rows]:
  """A scan's body and its rows, each carry's output joined to its input."""
  consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
  body = scan_program(eqn)
  return body, _body_rows(body, links, [(k, consts + k) for k in range(carries)])


def _while_body(eqn: Eqn, links: Links) -> tuple[Program, Program, _Rows]:
  """A while loop's body, condition and body rows; a carry the condition reads is mixed."""
  p = eqn.params
  body, cond = _program(p["body_jaxpr"]), _program(p["cond_jaxpr"])
  body_consts, cond_consts = p["body_nconsts"], p["cond_nconsts"]
  carries = len(eqn.outputs)
  rows = _body_rows(body, links, [(k, body_consts + k) for k in range(carries)])
  atoms = [*(x for e in cond.eqns for x in e.inputs), *cond.outputs]
  read = {x for x in atoms if not isinstance(x, Literal)}
  for k in range(carries):
    if cond.inputs[cond_consts + k] in read:  # the trip count depends on all of this carry
      carry = body.inputs[body_consts + k]
      rows.mixed.update((carry, d) for d in range(len(body.avals[carry].shape)))
  return body, cond, rows


def _scan_links(eqn: Eqn, avals: Sequence[Aval], links: Links) -> list[rules.Fact]:
  p = eqn.params
  consts, carries = p["num_consts"], p["num_carry"]
  body, rows = _scan_body(eqn, links)
  xs = len(eqn.inputs) - consts - carries
  operand_of: list[tuple[int, int] | None] = [(k, 0) for k in range(consts + carries)]
  operand_of += [(consts + carries + k, 1) for k in range(xs)]
  output_of: list[tuple[int, int] | None] = [(k, 0) for k in range(carries)]
  output_of += [(k, 1) for k in range(carries, len(eqn.outputs))]
  return _loop_facts(eqn, avals, rows, body, operand_of, output_of, "lax.scan (its body)")


def _while_links(eqn: Eqn, avals: Sequence[Aval], links: Links) -> list[rules.Fact]:
  body, _, rows = _while_body(eqn, links)
  body_consts, cond_consts = eqn.params["body_nconsts"], eqn.params["cond_nconsts"]
  carries = len(eqn.outputs)
  operand_of: list[tuple[int, int] | None] = [None] * cond_consts
  operand_of += [(k, 0) for k in range(body_consts + carries)]
  output_of: list[tuple[int, int] | None] = [(k, 0) for k in range(carries)]
  return _loop_facts(eqn, avals, rows, body, operand_of, output_of, "lax.while_loop (its body)")


def links(eqn: Eqn, avals: Sequence[Aval], links_of: Links) -> list[rules.Fact]:
  """The facts of a loop in ``LOOPS``; ``links_of`` links its body's equations."""
  if eqn.primitive.name == "scan":
    return _scan_links(eqn, avals, links_of)
  return _while_links(eqn, avals, links_of)


Run = Callable[[Program, frozenset[Node], Sequence[Any]], list[Any]]


def _rebuilt(body: Program, batched: frozenset[Node], specs: list[Any], run: Run) -> Any:
  """The body as a closed jaxpr at the new sizes ``specs``, replayed by ``run``."""
  return jax.make_jaxpr(lambda *args: run(body, batched, args))(*specs)


def _specs(body: Program, shapes: Sequence[tuple[Any, ...]]) -> list[Any]:
  return [
      jax.ShapeDtypeStruct(shape, body.avals[x].dtype, weak_type=body.avals[x].weak_type)
      for x, shape in zip(body.inputs, shapes)
  ]


def _batched_rows(body: Program, rows: _Rows, seeds: Sequence[Node]) -> frozenset[Node]:
  roots = {rows.find(node) for node in seeds}
  return frozenset(
      (x, d)
      for x, aval in enumerate(body.avals)
      for d in range(len(aval.shape))
      if rows.find((x, d)) in roots
  )


def replayed_params(
    eqn: Eqn,
    shapes: Sequence[tuple[Any, ...]],
    batched: Callable[[int, int], bool],
    links_of: Links,
    run: Run,
) -> dict[str, Any]:
  """The loop's params with its body (and condition) retraced at its operands' new sizes
  ``shapes``, replaying the body with ``run``; ``batched(k, d)``: whether operand k's axis d
  is the batch axis."""
  p = eqn.params
  if eqn.primitive.name == "scan":
    body, rows = _scan_body(eqn, links_of)
    consts, carries = p["num_consts"], p["num_carry"]
    shift = lambda k: 1 if k >= consts + carries else 0
    body_shapes = [shape[shift(k) :] for k, shape in enumerate(shapes)]
    seeds = [
        (body.inputs[k], d - shift(k))
        for k, shape in enumerate(shapes)
        for d in range(shift(k), len(shape))
        if batched(k, d)
    ]
    jaxpr = _rebuilt(body, _batched_rows(body, rows, seeds), _specs(body, body_shapes), run)
    return dict(p, jaxpr=jaxpr)
  body, cond, rows = _while_body(eqn, links_of)
  body_consts, cond_consts = p["body_nconsts"], p["cond_nconsts"]
  carry_shapes = list(shapes[cond_consts + body_consts :])
  carry_batched = [
      (k, d)
      for k, shape in enumerate(carry_shapes)
      for d in range(len(shape))
      if batched(cond_consts + body_consts + k, d)
  ]
  seeds = [(body.inputs[body_consts + k], d) for k, d in carry_batched]
  body_shapes = list(shapes[cond_consts : cond_consts + body_consts]) + carry_shapes
  body_jaxpr = _rebuilt(body, _batched_rows(body, rows, seeds), _specs(body, body_shapes), run)
  # The condition reads no batched carry (else the loop mixes the batch and is not replayed).
  cond_batched = frozenset((cond.inputs[cond_consts + k], d) for k, d in carry_batched)
  cond_shapes = list(shapes[:cond_consts]) + carry_shapes
  cond_jaxpr = _rebuilt(cond, cond_batched, _specs(cond, cond_shapes), run)
  return dict(p, body_jaxpr=body_jaxpr, cond_jaxpr=cond_jaxpr)
