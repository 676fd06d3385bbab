"""Variation and reads through the linear ops, computed on host from the concrete values.

A position of a linear op's output varies with the model's input when it sums, through a
live operand element (nonzero, or itself varying), a varying element of the other operand;
the backward direction is the same relation transposed. ``dot_general`` is evaluated exactly
with NumPy's ``einsum`` on 0/1 indicators. A convolution is reduced to its kernel's live
pattern over the taps that ever read the image (a 3x3 kernel on a 1x1 map reads padding only
through its 8 outer taps): exact along the feature axes, every spatial position counted as
varying and read. Neither compiles anything, which keeps the analysis of a VGG19 or a
DenseNet121 to seconds.

A grouped convolution (``feature_group_count`` G) sums group g's input channels only into
group g's output channels, all groups through one kernel input-feature axis: a group is one
unit (``rules.Blocks``: its input channels, the kernel's output features and the output
channels of the group; for a depthwise convolution an input channel and its multiplier's
outputs), removed whole, and the kernel's input-feature axis stays. Its removed constants
reach only its own, removed, outputs, so they fold to nothing there.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from flipout_jax._src.compact import rules as rules
from flipout_jax._src.compact.program import Atom, Aval, Eqn, Values, concrete, value_id

Indicator = npt.NDArray[np.float32]  # 0/1 per element, for einsum
Ids = npt.NDArray[np.intp]


def _live(
    avals: Sequence[Aval], values: Values, x: Atom, axes: rules.Axes
) -> tuple[Indicator, Indicator]:
  """(varying, nonzero-or-varying) indicators of operand ``x`` as float32 arrays."""
  varying = rules.full_mask(rules.shape_of(avals, x), axes)
  return varying.astype(np.float32), ((concrete(values, x) != 0) | varying).astype(np.float32)


def _dot_subscripts(eqn: Eqn, avals: Sequence[Aval]) -> tuple[str, str, str]:
  (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
  lhs, rhs = (len(rules.shape_of(avals, x)) for x in eqn.inputs)
  letters = iter(string.ascii_letters)
  lhs_letters = [next(letters) for _ in range(lhs)]
  shared: list[str | None] = [None] * rhs
  for a, b in zip((*lhs_c, *lhs_b), (*rhs_c, *rhs_b)):
    shared[b] = lhs_letters[a]
  rhs_letters = [letter or next(letters) for letter in shared]
  lhs_free = [lhs_letters[d] for d in range(lhs) if d not in (*lhs_c, *lhs_b)]
  rhs_free = [rhs_letters[d] for d in range(rhs) if d not in (*rhs_c, *rhs_b)]
  out = [lhs_letters[d] for d in lhs_b] + lhs_free + rhs_free
  return "".join(lhs_letters), "".join(rhs_letters), "".join(out)


def _taps_seen(eqn: Eqn, avals: Sequence[Aval]) -> list[rules.Mask]:
  """Per spatial axis of the kernel, the taps that read the image at some output position."""
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  lhs, rhs, out = (rules.shape_of(avals, x) for x in (*eqn.inputs, eqn.outputs[0]))
  seen = []
  for k in range(len(rhs_spec) - 2):
    size, taps, outputs = lhs[lhs_spec[2 + k]], rhs[rhs_spec[2 + k]], out[out_spec[2 + k]]
    stride, (low, _) = p["window_strides"][k], p["padding"][k]
    lhs_dilation, rhs_dilation = (
        (p.get(key) or (1,) * (k + 1))[k] for key in ("lhs_dilation", "rhs_dilation")
    )
    where = np.arange(outputs)[:, None] * stride - low + np.arange(taps)[None, :] * rhs_dilation
    real = (where >= 0) & (where <= (size - 1) * lhs_dilation) & (where % lhs_dilation == 0)
    seen.append(rules.any_over(real, 0))
  return seen


def _conv_kernel(eqn: Eqn, avals: Sequence[Aval], values: Values) -> rules.Mask:
  """The kernel's live (in, out) pattern over the taps that read the image."""
  _, rhs_spec, _ = eqn.params["dimension_numbers"]
  kernel = concrete(values, eqn.inputs[1]) != 0
  kernel = np.transpose(kernel, (rhs_spec[1], rhs_spec[0], *rhs_spec[2:]))
  seen = rules.full_mask(kernel.shape[2:], _taps_seen(eqn, avals))
  taps = int(np.prod(kernel.shape[2:]))
  return rules.any_over((kernel & seen).reshape(*kernel.shape[:2], taps), -1)


