"""Per-primitive rules of the compaction analysis: how each op maps, mixes and combines units.

Every axis of every value is a row of positions. For each primitive a rule says:

* ``links``: which operand positions are the same unit as which output positions (``Unify``,
  with an offset for concatenations), which axes it mixes so that no position on them may go
  (``Pin``, with the reason the report shows), which input axes a reshape merges into one
  output axis (``Merge``: a flattened feature is a sub-unit of each of its components) or
  split one input axis into (``Split``: heads from features, the mirror image), which axes a linear op contracts (``Contract``: there a removed constant is folded), and
  which blocks of positions go only together (``Blocks``: a grouped convolution's groups).
* ``forward``: which positions vary with the model's input. Variation is tracked as a product
  of per-axis masks (``Axes``: one bool array per axis, or None for a value that does not
  depend on the input at all), a sound over-approximation: the elements that vary lie in the
  product of the per-axis sets.
* ``backward``: which positions the outputs depend on, in the same product form.

The linear ops (``LINEAR``) have their forward and backward in ``linear``, computed
from the concrete values; a convolution has its links there too. Primitives without a rule
mix every axis: all their positions are pinned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from flipout_jax._src.compact import reshapes
from flipout_jax._src.compact.program import Atom, Aval, Eqn, Literal, value_id

Mask: TypeAlias = npt.NDArray[np.bool_]
# Per-axis bool masks, or None: nothing varies (forward) / is read (backward).
Axes: TypeAlias = list[Mask] | None
Where: TypeAlias = tuple[int, int]  # (value id, axis)


class Unify(NamedTuple):
  """Positions ``offset + i`` of ``(value, axis)`` ``second`` are the unit at ``i`` of ``first``."""

  first: Where
  second: Where
  offset: int = 0


class Pin(NamedTuple):
  """Every position of ``(value, axis)`` is kept; ``reason`` names the op. ``report``: whether
  the report counts what it keeps (not for positions that are never units, such as the rows
  of an embedding table)."""

  where: Where
  reason: str
  report: bool = True


class Merge(NamedTuple):
  """A reshape flattening ``source`` axes ``axes`` into ``target`` axis ``axis``."""

  source: int
  axes: tuple[int, ...]
  target: int
  axis: int


class Split(NamedTuple):
  """A reshape splitting ``source`` axis ``axis`` into ``target`` axes ``axes`` (heads from a
  feature axis): each feature of ``axis`` is a sub-unit of each of its components, and the
  features kept are exactly the product of the components kept (no gather can add any)."""

  source: int
  axis: int
  target: int
  axes: tuple[int, ...]


class Contract(NamedTuple):
  """Operand ``operand`` of equation ``eqn`` is summed over along ``axis`` by a linear op."""

  eqn: int
  operand: int
  axis: int


class Blocks(NamedTuple):
  """Position ``i`` of ``first`` and ``j`` of ``second`` are one unit when ``i // first_size
  == j // second_size`` (a grouped convolution's groups); one block at least stays."""

  first: Where
  first_size: int
  second: Where
  second_size: int


Fact: TypeAlias = Unify | Pin | Merge | Split | Contract | Blocks


def _where(atom: Atom, axis: int) -> Where:
  """``(value id, axis)`` of an operand's axis (a literal, a scalar, has none)."""
  return (value_id(atom), axis)


ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag
integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow
real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan
tanh xor
""".split())
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin".split()
)
_WINDOWED = frozenset("reduce_window_sum reduce_window_max reduce_window_min reduce_window".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())


def shape_of(avals: Sequence[Aval], atom: Atom) -> tuple[int, ...]:
  """The shape of an operand (a literal's: a scalar's)."""
  return () if isinstance(atom, Literal) else tuple(avals[atom].shape)


def full_mask(shape: Sequence[int], axes: Axes) -> Mask:
  """The product mask of ``axes`` as a bool array of ``shape``."""
  if axes is None:
    return np.zeros(shape, bool)
  mask = np.ones(shape, bool)
  for axis, row in enumerate(axes):
    mask = mask & row.reshape([-1 if d == axis else 1 for d in range(len(shape))])
  return mask


def any_over(array: npt.NDArray[Any], axis: int | tuple[int, ...]) -> Mask:
  """``array.any(axis=axis)``: an array where ``axis`` leaves an axis (numpy's stubs type the
  reduction as possibly a scalar)."""
  return np.asarray(array.any(axis=axis))


def project(mask: Mask) -> Axes:
  """The smallest product of per-axis masks containing ``mask``'s True elements."""
  if not mask.any():
    return None
  dims = range(mask.ndim)
  return [any_over(mask, tuple(d for d in dims if d != axis)) for axis in dims]


