r"""What ``prune`` removes together: single weights, units, or N of every M weights.

* ``"weight"``: each weight alone (the paper's FlipOut).
* ``"unit"``: every weight feeding one output unit (a column of a Dense ``(in, out)``
  kernel, an output channel of a conv ``(h, w, in, out)`` kernel) is one group; a group may
  also hold units of several kernels (``groups``: units coupled by a residual stream or a
  concatenation, see :func:`flipout_jax.unit_groups`), which then go together. A group's
  score is the ``score`` (``"mean"`` or ``"sum"``) of its weights' scores; groups are
  ranked globally and, at an event, the lowest go until the pruned weights reach the
  event's count: the fewest groups, in score order, whose weights reach it (so the achieved
  sparsity is the nearest whole groups allow at or above the target).
* ``"N:M"``: along the input axis, of every M consecutive weights feeding one output the N
  most salient stay; the sparsity is ``1 - N/M``.

Group sums are exact and independent of how XLA orders a reduction (so sharded params give
the same masks as one device): each weight's score is written as ``g * x`` with ``g`` the
largest magnitude in its group (a max, which any order computes exactly) and
:math:`|x| \le 1`, and ``x`` is cut into integer limbs of ``b`` bits,
:math:`x = \sum_l d_l 2^{-b(l+1)}` (the floors are exact: scaling by a power of two and
taking a fractional part are), which are summed as int32. ``b`` leaves room for the
largest group's sum in 31 bits; the limbs hold at least 48 bits below the group's largest
score, more than float32's 24-bit mantissa.
"""

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax._src import layout as layout_lib
from flipout_jax._src import select


class Structure(NamedTuple):
  """What ``prune`` removes together: build one with :func:`units` or :func:`n_of_m`, or pass
  ``"weight"``, ``"unit"`` or ``"N:M"``. ``kind`` is ``"weight"``, ``"unit"`` or ``"n:m"``."""

  kind: str
  n: int = 0
  m: int = 0
  groups: Any = None
  score: str = "mean"
  min_units: int = 1
  kernel_layout: layout_lib.KernelLayout = "in_out"
  cost: str = "weights"
  flops: Any = None  # the model's unit_groups.UnitFlops, for cost="flops"
  normalize: str | None = None
  round_to: int = 1
  where: Any = None  # UnitGroups.where: prune's default prunable leaves with these groups


GROUP_SCORES = ("mean", "sum")
COSTS = ("weights", "flops")
NORMALIZERS = (None, "mean", "max")
_ALLOWED = (
    "'weight', 'unit', 'N:M' with integers 0 < N < M (e.g. '2:4'), flipout.units(...) or "
    "flipout.n_of_m(n, m)"
)