def _simple_conv(eqn: Eqn, axes_in: Sequence[rules.Axes]) -> bool:
  """A convolution of an input by a constant kernel, in feature groups or not (what the fast
  path covers)."""
  return axes_in[1] is None and eqn.params["batch_group_count"] == 1


def is_grouped(eqn: Eqn) -> bool:
  """Whether ``eqn`` is a convolution in several feature groups."""
  return eqn.primitive.name == "conv_general_dilated" and eqn.params["feature_group_count"] > 1


def on_lhs(eqn: Eqn, row: rules.Mask) -> rules.Mask:
  """A row of the rhs axis a linear op contracts as a row of the lhs axis it is summed with:
  a grouped convolution's kernel input features serve every group."""
  return np.tile(row, eqn.params["feature_group_count"]) if is_grouped(eqn) else row


def on_rhs(eqn: Eqn, row: rules.Mask) -> rules.Mask:
  """A row of the lhs axis a linear op contracts as a row of the rhs axis summed with it (a
  grouped convolution's kernel input feature: whether some group has it)."""
  if not is_grouped(eqn):
    return row
  return rules.any_over(row.reshape(eqn.params["feature_group_count"], -1), 0)


def keep_a_group(
    facts: Iterable[rules.Fact], groups_of: Callable[[rules.Where], Ids], bad: rules.Mask
) -> None:
  """Marks ``bad`` (kept) the first group of each grouped convolution whose groups would all
  go (``groups_of``: the unit of each position): XLA takes no convolution of zero groups."""
  for fact in facts:
    if isinstance(fact, rules.Blocks):
      units = groups_of(fact.second)
      if units.size and not bad[units].any():
        bad[units[0]] = True