def _everything(shape: Sequence[int], flag: bool | None) -> Axes:
  return None if flag is None else [np.ones(size, bool) for size in shape]


def _union(shape: Sequence[int], contributions: Iterable[Axes]) -> Axes:
  """The product hull of several ``Axes`` of one shape (None entries ignored)."""
  present = [axes for axes in contributions if axes is not None]
  if not present:
    return None
  return [np.logical_or.reduce([axes[d] for axes in present]) for d in range(len(shape))]


def _fit(size: int, row: Mask) -> Mask:
  """``row`` (a mask of one axis) stretched to ``size`` when it is a broadcast size-1 axis."""
  return row if row.size == size else np.full(size, row.any())


# ---------------------------------------------------------------------------------------------
# Links.
# ---------------------------------------------------------------------------------------------


def _empty_reshape_links(
    eqn: Eqn, avals: Sequence[Aval], out: int, source: Sequence[int], target: Sequence[int]
) -> list[Fact]:
  """An empty or reordered reshape pins its axes, except a leading run of equal non-zero
  sizes, the same axes on both sides in row-major order: flattening a layer left with no
  channel, ``(batch, h, w, 0) -> (batch, 0)``, still carries the batch axis (without it a
  compact model whose outputs are reached only that way took no other batch size)."""
  reason = "reshape of an empty or reordered value"
  if eqn.params.get("dimensions") is not None or isinstance(eqn.inputs[0], Literal):
    return _pin_all(eqn, avals, reason)
  prefix = 0
  while prefix < min(len(source), len(target)) and source[prefix] == target[prefix] != 0:
    prefix += 1
  return [
      *(Unify((out, d), _where(eqn.inputs[0], d)) for d in range(prefix)),
      *(Pin(_where(eqn.inputs[0], d), reason) for d in range(prefix, len(source))),
      *(Pin((out, d), reason) for d in range(prefix, len(target))),
  ]


def _pin_all(eqn: Eqn, avals: Sequence[Aval], reason: str) -> list[Fact]:
  atoms = [x for x in eqn.inputs if not isinstance(x, Literal)] + list(eqn.outputs)
  return [Pin((x, d), reason) for x in atoms for d in range(len(avals[x].shape))]


def _elementwise_links(eqn: Eqn, avals: Sequence[Aval], out: int) -> list[Fact]:
  links: list[Fact] = []
  shape = avals[out].shape
  for x in eqn.inputs:
    if isinstance(x, Literal) or len(avals[x].shape) != len(shape):
      continue
    for d, size in enumerate(avals[x].shape):
      if size == shape[d]:
        links.append(Unify((out, d), (x, d)))
      else:
        links.append(Pin((x, d), f"{eqn.primitive.name} broadcasting a size-1 axis"))
  return links


def _axis_is_passed(eqn: Eqn, d: int, size: int) -> bool:
  """Whether a windowed, padding or slicing op leaves axis ``d`` (of ``size``) unchanged."""
  p = eqn.params
  name = eqn.primitive.name
  if name in _CUMULATIVE:
    return d != p["axis"]
  if name in _WINDOWED:
    ones = lambda key: tuple(p.get(key) or (1,) * (d + 1))[d] == 1
    return (
        p["window_dimensions"][d] == 1
        and p["window_strides"][d] == 1
        and tuple(p["padding"][d]) == (0, 0)
        and ones("base_dilation")
        and ones("window_dilation")
    )
  if name == "pad":
    return tuple(p["padding_config"][d]) == (0, 0, 0)
  if name == "slice":
    stride = (p["strides"] or (1,) * (d + 1))[d]
    return p["start_indices"][d] == 0 and p["limit_indices"][d] == size and stride == 1
  return False


