"""What compaction saved: per linear op, widths, parameters and FLOPs before and after."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from flipout_jax._src.compact import analysis as analysis
from flipout_jax._src.compact import rules as rules
from flipout_jax._src.compact.program import Atom, Eqn, Literal, Program

# Ops through which a linear op's operand is still "the parameter" (a kernel transposed,
# reshaped or cast before use).
_PASS_THROUGH = frozenset(("transpose", "reshape", "convert_element_type", "copy", "copy_p"))


class LayerCompaction(NamedTuple):
  """One linear op (``dot_general`` or ``conv_general_dilated``) before and after.

  Attributes:
    name: the path of the parameter it multiplies (``keystr``), or ``op@index``.
    kind: ``"dense"`` or ``"conv"``.
    in_features: contracted input width (dense, compact).
    out_features: output width (dense, compact).
    parameters: size of its parameter operand (dense, compact); 0 when it has none.
    flops: multiply-adds times two per example (dense, compact).
  """

  name: str
  kind: str
  in_features: tuple[int, int]
  out_features: tuple[int, int]
  parameters: tuple[int, int]
  flops: tuple[int, int]


class CompactionReport(NamedTuple):
  """The result of :func:`flipout_jax.compact` in numbers.

  Attributes:
    layers: one :class:`LayerCompaction` per linear op, in execution order.
    parameters: total params size (dense, compact).
    rounds: analysis rounds that removed something.
    kept_by: per op that mixes along an axis (or an argument or output), the number of
      positions it kept that carry nothing (no live input or no reader).
  """

  layers: tuple[LayerCompaction, ...]
  parameters: tuple[int, int]
  rounds: int
  kept_by: dict[str, int]

  def __str__(self) -> str:
    rows: list[tuple[str, ...]] = [("layer", "in", "out", "params", "FLOPs/example")]
    for layer in self.layers:
      cells = (layer.in_features, layer.out_features, layer.parameters, layer.flops)
      rows.append((layer.name, *(f"{dense:,} -> {compact:,}" for dense, compact in cells)))
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    dense, compact = self.parameters
    lines.append(f"parameters: {dense:,} -> {compact:,} ({compact / max(dense, 1):.2%})")
    lines += [
        f"kept {count} positions that carry nothing (no live input or no reader), because of: "
        f"{reason}"
        for reason, count in self.kept_by.items()
    ]
    return "\n".join(lines)


def _param_names(program: Program, params: Any) -> dict[int, str]:
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  return dict(zip(program.inputs, paths))


def _source(program: Program, producers: dict[int, Eqn], index: Atom) -> Atom:
  """The value ``index`` is a pass-through of (a parameter behind a transpose or cast)."""
  while not isinstance(index, Literal) and index in producers:
    eqn = producers[index]
    if eqn.primitive.name not in _PASS_THROUGH:
      break
    index = eqn.inputs[0]
  return index


_Layer = tuple[str, str, int, int, int, int]  # name, kind, in, out, parameters, flops


def _layers(program: Program, params: Any, examples: int) -> list[_Layer]:
  """(name, kind, in, out, parameters, flops) of each linear op of ``program``."""
  names = _param_names(program, params)
  producers = {out: eqn for eqn in program.eqns for out in eqn.outputs}
  found = []
  for position, eqn in enumerate(program.eqns):
    if eqn.primitive.name not in rules.LINEAR:
      continue
    lhs, rhs = (rules.shape_of(program.avals, x) for x in eqn.inputs)
    sources = [_source(program, producers, x) for x in eqn.inputs]
    owner = next((k for k, s in enumerate(sources) if s in names), 1)
    out = program.avals[eqn.outputs[0]].shape
    if eqn.primitive.name == "dot_general":
      (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
      contracted = int(np.prod([lhs[d] for d in lhs_c]))
      own = (lhs, lhs_c, lhs_b) if owner == 0 else (rhs, rhs_c, rhs_b)
      free = [size for d, size in enumerate(own[0]) if d not in (*own[1], *own[2])]
      width, per_output = int(np.prod(free)), contracted
      kind = "dense"
    else:
      lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
      contracted = rhs[rhs_spec[1]]
      width = rhs[rhs_spec[0]]
      per_output = contracted * int(np.prod([rhs[d] for d in rhs_spec[2:]]))
      kind = "conv"
    source = sources[owner]
    if isinstance(source, Literal) or source not in names:
      name, size = f"{eqn.primitive.name}@{position}", 0
    else:
      name, size = names[source], int(np.prod(program.avals[source].shape))
    flops = 2 * per_output * int(np.prod(out)) // max(examples, 1)
    found.append((name, kind, contracted, width, size, flops))
  return found


def build(
    dense: Program,
    compact: Program,
    params: Any,
    compact_params: Any,
    plan: analysis.Plan,
    rounds: int,
    examples: int,
) -> CompactionReport:
  """The report comparing the ``dense`` and ``compact`` traces of the model (``examples``:
  the batch size they were traced with)."""
  before, after = _layers(dense, params, examples), _layers(compact, compact_params, examples)
  layers = tuple(
      LayerCompaction(b[0], b[1], (b[2], a[2]), (b[3], a[3]), (b[4], a[4]), (b[5], a[5]))
      for b, a in zip(before, after)
  )
  count = lambda tree: sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))
  return CompactionReport(
      layers, (count(params), count(compact_params)), rounds, dict(plan.kept_by)
  )