def units(
    groups: Any = None,
    *,
    score: str = "mean",
    min_units: int = 1,
    kernel_layout: layout_lib.KernelLayout = "in_out",
    cost: str = "weights",
    normalize: str | None = None,
    round_to: int = 1,
) -> Structure:
  """Output units go whole: every weight feeding one unit (a column of a Dense kernel, an
  output channel of a conv) is one group, and the lowest-scored groups, ranked globally, go
  until each event's target is reached: with ``cost="weights"`` the pruned weights reach the
  event's count (the achieved sparsity is the nearest at or above the target that whole
  groups allow); with ``cost="flops"`` the model's FLOPs fall by at least the event's
  fraction of the dense model's, counted as compaction will cut them (a unit removed takes
  its own outputs and the next layer's inputs it feeds). ``structure="unit"`` is ``units()``.

  Args:
    groups: the :class:`UnitGroups` that :func:`unit_groups` reads from the model function,
      or its ``ids``: a tree shaped like params with, at each prunable leaf, an int array
      giving each output unit's group id: units of different leaves with the same id
      (coupled by a residual add or shared by a concatenation) go together, and ``-1`` marks
      a unit never pruned (such as the model's outputs). None: each unit is its own group
      (leave the output layer out of ``where``). With :class:`UnitGroups`, ``prune``'s
      ``where`` defaults to ``groups.where``: the kernels and their units' biases and norm
      parameters (followers, masked with their unit so that a pruned unit is exact zeros).
    score: a group's score from its weights' scores: ``"mean"`` (units of layers of
      different fan-in compare per weight) or ``"sum"`` (favours keeping wide units). Exact
      sums, whatever the sharding.
    min_units: each prunable leaf keeps at least this many output units (its best); 0 lets
      a layer lose all of them.
    kernel_layout: which axes of a kernel hold its output and input units: ``"in_out"``
      (Flax: outputs last, inputs second to last), ``"out_in"`` (Equinox, PyTorch), or a
      callable ``(path, leaf)`` returning one of them.
    cost: what ``target_sparsity`` counts: ``"weights"`` (the share of the prunable weights
      removed) or ``"flops"`` (the share of the model's FLOPs per example removed, matrix
      products and convolutions; needs ``groups`` from :func:`unit_groups` and a globally
      ranked criterion).
    normalize: per-layer normaliser of the weights' scores before they are summed into
      group scores (as Torch-Pruning's importance normalizers): ``"mean"`` divides each
      leaf's scores by its live weights' mean score, ``"max"`` by the largest, so that the
      global ranking compares each unit with its own layer rather than layers of different
      scales with each other; None (default): the raw scores.
    round_to: each leaf keeps a multiple of this many live units (or all of them): an
      event gives back, per leaf, the best-scored of the units it chose, fewer than
      ``round_to``, so the compacted widths are multiples (on CPUs and GPUs a conv of 13
      channels can be slower than one of 32); with ``cost="flops"`` the target counts the
      rounded widths.

  Raises:
    TypeError, ValueError: an argument out of range, naming it.
  """
  if not isinstance(cost, str) or cost not in COSTS:
    raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
  flops = getattr(groups, "flops", None)
  if cost == "flops" and flops is None:
    raise ValueError(
        "cost='flops' needs groups=flipout.unit_groups(apply_fn, params, x): the FLOPs of "
        f"each unit are read from the model's program; got groups of type {type(groups).__name__}"
    )
  _check_unit_options(score, min_units, normalize, round_to)
  layout_lib.check_argument(kernel_layout)
  return Structure(
      "unit",
      groups=getattr(groups, "ids", groups),
      score=score,
      min_units=int(min_units),
      kernel_layout=kernel_layout,
      cost=cost,
      flops=flops if cost == "flops" else None,
      normalize=normalize,
      round_to=int(round_to),
      where=getattr(groups, "where", None),
  )


def _check_unit_options(score, min_units, normalize, round_to) -> None:
  """Refuses :func:`units`' options out of range, naming each."""
  if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
    raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
  if normalize not in NORMALIZERS:
    raise ValueError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
  if not isinstance(score, str) or score not in GROUP_SCORES:
    raise ValueError(f"score must be one of {GROUP_SCORES}, got {score!r}")
  if isinstance(min_units, bool) or not isinstance(min_units, (int, np.integer)):
    raise TypeError(f"min_units must be an int >= 0, got {type(min_units).__name__}")
  if min_units < 0:
    raise ValueError(f"min_units must be an int >= 0, got {min_units}")


