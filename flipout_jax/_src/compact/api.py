"""Compaction: a pruned model rewritten as a smaller dense one with the same outputs.

Pruning zeroes weights but leaves every layer as wide as before, so a pruned model costs as
much to run as a dense one. :func:`compact` traces any pure function of params to a jaxpr
(``program``), finds every unit that cannot change its outputs (``analysis``:
units with no live outgoing weight, and units with no live incoming weight, whose constant
value is folded into the next linear op), and returns a program that computes the same
outputs on smaller arrays, with params cut to match.
"""

from __future__ import annotations

import functools

import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax._src.compact import analysis as analysis
from flipout_jax._src.compact import report as report_lib
from flipout_jax._src.compact import run as run_lib
from flipout_jax._src import prune as prune_lib
from flipout_jax._src import update_check
from flipout_jax._src.compact.program import Program, evaluate_compiled, trace

CompactionReport = report_lib.CompactionReport
LayerCompaction = report_lib.LayerCompaction


class Compacted(NamedTuple):
  """A compacted function of params (see :func:`compact`).

  Attributes:
    params: the compact params: the tree structure of the original params, smaller leaves.
    apply: ``apply(params, *args)``, a pure function with the outputs of the original
      ``apply_fn(original_params, *args)``; jit-able, differentiable and exportable.
    shrink: maps any tree holding trees shaped like the original params (momentum, Adam
      moments, ``PruneState`` masks and flip counts) to the same tree cut like ``params``.
    report: per linear op, widths, parameters and FLOPs before and after, and which ops kept
      units that carry nothing.
    kept: a tree shaped like the params; at each leaf, per axis, the indices (NumPy int
      arrays) of the original positions that compaction kept: which units survive.
  """

  params: Any
  apply: Callable
  shrink: Callable
  report: report_lib.CompactionReport
  kept: Any


def _is_nnx_module(value: Any) -> bool:
  # Without importing flax, which the library does not depend on.
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(value, nnx.Module)


def _cutter(
    params_tree: run_lib.TreeDef,
    keeps: Sequence[run_lib.Rows | None],
    shapes: Sequence[tuple[int, ...]],
) -> Callable[[Any], Any]:
  """``shrink``: cuts every subtree shaped like the params."""

  def cut_params(node: Any) -> Any:
    leaves = params_tree.flatten_up_to(node)
    cut = []
    for path_index, (leaf, rows, shape) in enumerate(zip(leaves, keeps, shapes)):
      if leaf is None or rows is None or np.shape(leaf) != tuple(shape):
        if leaf is not None and rows is not None and np.size(leaf) > 1:
          raise ValueError(
              f"shrink: leaf {path_index} has shape {np.shape(leaf)}, not the shape of the "
              f"param it stands for {tuple(shape)}"
          )
        cut.append(leaf)
      else:
        cut.append(run_lib.cut(leaf, rows))
    return params_tree.unflatten(cut)

  def matches(node: Any) -> bool:
    try:
      params_tree.flatten_up_to(node)
    except (ValueError, TypeError):
      return False
    return True

  def cut(node: Any) -> Any:
    if isinstance(node, prune_lib.PruneState):
      return _cut_prune_state(node, cut_params)
    return cut_params(node) if matches(node) else node

  def shrink(tree: Any) -> Any:
    is_node = lambda n: isinstance(n, prune_lib.PruneState) or matches(n)
    return cut(tree) if is_node(tree) else jax.tree.map(cut, tree, is_leaf=is_node)

  return shrink


def _cut_prune_state(
    state: prune_lib.PruneState, cut_params: Callable[[Any], Any]
) -> prune_lib.PruneState:
  """A ``PruneState`` with its masks and flip counts cut, and its sample of the last update
  (taken at the dense sizes) replaced by one that checks nothing at the next update."""
  masks, flips = cut_params(state.masks), cut_params(state.flips)
  sample = state.last_update
  if sample is not None:
    shapes = [
        jnp.zeros(np.shape(m), b.dtype) for m, b in zip(jax.tree.leaves(masks), sample.before)
    ]
    sample = update_check.empty(shapes)
  return state._replace(masks=masks, flips=flips, last_update=sample)


