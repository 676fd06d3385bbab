"""Units inside a ``lax.scan``'s body: stacked layers lose the units dead in every layer.

A model that scans one layer's code over stacked params (``params["layers"]["w1"]`` of shape
``(layers, width, hidden)`` as the scan's ``xs``) runs one body for all layers, so a unit can
leave the body only if it leaves every layer: the policy is that a unit goes where it is dead
in every layer (never packed per layer to the widest layer's count, which would need a gather
per layer). The body is analysed as a program of its own whose params are the scan operands
it owns (params or constants read by this scan only, as ``xs`` or as constants), each value
that analysis reads being "nonzero in some layer" (the body evaluated on every layer at once,
under ``vmap``). Since one layer's constant differs from another's, nothing is folded inside a
body: a unit whose removal would leave a nonzero constant stays. The loop's carries, its
other operands and its outputs keep their widths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax._src.compact import loops as loops
from flipout_jax._src.compact import rules as rules
from flipout_jax._src.compact.program import Literal, Program, Values, concrete, evaluate
from flipout_jax._src.compact.program import value_id

if TYPE_CHECKING:
  from flipout_jax._src.compact.analysis import Plan

  AnalyseBody = Callable[[Program, Values, int], Plan]


def owned_operands(program: Program, num_params: int) -> dict[int, list[int]]:
  """Per scan equation, the operands its body may cut: its constants and ``xs`` that are
  params or captured constants of ``program``, read by no other op and not an output (scans
  with none are left out)."""
  fixed = set(program.inputs[:num_params]) | set(program.consts)
  reads: dict[int, int] = {}
  for other in program.eqns:
    for x in other.inputs:
      if not isinstance(x, Literal):
        reads[x] = reads.get(x, 0) + 1
  outputs = {x for x in program.outputs if not isinstance(x, Literal)}
  found = {}
  for position, eqn in enumerate(program.eqns):
    if eqn.primitive.name != "scan":
      continue
    consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
    owned = [
        k
        for k, x in enumerate(eqn.inputs)
        if not consts <= k < consts + carries
        and not isinstance(x, Literal)
        and x in fixed
        and reads[x] == 1
        and x not in outputs
    ]
    if owned:
      found[position] = owned
  return found


def _summaries(
    body: Program, stacked: dict[int, tuple[np.ndarray, bool]], wanted: Sequence[int]
) -> list[np.ndarray]:
  """The values ``wanted`` of ``body`` as "nonzero in some layer", the body run on every
  layer; ``stacked``: per owned body input position, (value, whether it is stacked as xs).
  The other inputs (carries, xs the body does not own) are zeros: the analysis reads only
  the values' positions that do not depend on them."""
  positions = sorted(stacked)

  def one(*owned: Any) -> list[Any]:
    inputs = [jnp.zeros(aval.shape, aval.dtype) for aval in (body.avals[x] for x in body.inputs)]
    for k, value in zip(positions, owned):
      inputs[k] = value
    every = evaluate(body, inputs)
    return [every[index] for index in wanted]

  operands = [stacked[k][0] for k in positions]
  axes = [0 if stacked[k][1] else None for k in positions]
  if not any(axis == 0 for axis in axes):
    return [np.asarray(np.asarray(value) != 0) for value in jax.jit(one)(*operands)]
  outs = jax.jit(jax.vmap(one, in_axes=axes))(*operands)
  return [rules.any_over(np.asarray(value) != 0, 0) for value in outs]


def body_plans(
    program: Program,
    values: Values,
    num_params: int,
    values_read: Callable[[Program], set[int]],
    analyse_body: AnalyseBody,
) -> tuple[dict[int, Plan], dict[int, list[Any]]]:
  """Per scan with owned operands, the plan of its body (``analyse_body(body, values,
  num_params)``, the owned inputs first), and the rows each owned operand keeps."""
  plans: dict[int, Plan] = {}
  keep: dict[int, list[Any]] = {}
  for position, owned in owned_operands(program, num_params).items():
    eqn = program.eqns[position]
    body = loops.scan_program(eqn)
    xs_start = eqn.params["num_consts"] + eqn.params["num_carry"]
    stacked = {k: (concrete(values, eqn.inputs[k]), k >= xs_start) for k in owned}
    wanted = sorted(values_read(body) - set(body.inputs))
    body_values: list[Any] = [None] * len(body.avals)
    for index, value in zip(wanted, _summaries(body, stacked, wanted)):
      body_values[index] = value
    for x in body.inputs:  # the others vary: their contents are not read
      body_values[x] = np.zeros(body.avals[x].shape, bool)
    for k, (value, is_xs) in stacked.items():
      body_values[body.inputs[k]] = (value != 0).any(axis=0) if is_xs else value != 0
    order = owned + [k for k in range(len(body.inputs)) if k not in owned]
    plan = analyse_body(
        body._replace(inputs=tuple(body.inputs[k] for k in order)), body_values, len(owned)
    )
    if plan.folds:
      raise AssertionError("compaction: a scan's body folds a constant")
    if not plan.keep:
      continue
    plans[position] = plan
    for k in owned:
      rows = plan.keep.get(body.inputs[k])
      if rows is not None:
        keep[value_id(eqn.inputs[k])] = [None, *rows] if k >= xs_start else list(rows)
  return plans, keep