def _by_group(eqn: Eqn, kernel: rules.Mask) -> rules.Mask:
  """The kernel's live (in, out) pattern as (group, in, out within the group)."""
  groups = eqn.params["feature_group_count"]
  per_group, total = kernel.shape
  return kernel.reshape(per_group, groups, total // groups).transpose(1, 0, 2)


def conv_links(index: int, eqn: Eqn, avals: Sequence[Aval]) -> list[rules.Fact]:
  """The facts of convolution ``index``: the batch axis passes, spatial axes are pinned. The
  input channels are the kernel's input features without groups; in feature groups, each
  group is one ``Blocks`` unit and the kernel's input features are pinned. A
  ``batch_group_count`` pins every feature axis."""
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  lhs, rhs = (value_id(x) for x in eqn.inputs)
  out = eqn.outputs[0]
  facts: list[rules.Fact] = [rules.Unify((out, out_spec[0]), (lhs, lhs_spec[0]))]
  reason = "conv_general_dilated: spatial axis"
  for spec, x in ((lhs_spec, lhs), (rhs_spec, rhs), (out_spec, out)):
    facts += [rules.Pin((x, d), reason) for d in spec[2:]]
  lhs_in, rhs_in = (lhs, lhs_spec[1]), (rhs, rhs_spec[1])
  rhs_out, out_features = (rhs, rhs_spec[0]), (out, out_spec[1])
  groups = p["feature_group_count"]
  per_group_in = avals[rhs].shape[rhs_spec[1]]
  per_group_out = avals[out].shape[out_spec[1]] // groups
  if p["batch_group_count"] != 1 or (groups > 1 and 0 in (per_group_in, per_group_out)):
    features = (lhs_in, rhs_in, rhs_out, out_features)
    return facts + [rules.Pin(where, "grouped convolution") for where in features]
  facts += [rules.Contract(index, 0, lhs_spec[1]), rules.Contract(index, 1, rhs_spec[1])]
  facts.append(rules.Unify(out_features, rhs_out))
  if groups == 1:
    return facts + [rules.Unify(lhs_in, rhs_in)]
  # Every group reads the kernel's input features: removing one from a group only would
  # leave groups of different sizes, and one group's dead input is another's live one.
  return facts + [
      rules.Blocks(lhs_in, per_group_in, out_features, per_group_out),
      rules.Pin(rhs_in, "grouped convolution"),
  ]


def forward(
    eqn: Eqn, avals: Sequence[Aval], values: Values, axes_in: Sequence[rules.Axes]
) -> rules.Axes:
  """Which output positions of a linear op vary (its operands' variation ``axes_in``)."""
  out_shape = avals[eqn.outputs[0]].shape
  if eqn.primitive.name == "dot_general":
    (lhs_vary, lhs_live), (rhs_vary, rhs_live) = (
        _live(avals, values, x, axes) for x, axes in zip(eqn.inputs, axes_in)
    )
    lhs, rhs, out = _dot_subscripts(eqn, avals)
    spec = f"{lhs},{rhs}->{out}"
    reached = np.einsum(spec, lhs_vary, rhs_live) + np.einsum(spec, lhs_live, rhs_vary)
    return rules.project(reached > 0)
  if not _simple_conv(eqn, axes_in):
    return [np.ones(size, bool) for size in out_shape]
  lhs_axes = axes_in[0]
  if lhs_axes is None:  # and the kernel is constant
    return None
  lhs_spec, _, out_spec = eqn.params["dimension_numbers"]
  kernel = _by_group(eqn, _conv_kernel(eqn, avals, values))
  channels = lhs_axes[lhs_spec[1]].reshape(kernel.shape[:2])
  features = rules.any_over(channels[:, :, None] & kernel, 1).reshape(-1)
  if not features.any():
    return None
  result = [np.ones(size, bool) for size in out_shape]
  result[out_spec[0]], result[out_spec[1]] = lhs_axes[lhs_spec[0]], features
  return result


def backward(
    eqn: Eqn,
    avals: Sequence[Aval],
    values: Values,
    axes_in: Sequence[rules.Axes],
    axes_out: rules.Axes,
) -> list[rules.Axes]:
  """Which operand positions of a linear op its read outputs ``axes_out`` depend on."""
  if axes_out is None:
    return [None, None]
  out_shape = avals[eqn.outputs[0]].shape
  shapes = [rules.shape_of(avals, x) for x in eqn.inputs]
  if eqn.primitive.name == "dot_general":
    read = rules.full_mask(out_shape, axes_out).astype(np.float32)
    (_, lhs_live), (_, rhs_live) = (
        _live(avals, values, x, axes) for x, axes in zip(eqn.inputs, axes_in)
    )
    lhs, rhs, out = _dot_subscripts(eqn, avals)
    lhs_read = np.einsum(f"{out},{rhs}->{lhs}", read, rhs_live)
    rhs_read = np.einsum(f"{lhs},{out}->{rhs}", lhs_live, read)
    return [rules.project(lhs_read > 0), rules.project(rhs_read > 0)]
  if not _simple_conv(eqn, axes_in):
    return [[np.ones(size, bool) for size in shape] for shape in shapes]
  lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
  used = axes_out[out_spec[1]]
  lhs_read = [np.ones(size, bool) for size in shapes[0]]
  lhs_read[lhs_spec[0]] = axes_out[out_spec[0]]
  kernel = _by_group(eqn, _conv_kernel(eqn, avals, values))
  groups, per_group, _ = kernel.shape
  used_by_group = used.reshape(groups, 1, -1)
  lhs_read[lhs_spec[1]] = rules.any_over(kernel & used_by_group, 2).reshape(-1)
  _, lhs_live = _live(avals, values, eqn.inputs[0], axes_in[0])
  others = tuple(d for d in range(len(shapes[0])) if d != lhs_spec[1])
  channels_live = rules.any_over(lhs_live, others).reshape(groups, per_group)
  rhs_read = [np.ones(size, bool) for size in shapes[1]]
  rhs_read[rhs_spec[0]], rhs_read[rhs_spec[1]] = used, rules.any_over(channels_live, 0)
  for k, seen in enumerate(_taps_seen(eqn, avals)):
    rhs_read[rhs_spec[2 + k]] = seen
  return [_normalize(lhs_read), _normalize(rhs_read)]


def _normalize(axes: list[rules.Mask]) -> rules.Axes:
  return None if any(not row.any() for row in axes) else axes
