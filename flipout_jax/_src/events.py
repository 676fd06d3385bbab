"""Pruning events of each structure: which live weights, units or N:M slots go at an event.

An event rule maps ``(step, new_params, masks, flips, updates)`` to the new masks, where
``new_params``, ``flips`` and ``updates`` are functions returning the trees (recomputed at
each use, so that no score per weight is held in memory, see :func:`_weight_event`). :func:`factory`
builds, from ``prune``'s checked arguments, the init-time check of the prunable leaves and
the trace-time rule for their shapes.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax._src import criteria as criteria_lib
from flipout_jax._src import layout as layout_lib
from flipout_jax._src import prunable as prunable_lib
from flipout_jax._src import schedule as schedule_lib
from flipout_jax._src import select
from flipout_jax._src import structure as structure_lib

EventRule = Callable[[jax.Array, Any, Any, Any, Any], Any]
# (masks, params) -> (is_event(step), rule); called at trace time.
MakeEvent = Callable[[Any, Any], tuple[Callable, EventRule]]


def _no_event(step):
  del step
  return jnp.bool_(False)


def _unchanged(step, new_params, masks, flips, updates):
  del step, new_params, flips, updates
  return masks


def _weight_event(
    rule: criteria_lib.Criterion, table: np.ndarray, event_index: Callable, seed: int
) -> EventRule:
  """Prunes the lowest-scored live weights down to ``table[event_index]``.

  The scores and their keys are recomputed from ``new_params`` and ``flips`` inside every
  counting pass of the selection (``select.lowest_k_cut``), so no score or key per weight
  is ever held in memory and the event adds no scratch per weight to the step's peak.
  """
  targets_table = jnp.asarray(table)

  def event(step, new_params, masks, flips, updates):
    key = criteria_lib.random_criterion_key(seed, step)
    mask_leaves, treedef = jax.tree.flatten(masks)

    def keys(group):
      def compute():
        scores = prunable_lib.leaves_at(
            masks, criteria_lib.scores(rule, new_params, flips, key, updates)
        )
        return [select.sortable_keys(scores[i], mask_leaves[i]) for i in group]

      return compute

    targets = targets_table[event_index(step)]
    count = len(mask_leaves)
    groups = [[i] for i in range(count)] if rule.layerwise else [list(range(count))]
    new_masks = list(mask_leaves)
    for group, target in zip(groups, targets):
      pruned = sum(select.count(~mask_leaves[i], targets_table.dtype) for i in group)
      cut = select.lowest_k_cut(keys(group), jnp.maximum(target - pruned, 0))
      for i, leaf_chosen in zip(group, select.chosen_by(cut, keys(group))):
        new_masks[i] = mask_leaves[i] & ~leaf_chosen
    return jax.tree.unflatten(treedef, new_masks)

  return event


class _Units(NamedTuple):
  """The unit groups of the prunable leaves (static: NumPy, known at trace time)."""

  output_axes: list[int]
  # Per leaf, the group of each output unit; num_groups for a unit never pruned (given as
  # -1), an index that scatters drop and gathers fill (a negative one would wrap around).
  ids: list[np.ndarray]
  num_groups: int
  group_weights: np.ndarray  # weights per group, followers' entries included
  scored_weights: np.ndarray  # weights per group whose scores count (kernels')
  followers: list[bool]  # per leaf: a 1-D follower (a bias, a norm's scale), never scored


def _pairs(masks, params) -> list[tuple[Any, Any]]:
  """``(path, param)`` of each prunable leaf, in leaf order."""
  paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(masks)]
  return list(zip(paths, prunable_lib.leaves_at(masks, params)))


def _units(masks, params, kernel_layout, groups) -> _Units:
  """Output axes and unit groups of the prunable leaves (shapes only: any trace level)."""
  pairs = _pairs(masks, params)
  axes = [layout_lib.unit_axes(kernel_layout, p, leaf)[0] for p, leaf in pairs]
  shapes = [tuple(np.shape(leaf)) for _, leaf in pairs]
  if groups is None:
    offsets = np.cumsum([0] + [shape[axis] for shape, axis in zip(shapes, axes)])
    ids = [np.arange(start, stop) for start, stop in zip(offsets[:-1], offsets[1:])]
  else:
    ids = [np.asarray(i, np.int64) for i in prunable_lib.leaves_at(masks, groups)]
  num_groups = int(max((i.max(initial=-1) for i in ids), default=-1)) + 1
  ids = [np.where(i < 0, num_groups, i) for i in ids]
  fan_ins = [np.prod(shape) // max(shape[axis], 1) for shape, axis in zip(shapes, axes)]
  followers = [len(shape) == 1 for shape in shapes]
  weights = np.zeros(num_groups, np.int64)
  scored = np.zeros(num_groups, np.int64)
  for i, fan_in, follower in zip(ids, fan_ins, followers):
    np.add.at(weights, i[i < num_groups], fan_in)
    if not follower:
      np.add.at(scored, i[i < num_groups], fan_in)
  return _Units(axes, ids, num_groups, weights, scored, followers)


def _protected(unit_scores, unit_live, ids, min_units: int, num_groups: int) -> jax.Array:
  """Groups holding one of the ``min_units`` best live units of some leaf."""
  protected = jnp.zeros(num_groups, bool)
  for scores, live, leaf_ids in zip(unit_scores, unit_live, ids):
    k = min(min_units, leaf_ids.size)
    if k == 0:
      continue
    _, best = jax.lax.top_k(jnp.where(live, scores, -jnp.inf), k)
    chosen = jnp.asarray(leaf_ids)[best]
    protected = protected.at[jnp.where(live[best], chosen, num_groups)].set(True, mode="drop")
  return protected


def _rounded(chosen, unit_scores, live, units: _Units, round_to: int) -> jax.Array:
  """``chosen`` groups less those given back so that each leaf keeps a multiple of
  ``round_to`` live units (or all of them): per leaf, the best-scored of its units chosen
  now (at most ``round_to - 1``). Fewer chosen groups never give back more units, so a
  cost of the rounded choice still falls as the choice grows."""
  if round_to == 1:
    return chosen
  restored = jnp.zeros(units.num_groups, bool)
  for scores, leaf_live, leaf_ids in zip(unit_scores, live, units.ids):
    gone = chosen.at[leaf_ids].get(mode="fill", fill_value=False) & leaf_live
    left = jnp.sum(leaf_live) - jnp.sum(gone)
    back = jnp.minimum(-(-left // round_to) * round_to, leaf_ids.size) - left
    count = min(round_to - 1, leaf_ids.size)
    _, best = jax.lax.top_k(jnp.where(gone, scores, -jnp.inf), count)
    ids = jnp.where(jnp.arange(count) < back, jnp.asarray(leaf_ids)[best], units.num_groups)
    restored = restored.at[ids].set(True, mode="drop")
  return chosen & ~restored


def _group_values(scores, weight_live, units: _Units, structure, bits: int) -> jax.Array:
  """Each group's score: the mean or sum of its kernels' weights' (followers not scored),
  per-leaf normalised first where asked; ``inf`` for a group with a non-finite score."""
  matrices = [
      jnp.zeros_like(structure_lib.units_last(s, a)) if follower else structure_lib.units_last(s, a)
      for s, a, follower in zip(scores, units.output_axes, units.followers)
  ]
  matrices = structure_lib.per_leaf_normalized(matrices, weight_live, structure.normalize)
  sums, non_finite = structure_lib.exact_group_sums(matrices, units.ids, units.num_groups, bits)
  scored = jnp.asarray(np.maximum(units.scored_weights, 1), sums.dtype)
  values = sums / scored if structure.score == "mean" else sums
  return jnp.where(non_finite, jnp.inf, values)


def _by_weight_counts(values, candidates, mask_leaves, units: _Units, leaf_groups, targets):
  """The groups to prune so that each ranked set of leaves reaches its count of pruned
  weights (the lowest values first)."""
  weights = jnp.asarray(units.group_weights, targets.dtype)
  chosen = jnp.zeros(units.num_groups, bool)
  for leaves, target in zip(leaf_groups, targets):
    in_scope = np.zeros(units.num_groups, bool)
    for i in leaves:
      in_scope[units.ids[i][units.ids[i] < units.num_groups]] = True
    pruned = sum(select.count(~mask_leaves[i], targets.dtype) for i in leaves)
    keys = select.sortable_keys(values, candidates & in_scope)
    chosen = chosen | structure_lib.lowest_reaching(keys, weights, target - pruned)
  return chosen


def _unit_event(
    rule, table, event_index, seed, units: _Units, structure: structure_lib.Structure
) -> EventRule:
  """Prunes whole groups of units, lowest group score first, up to each event's count (of
  weights; with ``cost="flops"`` the table holds the FLOPs left, per example)."""
  targets_table = jnp.asarray(table)
  bits = structure_lib.limb_bits(int(units.group_weights.max(initial=1)))
  min_units, flops = structure.min_units, structure.flops

  def event(step, new_params, masks, flips, updates):
    key = criteria_lib.random_criterion_key(seed, step)
    mask_leaves, treedef = jax.tree.flatten(masks)
    scores = prunable_lib.leaves_at(
        masks, criteria_lib.scores(rule, new_params, flips, key, updates)
    )
    weight_live = [structure_lib.units_last(m, a) for m, a in zip(mask_leaves, units.output_axes)]
    values = _group_values(scores, weight_live, units, structure, bits)
    live = [m.any(axis=0) for m in weight_live]
    unit_scores = [values.at[i].get(mode="fill", fill_value=jnp.inf) for i in units.ids]
    protected = _protected(unit_scores, live, units.ids, min_units, units.num_groups)
    group_live = jnp.zeros(units.num_groups, bool)
    for leaf_live, leaf_ids in zip(live, units.ids):
      group_live = group_live.at[leaf_ids].max(leaf_live, mode="drop")
    candidates = group_live & ~protected
    targets = targets_table[event_index(step)]
    leaf_groups = (
        [[i] for i in range(len(mask_leaves))]
        if rule.layerwise
        else [list(range(len(mask_leaves)))]
    )
    rounded = lambda chosen: _rounded(chosen, unit_scores, live, units, structure.round_to)
    if flops is not None:  # one global ranking (layer-wise criteria are refused)
      keys = select.sortable_keys(values, candidates)
      flops_left = lambda gone: flops.count(group_live & ~rounded(gone), jnp)
      chosen = structure_lib.lowest_within_budget(keys, flops_left, targets[0])
    else:
      chosen = _by_weight_counts(values, candidates, mask_leaves, units, leaf_groups, targets)
    chosen = rounded(chosen)
    new_masks = []
    for mask, leaf_ids, axis in zip(mask_leaves, units.ids, units.output_axes):
      gone = chosen.at[leaf_ids].get(mode="fill", fill_value=False)
      shape = [1] * mask.ndim
      shape[axis] = mask.shape[axis]
      new_masks.append(mask & ~gone.reshape(shape))
    return jax.tree.unflatten(treedef, new_masks)

  return event


def _n_of_m_event(rule, per_group_table, event_index, seed, input_axes, m: int) -> EventRule:
  """In every run of ``m`` weights along each leaf's input axis, prunes the lowest-scored
  down to ``per_group_table[event]`` pruned."""
  pruned_table = jnp.asarray(per_group_table, jnp.int32)

  def event(step, new_params, masks, flips, updates):
    key = criteria_lib.random_criterion_key(seed, step)
    mask_leaves, treedef = jax.tree.flatten(masks)
    scores = prunable_lib.leaves_at(
        masks, criteria_lib.scores(rule, new_params, flips, key, updates)
    )
    pruned = pruned_table[event_index(step)]
    return jax.tree.unflatten(
        treedef,
        [
            structure_lib.keep_n_of_m(s, mask, axis, m, pruned)
            for s, mask, axis in zip(scores, mask_leaves, input_axes)
        ],
    )

  return event


def _n_of_m_table(table: np.ndarray, total: int, structure) -> np.ndarray:
  """Pruned weights per run of M after each event: the event's sparsity of M, rounded
  half up, and exactly ``M - N`` at the target (``table`` counts weights of all leaves)."""
  counts = table[:, 0].astype(np.int64)
  per_group = (2 * counts * structure.m + total) // (2 * max(total, 1))
  return np.minimum(per_group, structure.m - structure.n)


def _input_axes(masks, params, kernel_layout) -> list[int]:
  return [layout_lib.unit_axes(kernel_layout, p, leaf)[1] for p, leaf in _pairs(masks, params)]


def _check_kernels(masks, params, what: str, followers: bool) -> None:
  """Refuses prunable leaves of fewer than 2 dimensions (1 with ``followers``: a unit's
  bias or norm scale, which ``groups`` ties to its unit)."""
  for path, leaf in _pairs(masks, params):
    if np.ndim(leaf) < (1 if followers else 2):
      hint = "" if followers else " (or 1-D ones that structure=flipout.units(groups) ties)"
      raise ValueError(
          f"structure={what!r} needs kernels of 2+ dimensions{hint}, but the prunable leaf "
          f"{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}; leave it out of `where`"
      )


def _check_groups(masks, params, groups, kernel_layout, layerwise: bool) -> None:
  """Refuses ``groups`` that do not give one int per output unit of each prunable leaf."""
  try:
    group_leaves = prunable_lib.leaves_at(masks, groups)
  except (ValueError, TypeError) as error:
    raise ValueError(f"groups must be a tree shaped like params: {error}") from None
  owner: dict[int, str] = {}
  for (key_path, leaf), ids in zip(_pairs(masks, params), group_leaves):
    path = jax.tree_util.keystr(key_path)
    ids = np.asarray(ids)
    units = np.shape(leaf)[layout_lib.unit_axes(kernel_layout, key_path, leaf)[0]]
    if ids.shape != (units,) or not np.issubdtype(ids.dtype, np.integer) or (ids < -1).any():
      raise ValueError(
          f"groups at {path}: expected an int array of shape ({units},), one group id >= 0 "
          f"per output unit (-1: never pruned), got {ids.dtype} {ids.shape}"
      )
    for group in np.unique(ids[ids >= 0]):
      if layerwise and owner.setdefault(int(group), path) != path:
        raise ValueError(
            f"groups: group {group} couples units of {owner[int(group)]} and {path}, but "
            "criterion='magnitude' ranks each leaf alone; use 'global_magnitude'"
        )


# The FLOP fractions of an event are the schedule's counts of this many "weights".
_FLOP_PARTS = 1 << 24


def _flops_table(plan: schedule_lib.Plan, flops) -> np.ndarray:
  """(events, 1) float32 table of the FLOPs per example left after each event."""
  removed = plan.table([_FLOP_PARTS], False)[:, :1].astype(np.float64) / _FLOP_PARTS
  return (flops.dense * (1.0 - removed)).astype(np.float32)


def _check_flops(structure, rule, plan: schedule_lib.Plan) -> None:
  """Refuses a FLOP target with a layer-wise criterion or beyond what units can remove."""
  if rule.layerwise:
    raise ValueError(
        "structure=flipout.units(..., cost='flops') ranks units globally (FLOPs are a model's, "
        "not a layer's); criterion='magnitude' ranks each leaf alone: use 'global_magnitude'"
    )
  table = _flops_table(plan, structure.flops)
  fixed = float(structure.flops.count(np.zeros(structure.flops.num_groups, bool)))
  dense = structure.flops.dense
  if len(table) and plan.last_step is not None and table[-1, 0] < fixed * (1 - 1e-6):
    raise ValueError(
        f"target_sparsity: with cost='flops' at most {1 - fixed / dense:.2%} of the model's "
        f"FLOPs are in prunable units (the rest is in layers outside `where` or units never "
        f"pruned), but the schedule asks for {1 - table[-1, 0] / dense:.2%}"
    )


def factory(
    structure: structure_lib.Structure, rule: criteria_lib.Criterion, plan: schedule_lib.Plan
) -> tuple[Callable[[Any, Any], None], MakeEvent]:
  """``(check_leaves, make_event)`` for ``prune``: both take ``(masks, params)``.

  ``check_leaves`` runs at init and refuses prunable leaves the structure cannot cut;
  ``make_event`` runs at trace time and returns ``(is_event(step), rule)``.
  """
  seed, groups, kernel_layout = rule.seed, structure.groups, structure.kernel_layout
  if structure.flops is not None:
    _check_flops(structure, rule, plan)

  def sizes(masks) -> list[int]:
    return [int(np.size(m)) for m in jax.tree.leaves(masks)]

  def check_leaves(masks, params):
    select.count_dtype(max(schedule_lib.group_sizes(sizes(masks), rule.layerwise)))
    if structure.kind == "weight":
      return
    with_groups = structure.kind == "unit" and groups is not None
    _check_kernels(masks, params, "unit" if structure.kind == "unit" else "N:M", with_groups)
    if structure.kind == "unit" and groups is not None:
      _check_groups(masks, params, groups, kernel_layout, rule.layerwise)
    if structure.kind == "n:m":
      for (path, leaf), axis in zip(
          _pairs(masks, params), _input_axes(masks, params, kernel_layout)
      ):
        if np.shape(leaf)[axis] % structure.m:
          raise ValueError(
              f"structure '{structure.n}:{structure.m}': the input axis ({axis}) of "
              f"{jax.tree_util.keystr(path)}, shape {np.shape(leaf)}, is not a multiple of "
              f"M={structure.m}; leave the leaf out of `where` or set the structure's kernel_layout"
          )

  def make_event(masks, params):
    # An N:M event prunes the same share of every run of M, so it counts globally.
    table = plan.table(sizes(masks), rule.layerwise and structure.kind != "n:m")
    if len(table) == 0:
      return _no_event, _unchanged
    clipped = lambda step: jnp.minimum(plan.event_index(step), len(table) - 1)
    if structure.kind == "weight":
      return plan.is_event, _weight_event(rule, table, clipped, seed)
    if structure.kind == "unit":
      units = _units(masks, params, kernel_layout, groups)
      if structure.flops is not None:
        table = _flops_table(plan, structure.flops)
      return plan.is_event, _unit_event(rule, table, clipped, seed, units, structure)
    per_group = _n_of_m_table(table, sum(sizes(masks)), structure)
    axes = _input_axes(masks, params, kernel_layout)
    return plan.is_event, _n_of_m_event(rule, per_group, clipped, seed, axes, structure.m)

  return check_leaves, make_event