def links(index: int, eqn: Eqn, avals: Sequence[Aval]) -> list[Fact]:
  """The ``Unify``, ``Pin``, ``Merge`` and ``Contract`` facts of equation ``index`` (not for a
  convolution: ``linear.conv_links``)."""
  name = eqn.primitive.name
  p = eqn.params
  ins = eqn.inputs
  out = eqn.outputs[0]
  out_shape = avals[out].shape
  if name in ELEMENTWISE:
    return _elementwise_links(eqn, avals, out)
  source_shape = shape_of(avals, ins[0]) if ins else ()
  result: list[Fact] = []
  if name == "broadcast_in_dim":
    for d, target in enumerate(p["broadcast_dimensions"]):
      if source_shape[d] == out_shape[target]:
        result.append(Unify((out, target), _where(ins[0], d)))
      else:
        result.append(Pin(_where(ins[0], d), "broadcast_in_dim of a size-1 axis"))
    return result
  if name == "reshape":
    groups = reshapes.reshape_groups(source_shape, out_shape)
    if groups is None or p.get("dimensions") is not None:
      return _empty_reshape_links(eqn, avals, out, source_shape, out_shape)
    grouped_in = {d for group_in, _ in groups for d in group_in}
    grouped_out = {d for _, group_out in groups for d in group_out}
    reason = "reshape adding or removing a size-1 axis"
    result += [
        Pin(_where(ins[0], d), reason) for d in range(len(source_shape)) if d not in grouped_in
    ]
    result += [Pin((out, d), reason) for d in range(len(out_shape)) if d not in grouped_out]
    for group_in, group_out in groups:
      if len(group_in) == 1 and len(group_out) == 1:
        result.append(Unify((out, group_out[0]), _where(ins[0], group_in[0])))
      elif len(group_out) == 1:
        result.append(Merge(value_id(ins[0]), group_in, out, group_out[0]))
      elif len(group_in) == 1:
        result.append(Split(value_id(ins[0]), group_in[0], out, group_out))
      else:
        reason = "reshape splitting an axis"
        result += [Pin(_where(ins[0], d), reason) for d in group_in]
        result += [Pin((out, d), reason) for d in group_out]
    return result
  if name == "transpose":
    return [Unify((out, d), _where(ins[0], source)) for d, source in enumerate(p["permutation"])]
  if name == "squeeze":
    kept = [d for d in range(len(source_shape)) if d not in p["dimensions"]]
    return [Unify((out, d), _where(ins[0], source)) for d, source in enumerate(kept)]
  if name == "concatenate":
    offset, axis = 0, p["dimension"]
    for x in ins:
      for d in range(len(out_shape)):
        result.append(Unify(_where(x, d), (out, d), offset if d == axis else 0))
      offset += shape_of(avals, x)[axis]
    return result
  if name in _REDUCTIONS:
    kept = [d for d in range(len(source_shape)) if d not in p["axes"]]
    result += [Pin(_where(ins[0], d), f"{name} over axis {d}") for d in p["axes"]]
    return result + [Unify((out, d), _where(ins[0], source)) for d, source in enumerate(kept)]
  if name in _WINDOWED | _CUMULATIVE | {"pad", "slice"}:
    same_rank = [x for x in ins if len(shape_of(avals, x)) == len(out_shape)]
    for d, size in enumerate(source_shape):
      if _axis_is_passed(eqn, d, size):
        result += [Unify((out, d), _where(x, d)) for x in same_rank]
      else:
        reason = f"{name} along axis {d}"
        result += [Pin(_where(x, d), reason) for x in same_rank]
        result.append(Pin((out, d), reason))
    return result
  if name == "dot_general":
    (lhs_c, rhs_c), (lhs_b, rhs_b) = p["dimension_numbers"]
    lhs, rhs = (value_id(x) for x in ins)
    result += [Unify((lhs, a), (rhs, b)) for a, b in zip(lhs_c, rhs_c)]
    result += [Contract(index, 0, a) for a in lhs_c] + [Contract(index, 1, b) for b in rhs_c]
    result += [Unify((out, k), (lhs, a)) for k, a in enumerate(lhs_b)]
    result += [Unify((out, k), (rhs, b)) for k, b in enumerate(rhs_b)]
    lhs_free = [d for d in range(len(avals[lhs].shape)) if d not in (*lhs_c, *lhs_b)]
    rhs_free = [d for d in range(len(avals[rhs].shape)) if d not in (*rhs_c, *rhs_b)]
    free = [(lhs, d) for d in lhs_free] + [(rhs, d) for d in rhs_free]
    return result + [Unify((out, len(lhs_b) + k), where) for k, where in enumerate(free)]
  return _pin_all(eqn, avals, f"{name} (no compaction rule)")