def n_of_m(n: int, m: int, *, kernel_layout: layout_lib.KernelLayout = "in_out") -> Structure:
  """Of every ``m`` consecutive weights along a kernel's input axis feeding one output, the
  ``n`` most salient stay: sparsity ``1 - n/m``, which ``target_sparsity`` must equal or
  leave to it; each event prunes the schedule's share of every run of ``m``, rounded, the
  last exactly ``m - n``. ``structure="2:4"`` is ``n_of_m(2, 4)``.

  Args:
    n, m: ints with ``0 < n < m``.
    kernel_layout: as in :func:`units`.

  Raises:
    TypeError, ValueError: an argument out of range, naming it.
  """
  for name, value in (("n", n), ("m", m)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{name} must be an int, got {type(value).__name__}")
  if not 0 < n < m:
    raise ValueError(f"n_of_m needs ints 0 < n < m, got n={n}, m={m}")
  layout_lib.check_argument(kernel_layout)
  return Structure("n:m", int(n), int(m), kernel_layout=kernel_layout)


def parse(structure) -> Structure:
  """Reads ``prune``'s ``structure`` argument.

  Raises:
    TypeError: neither a string nor a :class:`Structure`.
    ValueError: naming the allowed values.
  """
  if isinstance(structure, Structure):
    return structure
  if not isinstance(structure, str):
    raise TypeError(f"structure must be {_ALLOWED}; got {type(structure).__name__}")
  if structure == "weight":
    return Structure("weight")
  if structure == "unit":
    return units()
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
  if match is None:
    raise ValueError(f"structure must be {_ALLOWED}, got {structure!r}")
  n, m = int(match.group(1)), int(match.group(2))
  if not 0 < n < m:
    raise ValueError(f"structure {structure!r}: N:M needs 0 < N < M, got N={n}, M={m}")
  return Structure("n:m", n, m)


def check_n_of_m_target(structure: Structure, target_sparsity) -> float:
  """``1 - N/M``, the only sparsity an N:M structure reaches; refuses any other target."""
  sparsity = 1 - structure.n / structure.m
  if target_sparsity is not None and abs(target_sparsity - sparsity) > 1e-9:
    raise ValueError(
        f"target_sparsity: structure '{structure.n}:{structure.m}' reaches sparsity "
        f"1 - {structure.n}/{structure.m} = {sparsity:g}; leave target_sparsity unset or give "
        f"that, got {target_sparsity}"
    )
  return sparsity


def units_last(leaf: jax.Array, output_axis: int) -> jax.Array:
  """``leaf`` as a ``(fan_in, units)`` matrix: one column per output unit."""
  moved = jnp.moveaxis(leaf, output_axis, -1)
  return moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])


def limb_bits(largest_group: int) -> int:
  """Bits per limb such that a group's sum of limbs fits an int32."""
  # Each limb is in [-2**b, 2**b]: the sum of `largest_group` of them needs b + log2 + 1 bits.
  return max(1, 30 - max(1, largest_group).bit_length())


