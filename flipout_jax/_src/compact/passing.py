"""Links of ops that no unit rule covers but that are elementwise along some of their axes.

An embedding lookup (``gather``), ``sort``, ``top_k``, ``dynamic_slice`` and ``split`` treat
every position along some axes independently: the rows a lookup's indices select, the axes a
sort does not sort along. Those axes are linked like an elementwise op's (``Unify``), so the
batch axis passes through them (``compacted.apply`` takes other batch sizes) and units pass
where the op moves them whole (an embedding table's model dims follow the stream it feeds).
Every other axis of theirs is pinned, with the reason in the user's words.

Their forward and backward stay ``rules``' default (every position varies and is
read), an over-approximation: a unit through them goes only where nothing downstream reads
it, never because of a constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flipout_jax._src.compact import rules as rules
from flipout_jax._src.compact.program import Aval, Eqn, Literal, value_id

PASSING = frozenset(("gather", "sort", "top_k", "dynamic_slice", "split", "iota"))

# ``arange`` along an axis: cutting positions there would renumber them, but a new size of the
# batch axis is ``arange`` of that size, so it does not keep the program from a replay.
IOTA_REASON = "iota (arange) along its axis"


def _operands(eqn: Eqn) -> list[int]:
  return [x for x in eqn.inputs if not isinstance(x, Literal)]


def _same_shape_links(eqn: Eqn, avals: Sequence[Aval], mixed: int, reason: str) -> list[rules.Fact]:
  """Ops whose operands and outputs share a shape up to axis ``mixed`` (sort, top_k): every
  other axis is one unit across all of them."""
  values = [*_operands(eqn), *eqn.outputs]
  first = values[0]
  facts: list[rules.Fact] = []
  for d in range(len(avals[first].shape)):
    if d == mixed:
      facts += [rules.Pin((x, d), reason) for x in values]
    else:
      facts += [rules.Unify((first, d), (x, d)) for x in values[1:]]
  return facts


def _gather_links(eqn: Eqn, avals: Sequence[Aval]) -> list[rules.Fact]:
  """``operand[indices]``: the indices' axes are the output's batch axes, the operand's axes
  it takes whole (not indexed) are its offset axes; the rows it indexes are pinned."""
  operand, indices = (value_id(x) for x in eqn.inputs)
  out = eqn.outputs[0]
  numbers = eqn.params["dimension_numbers"]
  sizes = eqn.params["slice_sizes"]
  shape = avals[operand].shape
  facts: list[rules.Fact] = []
  offset_sources = [
      d
      for d in range(len(shape))
      if d not in numbers.collapsed_slice_dims and d not in numbers.operand_batching_dims
  ]
  for out_axis, d in zip(numbers.offset_dims, offset_sources):
    if d in numbers.start_index_map or sizes[d] != shape[d]:
      facts += [
          rules.Pin((operand, d), "indexing (gather) along this axis"),
          rules.Pin((out, out_axis), "indexing (gather) along this axis"),
      ]
    else:
      facts.append(rules.Unify((out, out_axis), (operand, d)))
  reason = "the rows an indexing (gather, an embedding lookup) selects"  # never units
  facts += [
      rules.Pin((operand, d), reason, report=False)
      for d in range(len(shape))
      if d not in offset_sources or d in numbers.start_index_map
  ]
  batch_axes = [d for d in range(len(avals[out].shape)) if d not in numbers.offset_dims]
  index_axes = list(range(len(avals[indices].shape) - 1))  # jax puts the index vector last
  facts += [rules.Unify((out, o), (indices, i)) for o, i in zip(batch_axes, index_axes)]
  facts.append(rules.Pin((indices, len(avals[indices].shape) - 1), "gather's index vector"))
  facts += [
      rules.Unify((operand, o), (indices, i))
      for o, i in zip(numbers.operand_batching_dims, numbers.start_indices_batching_dims)
  ]
  return facts


def _dynamic_slice_links(eqn: Eqn, avals: Sequence[Aval]) -> list[rules.Fact]:
  """An axis taken whole (its start index is then 0 whatever it says) passes."""
  operand, out = value_id(eqn.inputs[0]), eqn.outputs[0]
  facts: list[rules.Fact] = []
  for d, (size, taken) in enumerate(zip(avals[operand].shape, eqn.params["slice_sizes"])):
    if size == taken:
      facts.append(rules.Unify((out, d), (operand, d)))
    else:
      facts += [rules.Pin((x, d), f"dynamic_slice along axis {d}") for x in (operand, out)]
  return facts


def _split_links(eqn: Eqn, avals: Sequence[Aval]) -> list[rules.Fact]:
  """``jnp.split``: each output is a run of the operand's positions along ``axis``."""
  operand, axis = value_id(eqn.inputs[0]), eqn.params["axis"]
  facts: list[rules.Fact] = []
  offset = 0
  for out in eqn.outputs:
    for d in range(len(avals[out].shape)):
      facts.append(rules.Unify((out, d), (operand, d), offset if d == axis else 0))
    offset += avals[out].shape[axis]
  return facts


def links(eqn: Eqn, avals: Sequence[Aval]) -> list[rules.Fact]:
  """The facts of an op in ``PASSING``."""
  name = eqn.primitive.name
  if name == "gather":
    return _gather_links(eqn, avals)
  if name == "sort":
    return _same_shape_links(eqn, avals, eqn.params["dimension"], "sort along its axis")
  if name == "top_k":
    rank = len(avals[value_id(eqn.inputs[0])].shape)
    axis = eqn.params.get("axis", rank - 1)
    return _same_shape_links(eqn, avals, axis % rank, "top_k along its axis")
  if name == "dynamic_slice":
    return _dynamic_slice_links(eqn, avals)
  if name == "iota":
    return [rules.Pin((eqn.outputs[0], eqn.params["dimension"]), IOTA_REASON, report=False)]
  return _split_links(eqn, avals)


def resized_params(
    eqn: Eqn, params: dict[str, Any], dense: Sequence[tuple[int, ...]], new: Sequence[Any]
) -> dict[str, Any]:
  """``params`` of a ``PASSING`` op whose sizes follow its values' compact (or replayed)
  sizes: ``dense`` and ``new`` are the shapes of its operands then outputs, before and now."""
  name = eqn.primitive.name
  if name in ("gather", "dynamic_slice"):
    # An axis taken whole stays whole: its slice size is the operand's new size.
    sizes = [
        new[0][d] if taken == dense[0][d] else taken
        for d, taken in enumerate(params["slice_sizes"])
    ]
    return dict(params, slice_sizes=tuple(sizes))
  if name == "split":
    outs = new[len(eqn.inputs) :]
    return dict(params, sizes=tuple(shape[params["axis"]] for shape in outs))
  return params
