"""Running a compacted program: cut values, resized op params, folded constants, and other
batch sizes (a retrace of ``apply_fn`` checked against the analysed program, or, under a
symbolic batch, a replay of the analysed program with the batch axis's size substituted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax._src.compact import analysis as analysis
from flipout_jax._src.compact import facts as facts_lib
from flipout_jax._src.compact import loops as loops
from flipout_jax._src.compact import passing as passing
from flipout_jax._src.compact.program import Atom, Literal, Program, same_structure, trace
from flipout_jax._src.compact.rules import Mask, shape_of

Rows: TypeAlias = Sequence[Mask | None]  # per axis, the kept positions (None: all)
Signature: TypeAlias = tuple[tuple[tuple[int, ...], Any], ...]  # (shape, dtype) per leaf


class TreeDef(Protocol):
  """What compaction uses of a ``jax.tree_util.PyTreeDef`` (jax's stubs name it through an
  alias of jaxlib's, which mypy cannot resolve)."""

  @property
  def num_leaves(self) -> int:
    ...

  def flatten_up_to(self, tree: Any) -> list[Any]:
    ...

  def unflatten(self, leaves: Iterable[Any]) -> Any:
    ...


def cut(value: Any, rows: Rows | None) -> Any:
  """``value`` keeping, along each axis with a row, the positions the row marks (on host for
  concrete arrays: a device gather would compile once per shape)."""
  if rows is None:
    return value
  concrete = not isinstance(value, jax.core.Tracer)
  cut = np.asarray(value) if concrete else value
  for axis, row in enumerate(rows):
    if row is not None:
      cut = (np if concrete else jnp).take(cut, np.flatnonzero(row), axis=axis)
  return jnp.asarray(cut) if concrete and not isinstance(value, np.ndarray) else cut


Shapes: TypeAlias = Callable[[Atom], tuple[Any, ...]]  # a value's size in the run


def _new_shape(
    program: Program, plan: analysis.Plan, atom: Atom, batch: dict[int, Any] | None = None
) -> tuple[Any, ...]:
  """The shape of ``atom`` in the compact program; with ``batch`` (analysed batch size to
  the new one, for a replay), the batch axis's size substituted."""
  shape = shape_of(program.avals, atom)
  if isinstance(atom, Literal):
    return shape
  rows = plan.keep.get(atom)
  sizes: list[Any] = list(shape)
  for d, size in enumerate(shape):
    if batch is not None and (atom, d) in plan.batched:
      sizes[d] = batch.get(size, size)
    elif rows is not None and (row := rows[d]) is not None:
      sizes[d] = int(row.sum())
  return tuple(sizes)


def _resized_params(
    program: Program, plan: analysis.Plan, position: int, sizes: Shapes
) -> dict[str, Any]:
  """``eqn.params`` with the sizes it names set to the compact values' sizes (``sizes``)."""
  eqn = program.eqns[position]
  params = eqn.params
  name = eqn.primitive.name
  dense_out = shape_of(program.avals, eqn.outputs[0])
  if name == "reshape":
    new_sizes = list(sizes(eqn.outputs[0]))
    source = sizes(eqn.inputs[0])
    for axis, merged in plan.merges.get(position, {}).items():
      new_sizes[axis] = int(np.prod([source[d] for d in merged]))
    return dict(params, new_sizes=tuple(new_sizes))
  if name == "slice":
    source = sizes(eqn.inputs[0])
    dense = shape_of(program.avals, eqn.inputs[0])
    limits = [
        source[d] if limit == dense[d] else limit for d, limit in enumerate(params["limit_indices"])
    ]
    return dict(params, limit_indices=tuple(limits))
  if name == "conv_general_dilated" and params["feature_group_count"] > 1:
    # Whole groups go and the kernel's input features stay: the groups left are the input
    # channels left over the channels per group.
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    channels, per_group = sizes(eqn.inputs[0])[lhs_spec[1]], sizes(eqn.inputs[1])[rhs_spec[1]]
    return dict(params, feature_group_count=channels // per_group)
  if name in passing.PASSING:
    atoms = [*eqn.inputs, *eqn.outputs]
    dense_shapes = [shape_of(program.avals, x) for x in atoms]
    return passing.resized_params(eqn, params, dense_shapes, [sizes(x) for x in atoms])
  if "shape" in params and tuple(params["shape"]) == dense_out:
    # broadcast_in_dim, iota, random bits: ops that make a value of the shape they name.
    return dict(params, shape=sizes(eqn.outputs[0]))
  return params


def run(
    program: Program,
    plan: analysis.Plan,
    inputs: Sequence[Any],
    batch: dict[int, Any] | None = None,
) -> list[Any]:
  """The compact program on compact ``inputs`` (the flattened params and args); with
  ``batch``, replayed at other sizes of the batch axis (analysed size to new size)."""
  sizes = lambda atom: _new_shape(program, plan, atom, batch)
  env: dict[int, Any] = dict(zip(program.inputs, inputs))
  for index, value in program.consts.items():
    env[index] = cut(value, plan.keep.get(index))

  def read(x: Atom) -> Any:
    return x.value if isinstance(x, Literal) else env[x]

  for position, eqn in enumerate(program.eqns):
    if eqn.primitive.name in loops.LOOPS and (batch is not None or position in plan.bodies):
      params = _replayed_loop(program, plan, position, sizes, batch)
    else:
      params = _resized_params(program, plan, position, sizes)
    outs = eqn.primitive.bind(*map(read, eqn.inputs), **params)
    outs = list(outs) if eqn.primitive.multiple_results else [outs]
    if position in plan.folds and position not in plan.absorbed:
      outs[0] = outs[0] + plan.folds[position].astype(outs[0].dtype)
    if position in plan.gathers:
      axis, indices = plan.gathers[position]
      outs[0] = jnp.take(outs[0], indices, axis=axis)
    env.update(zip(eqn.outputs, outs))
  return [read(x) for x in program.outputs]


def _replayed_loop(
    program: Program,
    plan: analysis.Plan,
    position: int,
    sizes: Shapes,
    batch: dict[int, Any] | None,
) -> dict[str, Any]:
  """A loop's params with its body retraced at the compact widths (a scan's body losing its
  own units by its plan) and, with ``batch``, at the replay's batch size."""
  eqn = program.eqns[position]
  body_plan = plan.bodies.get(position)

  def run_body(body: Program, batched: frozenset[analysis.Where], args: Sequence[Any]) -> Any:
    inner = analysis.bare_plan(batched) if body_plan is None else body_plan
    return run(body, inner._replace(batched=batched), args, batch)

  batched = lambda k, d: (
      batch is not None
      and not isinstance(eqn.inputs[k], Literal)
      and (eqn.inputs[k], d) in plan.batched
  )
  shapes = [sizes(x) for x in eqn.inputs]
  return loops.replayed_params(eqn, shapes, batched, facts_lib.links, run_body)


def weak(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.typeof(x).weak_type


def _signature(leaves: Iterable[Any]) -> Signature:
  return tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves)


def make_apply(
    apply_fn: Callable[..., Any],
    program: Program,
    plan: analysis.Plan,
    params_tree: TreeDef,
    param_shapes: list[jax.ShapeDtypeStruct],
    batch_axis: int | None,
) -> Callable[..., Any]:
  """``apply(compact_params, *args)``. Other argument shapes retrace ``apply_fn`` and refuse
  a trace that is not the analysed program; where a symbolic batch (``jax.export``) traces to
  another program, the analysed one is replayed with the batch axis's size substituted."""
  programs: dict[Signature, Program] = {}
  num_params = params_tree.num_leaves
  blockers: list[list[str]] = []  # computed at the first replay

  def program_for(arg_leaves: list[Any], args: tuple[Any, ...]) -> Program:
    key = _signature(arg_leaves)
    if key == _signature_of_inputs(program, num_params):
      return program
    if key not in programs:
      full = jax.tree.unflatten(params_tree, param_shapes)
      traced = trace(apply_fn, full, *args)
      _check_retrace(program, traced, plan, mixers)
      programs[key] = traced
    return programs[key]

  def mixers() -> list[str]:
    if not blockers:
      blockers.append(facts_lib.replay_blockers(program, num_params, batch_axis))
    return blockers[0]

  def replay(param_leaves: list[Any], arg_leaves: list[Any]) -> list[Any]:
    if mixers():
      raise ValueError(
          "compacted.apply: a symbolic batch needs a program elementwise along the batch axis; "
          f"in this one: {'; '.join(mixers())}"
      )
    batch = _batch_sizes(program, num_params, batch_axis, arg_leaves)
    return run(program, plan, [*param_leaves, *arg_leaves], batch)

  def apply(params: Any, *args: Any) -> Any:
    param_leaves = params_tree.flatten_up_to(params)
    arg_leaves = jax.tree.leaves(args)
    try:
      current = program_for(arg_leaves, args)
    except Exception as retrace_error:
      if all(_is_static(leaf) for leaf in arg_leaves):
        raise
      # Under symbolic sizes apply_fn may trace to other ops (``h[:, 0]`` is a gather there)
      # or not at all: the analysed program, elementwise along the batch, replays as it is.
      try:
        outputs = replay(param_leaves, arg_leaves)
      except ValueError as replay_error:
        raise replay_error from retrace_error
      return jax.tree.unflatten(program.out_tree, outputs)
    outputs = run(current, plan, [*param_leaves, *arg_leaves])
    return jax.tree.unflatten(current.out_tree, outputs)

  return apply


def _is_static(leaf: Any) -> bool:
  return all(isinstance(size, (int, np.integer)) for size in np.shape(leaf))


def _batch_sizes(
    program: Program, num_params: int, batch_axis: int | None, arg_leaves: list[Any]
) -> dict[int, Any]:
  """Analysed batch size to the arguments' (symbolic) one; refuses any other change."""
  batch: dict[int, Any] = {}
  for index, leaf in zip(program.inputs[num_params:], arg_leaves):
    analysed, given = tuple(program.avals[index].shape), tuple(np.shape(leaf))
    changed = [d for d, (a, b) in enumerate(zip(analysed, given)) if a is not b and a != b]
    if len(analysed) != len(given) or any(d != batch_axis for d in changed):
      raise ValueError(
          f"compacted.apply: an argument of shape {given} where the compacted program has "
          f"{analysed}: only the size of axis {batch_axis} (the batch axis) may change"
      )
    if changed and batch_axis is not None:
      size = analysed[batch_axis]
      if size == 1:
        raise ValueError(
            "compacted.apply: a symbolic batch needs example arguments with a batch of 2 or "
            "more (at size 1 the batch axis cannot be told from broadcast axes)"
        )
      if batch.setdefault(size, given[batch_axis]) != given[batch_axis]:
        raise ValueError("compacted.apply: arguments with one batch size differ in another")
  return batch


def _signature_of_inputs(program: Program, num_params: int) -> Signature:
  avals = [program.avals[i] for i in program.inputs[num_params:]]
  return tuple((tuple(a.shape), a.dtype) for a in avals)


def _check_retrace(
    analysed: Program, traced: Program, plan: analysis.Plan, mixers: Callable[[], list[str]]
) -> None:
  """Refuses a retrace that is not the analysed program up to the batch axis's sizes;
  ``mixers``: the ops the batch axis does not pass through, named when that is why."""
  changed = {
      (index, d)
      for index, (a, b) in enumerate(zip(analysed.avals, traced.avals))
      for d in range(len(a.shape))
      if a.shape[d] != b.shape[d]
  }
  inputs = set(analysed.inputs)
  if not same_structure(analysed, traced) or any(
      index in inputs and (index, d) not in plan.batched for index, d in changed
  ):
    raise ValueError(
        "compacted.apply: with these argument shapes apply_fn traces to another program than "
        "the one compacted (only the size of the arguments' batch axis may change); call "
        "flipout.compact with example arguments of these shapes"
    )
  if not changed <= plan.batched:
    ops = mixers() or ["an op that changes other sizes than the batch axis's"]
    raise ValueError(
        "compacted.apply: these arguments change sizes that the compacted program fixes: the "
        f"batch axis does not pass through {'; '.join(ops)}; call flipout.compact with "
        "example arguments of these shapes"
    )