def _absorb(params: Any, plan: analysis.Plan) -> Any:
  """Compact ``params`` with the absorbed constants added to their biases and means."""
  leaves, params_tree = jax.tree.flatten(params)
  for position, (leaf, sign) in plan.absorbed.items():
    shift = np.asarray(plan.folds[position], np.float64).reshape(-1)
    leaves[leaf] = jnp.asarray(
        np.asarray(leaves[leaf], np.float64) + sign * shift, leaves[leaf].dtype
    )
  return jax.tree.unflatten(params_tree, leaves)


class _Round(NamedTuple):
  """One analysis round: the program traced, its plan, and the functions it makes."""

  program: Program
  plan: analysis.Plan
  shrink: Callable[[Any], Any]
  apply: Callable[..., Any]
  keeps: Sequence[run_lib.Rows | None]


def _compact_once(
    apply_fn: Callable[..., Any],
    params: Any,
    args: tuple[Any, ...],
    batch_axis: int | None,
    constants: str,
    round_to: int = 1,
) -> _Round:
  param_leaves, params_tree = jax.tree.flatten(params)
  arg_leaves = jax.tree.leaves(args)
  program = trace(apply_fn, params, *args)
  inputs = [*param_leaves, *arg_leaves]
  values = evaluate_compiled(program, inputs, analysis.values_read(program))
  plan = analysis.analyse(program, values, len(param_leaves), batch_axis, constants, round_to)
  keeps = [plan.keep.get(index) for index in program.inputs[: len(param_leaves)]]
  shapes = [np.shape(leaf) for leaf in param_leaves]
  shrink = _cutter(params_tree, keeps, shapes)
  # Weak types kept: a retrace must see the params as the analysed program did (a bias made by
  # ``jnp.full((n,), 0.1)`` is weakly typed, and a strong one traces to other equations).
  shapes_dtypes = [
      jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), weak_type=run_lib.weak(x))
      for x in param_leaves
  ]
  apply = run_lib.make_apply(apply_fn, program, plan, params_tree, shapes_dtypes, batch_axis)
  return _Round(program, plan, shrink, apply, keeps)


def _check_arguments(
    apply_fn: Any, params: Any, batch_axis: Any, constants: Any, max_rounds: Any, round_to: Any
) -> None:
  """Refuses :func:`compact`'s arguments out of range, naming each."""
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  if batch_axis is not None and (not isinstance(batch_axis, int) or batch_axis < 0):
    raise ValueError(f"batch_axis must be None or an int >= 0, got {batch_axis!r}")
  if constants not in ("program", "params"):
    raise ValueError(f"constants must be 'program' or 'params', got {constants!r}")
  if not isinstance(max_rounds, int) or max_rounds < 1:
    raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
  if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
    raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
  if _is_nnx_module(params):
    raise TypeError(
        f"params is a flax.nnx module ({type(params).__name__}), not its params: pass its "
        "state, graphdef, state = nnx.split(model); flipout.compact(lambda state, x: "
        "nnx.merge(graphdef, state)(x), state, x)"
    )
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      raise TypeError(
          f"params leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array"
      )