# ---------------------------------------------------------------------------------------------
# Forward (what varies) and backward (what is read) for the shape-mapping primitives.
# ---------------------------------------------------------------------------------------------


def _map_forward(eqn: Eqn, avals: Sequence[Aval], axes_in: Sequence[Axes]) -> Axes:
  """Output variation of the ops that move positions without summing them (None: not one)."""
  name = eqn.primitive.name
  p = eqn.params
  ins = eqn.inputs
  shape = avals[eqn.outputs[0]].shape
  if name in ELEMENTWISE:
    contributions: list[Axes] = []
    for axes in axes_in:
      if axes is None:
        continue
      if not axes:  # a varying scalar varies everything
        contributions.append(_everything(shape, True))
      else:
        contributions.append([_fit(shape[d], axes[d]) for d in range(len(shape))])
    return _union(shape, contributions)
  if name == "concatenate":
    axis = p["dimension"]
    rows = [full if axes is None else axes for axes, full in zip(axes_in, _zeros(avals, ins))]
    if all(axes is None for axes in axes_in):
      return None
    return [
        np.concatenate([r[d] for r in rows])
        if d == axis
        else np.logical_or.reduce([r[d] for r in rows])
        for d in range(len(shape))
    ]
  first = axes_in[0]
  if first is None:
    return None
  if name == "broadcast_in_dim":
    result = [np.ones(size, bool) for size in shape]
    for d, target in enumerate(p["broadcast_dimensions"]):
      result[target] = _fit(shape[target], first[d])
    return result
  if name == "reshape":
    return _regroup(shape_of(avals, ins[0]), shape, first)
  if name == "transpose":
    return [first[source] for source in p["permutation"]]
  if name == "squeeze":
    return [row for d, row in enumerate(first) if d not in p["dimensions"]]
  if name in _REDUCTIONS:
    return [row for d, row in enumerate(first) if d not in p["axes"]]
  if name == "slice":
    stride = p["strides"] or (1,) * len(shape)
    return [
        row[start:limit:step]
        for row, start, limit, step in zip(first, p["start_indices"], p["limit_indices"], stride)
    ]
  if name in _WINDOWED | _CUMULATIVE | {"pad"}:
    source = shape_of(avals, ins[0])
    passed = [_axis_is_passed(eqn, d, size) for d, size in enumerate(source)]
    return [first[d] if passed[d] else np.ones(size, bool) for d, size in enumerate(shape)]
  return _everything(shape, True)


def _zeros(avals: Sequence[Aval], ins: Sequence[Atom]) -> list[list[Mask]]:
  return [[np.zeros(size, bool) for size in shape_of(avals, x)] for x in ins]


def _regroup(source: Sequence[int], target: Sequence[int], axes: list[Mask]) -> Axes:
  """Per-axis masks of ``source`` carried through a reshape to ``target`` (exact per group)."""
  groups = reshapes.reshape_groups(source, target)
  if groups is None:
    return _everything(target, True)
  result = [np.ones(size, bool) for size in target]
  for group_in, group_out in groups:
    grid = full_mask([source[d] for d in group_in], [axes[d] for d in group_in])
    moved = project(grid.reshape([target[d] for d in group_out]))
    if moved is None:
      return None
    for d, row in zip(group_out, moved):
      result[d] = row
  return result