def exact_group_sums(
    unit_scores: list[jax.Array], unit_ids: list[np.ndarray], num_groups: int, bits: int
) -> tuple[jax.Array, jax.Array]:
  """Per group, the sum of its weights' scores and whether one of them is not finite.

  Args:
    unit_scores: per leaf, ``(fan_in, units)`` scores.
    unit_ids: per leaf, the group of each unit (``-1``: in no group).
    num_groups: number of groups.
    bits: :func:`limb_bits` of the largest group.

  Returns:
    ``(sums, non_finite)``, float32 and bool, of shape ``(num_groups,)``; the sums are a
    function of the multiset of each group's scores only (see the module docstring).
  """
  ids = [jnp.asarray(np.where(i < 0, num_groups, i), jnp.int32) for i in unit_ids]
  per_group = lambda values, op: op(jnp.concatenate(values), jnp.concatenate(ids), num_groups)
  finite = [jnp.isfinite(s) for s in unit_scores]
  magnitudes = [
      jnp.where(f, jnp.abs(s), 0).astype(jnp.float32) for s, f in zip(unit_scores, finite)
  ]
  unit_max = [m.max(axis=0, initial=0.0) for m in magnitudes]
  group_max = jnp.maximum(per_group(unit_max, jax.ops.segment_max), 0.0)
  non_finite = per_group([(~f).any(axis=0).astype(jnp.int32) for f in finite], jax.ops.segment_max)
  limbs = max(2, -(-48 // bits))
  sums: list[list[jax.Array]] = [[] for _ in range(limbs)]
  for s, f, i in zip(unit_scores, finite, ids):
    scale = group_max.at[i].get(mode="fill", fill_value=0.0)
    x = jnp.where(f & (scale > 0), s.astype(jnp.float32) / jnp.where(scale > 0, scale, 1), 0)
    rest = x * 2.0**bits
    for limb in range(limbs):
      digit = jnp.floor(rest)
      sums[limb].append(digit.astype(jnp.int32).sum(axis=0))
      rest = (rest - digit) * 2.0**bits
  total = jnp.zeros(num_groups, jnp.float32)
  for limb in reversed(range(limbs)):  # smallest first: no large term swallows the rest
    total = total + per_group(sums[limb], jax.ops.segment_sum).astype(jnp.float32) * 2.0 ** (
        -bits * (limb + 1)
    )
  return group_max * total, non_finite > 0


def per_leaf_normalized(
    unit_scores: list[jax.Array], unit_masks: list[jax.Array], how: str | None
) -> list[jax.Array]:
  """Each leaf's ``(fan_in, units)`` scores over the leaf's typical live score, so that
  layers of different scales (fan-in, initialisation, flip rates) rank on one scale.

  ``how``: ``"mean"`` divides by the mean score of the leaf's live weights (its sum exact,
  as the group sums are), ``"max"`` by the largest; None leaves the scores as they are.
  Dead weights score 0 (whatever the criterion gives them).
  """
  if how is None:
    return unit_scores
  live = [jnp.where(m, s, 0).astype(jnp.float32) for s, m in zip(unit_scores, unit_masks)]
  if how == "max":
    scales = [jnp.abs(s).max(initial=0.0) for s in live]
  else:
    ids = [np.full(s.shape[1], leaf) for leaf, s in enumerate(live)]
    bits = limb_bits(max(int(np.prod(s.shape)) for s in live))
    sums, _ = exact_group_sums(live, ids, len(live), bits)
    scales = [sums[leaf] / jnp.maximum(m.sum(), 1) for leaf, m in enumerate(unit_masks)]
  return [s / jnp.where(scale > 0, scale, 1.0) for s, scale in zip(live, scales)]


def _smallest_passing(test: Callable, low, high, steps: int):
  """The smallest value in ``[low, high]`` where the monotone ``test`` passes (``high`` when
  none does), by ``steps`` halvings of the interval (enough for its width)."""

  def halve(_, bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    return jnp.where(test(middle), low, middle + 1), jnp.where(test(middle), middle, high)

  return jax.lax.fori_loop(0, steps, halve, (low, high))[0]


def lowest_reaching(keys: jax.Array, weights: jax.Array, need) -> jax.Array:
  """The fewest entries, lowest keys first, whose weights sum to at least ``need``.

  Ties are taken in index order (a stable sort's order). Entries whose key is the pruned
  key (:func:`select.sortable_keys` of a dead entry) are never chosen; when the others do
  not reach ``need``, all of them are. No sort: the key threshold is found by bisection
  over the key's bits, each step one weighted count.

  Args:
    keys: unsigned keys, one per entry (e.g. per group).
    weights: non-negative integer weight of each entry.
    need: the weight to reach (``<= 0``: nothing is chosen).

  Returns:
    A bool array shaped like ``keys``.
  """
  key_type = keys.dtype.type
  pruned = key_type(np.iinfo(keys.dtype).max)
  eligible = keys != pruned
  weights = jnp.where(eligible, weights, 0)
  reached = lambda t: jnp.sum(jnp.where(keys <= t, weights, 0)) >= need

  threshold = _smallest_passing(reached, key_type(0), pruned, np.iinfo(keys.dtype).bits)
  below = keys < threshold
  at = (keys == threshold) & eligible
  still = need - jnp.sum(jnp.where(below, weights, 0))
  at_weights = jnp.where(at, weights, 0)
  before = jnp.cumsum(at_weights) - at_weights
  return eligible & (below | (at & (before < still))) & (need > 0)


def lowest_within_budget(keys: jax.Array, cost_left: Callable, budget) -> jax.Array:
  """The entries, lowest keys first, whose removal brings ``cost_left`` nearest ``budget``.

  In the order of :func:`lowest_reaching` (lowest key first, ties in index order, pruned
  keys never chosen), the shortest prefix whose removal brings the cost to at most
  ``budget``, or that prefix without its last entry where this lands nearer (an entry can
  be costly: a conv's channel takes its share of the next conv too); all eligible entries
  when the budget cannot be met. For a cost that is not a sum over entries (a model's
  FLOPs: a product of the live widths on either side of each layer): ``cost_left(chosen)``,
  the cost with the bool entries ``chosen`` removed, must not grow as ``chosen`` grows.
  Found by bisection over the key's bits, then over the position among the ties.
  """
  key_type = keys.dtype.type
  pruned = key_type(np.iinfo(keys.dtype).max)
  eligible = keys != pruned
  fits = lambda chosen: cost_left(chosen) <= budget

  bits = np.iinfo(keys.dtype).bits
  threshold = _smallest_passing(lambda t: fits(eligible & (keys <= t)), key_type(0), pruned, bits)
  below = eligible & (keys < threshold)
  at = eligible & (keys == threshold)
  order = jnp.cumsum(at) - at
  ties = lambda j: below | (at & (order < j))
  count = jnp.sum(at).astype(jnp.int32)
  taken = _smallest_passing(
      lambda j: fits(ties(j)), jnp.int32(0), count, max(1, keys.size.bit_length())
  )
  # The prefix one entry shorter is ties(taken - 1): taken is >= 1 whenever the budget was
  # unmet before (else the threshold bisection would have stopped one key lower).
  over = budget - cost_left(ties(taken))
  short = cost_left(ties(jnp.maximum(taken - 1, 0))) - budget
  reached = fits(ties(taken))
  taken = jnp.where(reached & (taken > 0) & (short < over), taken - 1, taken)
  return ties(taken) & ~fits(jnp.zeros_like(eligible))


def keep_n_of_m(
    scores: jax.Array, live: jax.Array, axis: int, m: int, pruned_per_group
) -> jax.Array:
  """The new live mask: in each run of ``m`` weights along ``axis``, the lowest-scored
  ``pruned_per_group`` are pruned, counting those already pruned first.

  Ties are broken by position along ``axis``. No sort: each weight's rank in its group is
  counted by comparing it with the ``m - 1`` others. The runs are split off ``axis`` in place
  (a reshape, no transpose): a transposed result would make XLA give the event's ``lax.cond``
  a transposed layout, and every step without an event would then copy the masks into it and
  back.
  """
  axis = axis % scores.ndim
  shape = scores.shape
  grouped = (*shape[:axis], shape[axis] // m, m, *shape[axis + 1 :])
  within = axis + 1  # the axis of the position in a run
  keys = select.sortable_keys(scores, True).reshape(grouped)
  alive = live.reshape(grouped)
  positions = jnp.arange(m).reshape([m if d == within else 1 for d in range(len(grouped))])
  rank = jnp.zeros(grouped, jnp.int32)
  for j in range(m):
    key_j = jax.lax.slice_in_dim(keys, j, j + 1, axis=within)
    alive_j = jax.lax.slice_in_dim(alive, j, j + 1, axis=within)
    # j comes before i: dead before live, then lower key, then lower position.
    earlier = positions > j
    before = (alive & ~alive_j) | (
        (alive == alive_j) & ((key_j < keys) | ((key_j == keys) & earlier))
    )
    rank = rank + before.astype(jnp.int32)
  return (alive & (rank >= pruned_per_group)).reshape(shape)