def compact(
    apply_fn: Callable,
    params: Any,
    *example_args: Any,
    batch_axis: int | None = 0,
    constants: str = "program",
    max_rounds: int = 8,
    round_to: int = 1,
) -> Compacted:
  """Removes every unit of ``apply_fn``'s model that cannot change its outputs.

  ``apply_fn(params, *args)`` is any pure JAX function (``nnx.merge(graphdef, state)(x)``,
  ``module.apply({"params": p}, x)``, ``eqx.combine(p, static)(x)``, plain ``jnp`` code);
  pruned weights are the exact zeros of ``params``. Units are positions along the feature
  axes of the values flowing between ops, followed through elementwise ops, broadcasts,
  reshapes, transposes, concatenations, pooling, contractions, grouped convolutions,
  embedding lookups and loops (``flipout_jax/_src/compact/README.md`` says how). A unit goes
  when nothing the outputs depend on reads it (its outgoing weights are zero), or when it
  does not depend on the input (its incoming weights are zero): its constant value is then
  folded exactly into the next linear op. Units coupled across ops (a residual stream, a
  concatenation, a parameter read twice) go only together; an op that mixes along an axis
  other than through the linear ops (LayerNorm's mean, softmax, an unknown primitive) keeps
  every unit on that axis, and the report says which op kept what. The analysis repeats on
  its result until a round removes nothing.

  Example::

    compacted = flipout.compact(apply_fn, params, x)
    y = compacted.apply(compacted.params, x)  # == apply_fn(params, x)

  Args:
    apply_fn: ``apply_fn(params, *args)``, a pure function.
    params: a pytree of arrays; pruned weights exactly zero.
    *example_args: arguments to trace with; the analysis runs the model once on them (a
      small batch suffices: the result does not depend on their values).
    batch_axis: the axis of every argument leaf whose size may change between calls of
      ``compacted.apply`` (a new size retraces; a symbolic one, under ``jax.export``,
      replays the program, elementwise along it); None: shapes are fixed.
    constants: where removed units' constants go. ``"program"``: into a bias or norm
      offset of the params where one takes it, else into ``compacted.apply`` as a constant.
      ``"params"``: only into params (units whose constant none takes are kept), so that
      ``compacted.params`` in the model's own code at the compact widths is the same model.
    max_rounds: most analysis rounds.
    round_to: every width that shrinks is rounded up to a multiple of it (removable units
      kept back; the outputs are the same), as matrix units run tiles of 8, 16 or 128
      faster than ragged widths. 1: no rounding. BENCHMARKS.md section 12 measures it.

  Returns:
    The :class:`Compacted` params, apply function, report and ``shrink`` (an optimizer
    state cut to the compact widths continues training).

  Raises:
    TypeError: ``apply_fn`` is not callable, or a params leaf is not an array.
    ValueError: ``batch_axis``, ``constants``, ``max_rounds`` or ``round_to`` is out of range.
  """
  _check_arguments(apply_fn, params, batch_axis, constants, max_rounds, round_to)
  programs: list[Program] = []  # each round's trace
  shrinks: list[Callable[[Any], Any]] = []
  apply, current, rounds = apply_fn, params, 0
  leaves, params_tree = jax.tree.flatten(params)
  kept = [tuple(np.arange(size) for size in np.shape(leaf)) for leaf in leaves]
  for _ in range(max_rounds):
    program, plan, shrink, next_apply, keeps = _compact_once(
        apply, current, example_args, batch_axis, constants, round_to
    )
    programs.append(program)
    if not plan.keep:  # removes nothing: the fixed point, and ``program`` is its trace
      final_program = program
      break
    kept = [_kept_after(indices, rows) for indices, rows in zip(kept, keeps)]
    shrinks.append(shrink)
    apply, current, rounds = next_apply, _absorb(shrink(current), plan), rounds + 1
  else:
    final_program = trace(apply, current, *example_args)

  arg_leaves = jax.tree.leaves(example_args)
  examples = 1 if batch_axis is None or not arg_leaves else np.shape(arg_leaves[0])[batch_axis]
  report = report_lib.build(programs[0], final_program, params, current, plan, rounds, examples)
  kept_tree = jax.tree.unflatten(params_tree, kept)
  return Compacted(current, apply, functools.partial(_shrink_all, shrinks), report, kept_tree)


def _shrink_all(shrinks: list[Callable[[Any], Any]], tree: Any) -> Any:
  """``tree`` through every round's shrink."""
  for shrink in shrinks:
    tree = shrink(tree)
  return tree


def _kept_after(indices: tuple, rows: Any) -> tuple:
  """Per axis, the original positions a leaf keeps after a round cut ``rows`` of them."""
  if rows is None:
    return indices
  return tuple(i if r is None else i[r] for i, r in zip(indices, rows))