def _map_backward(eqn: Eqn, avals: Sequence[Aval], axes_out: Axes) -> list[Axes]:
  """Per operand, the positions the output reads (the ops of ``_map_forward``)."""
  name = eqn.primitive.name
  p = eqn.params
  ins = eqn.inputs
  shapes = [shape_of(avals, x) for x in ins]
  if axes_out is None:
    return [None for _ in ins]
  if name in ELEMENTWISE:
    return [[_fit(size, axes_out[d]) for d, size in enumerate(shape)] for shape in shapes]
  shape = shapes[0]
  if name == "broadcast_in_dim":
    return [[_fit(shape[d], axes_out[t]) for d, t in enumerate(p["broadcast_dimensions"])]]
  if name == "reshape":
    return [_regroup(avals[eqn.outputs[0]].shape, shape, axes_out)]
  if name == "transpose":
    inverse = np.argsort(p["permutation"])
    return [[axes_out[k] for k in inverse]]
  if name == "squeeze":
    squeezed = iter(axes_out)
    return [
        [np.ones(1, bool) if d in p["dimensions"] else next(squeezed) for d in range(len(shape))]
    ]
  result: list[Axes] = []
  if name == "concatenate":
    axis, offset = p["dimension"], 0
    for s in shapes:
      part = list(axes_out)
      part[axis] = axes_out[axis][offset : offset + s[axis]]
      offset += s[axis]
      result.append(None if not part[axis].any() else part)
    return result
  if name in _REDUCTIONS:
    kept = iter(axes_out)
    return [[np.ones(size, bool) if d in p["axes"] else next(kept) for d, size in enumerate(shape)]]
  if name == "slice":
    stride = p["strides"] or (1,) * len(shape)
    rows = []
    for d, size in enumerate(shape):
      row = np.zeros(size, bool)
      row[p["start_indices"][d] : p["limit_indices"][d] : stride[d]] = axes_out[d]
      rows.append(row)
    result.append(project(full_mask(shape, rows)))
    return result + [[] for _ in ins[1:]]  # the other operands: scalars, read
  if name in _WINDOWED | _CUMULATIVE | {"pad"}:
    for s in shapes:
      if len(s) != len(shape):
        result.append([])  # a scalar operand (init value, padding value) is read
        continue
      passed = [_axis_is_passed(eqn, d, size) for d, size in enumerate(shape)]
      result.append([axes_out[d] if passed[d] else np.ones(size, bool) for d, size in enumerate(s)])
    return result
  return [_everything(s, True) for s in shapes]


LINEAR = frozenset(("dot_general", "conv_general_dilated"))


def forward(eqn: Eqn, avals: Sequence[Aval], axes_in: Sequence[Axes]) -> list[Axes]:
  """Which positions of each output vary with the model's input (not for ``LINEAR`` ops)."""
  name = eqn.primitive.name
  known = name in ELEMENTWISE or name in _MAPPING
  if not known or eqn.primitive.multiple_results:
    return [_everything(avals[x].shape, True) for x in eqn.outputs]
  return [_map_forward(eqn, avals, axes_in)]


def backward(eqn: Eqn, avals: Sequence[Aval], axes_out: Sequence[Axes]) -> list[Axes]:
  """Which positions of each operand the outputs read (not for ``LINEAR`` ops)."""
  name = eqn.primitive.name
  known = name in ELEMENTWISE or name in _MAPPING
  if not known or eqn.primitive.multiple_results:
    read = any(axes is not None for axes in axes_out)
    return [_everything(shape_of(avals, x), True if read else None) for x in eqn.inputs]
  return _map_backward(eqn, avals, axes_out[0])


_MAPPING = (
    frozenset(
        ("broadcast_in_dim", "reshape", "transpose", "squeeze", "concatenate", "slice", "pad")
    )
    | _REDUCTIONS
    | _WINDOWED
    | _CUMULATIVE
)
