"""A NumPy reference of FlipOut pruning, written from the project's algorithm document.

It restates ``docs/algorithm.md`` (checked against the specification) and
shares no code with flipout_jax: schedule, counts, flip counting, scoring and
the selection (a stable argsort of the concatenated scores) are restated here.
Only the random criterion's uniform draws come from ``jax.random``, because
the algorithm fixes them to JAX's generator.
"""

import math
import zlib

import numpy as np

# The random criterion's own stream: fold_in(fold_in(key(seed), tag), step).
RANDOM_STREAM_TAG = zlib.crc32(b"flipout_jax/random_criterion") & 0x7FFFFFFF


def reference_events(target, total_steps, prune_every, rate):
  """Event steps -> None (rate step) or 'final' for the last target-mode event."""
  if prune_every is None:
    k = 0
    while 1 - (1 - rate) ** k < target:
      k += 1
    interval = round(total_steps / (k + 1))
    steps = [i * interval for i in range(1, k + 1)]
    return {s: ("final" if i == k - 1 else None) for i, s in enumerate(steps)}
  last = total_steps - 1 if total_steps else 10**4  # never an event at the last step
  return {s: None for s in range(prune_every, last + 1, prune_every)}


def reference_cubic_fractions(initial, final, begin, end, every):
  """Cubic events (Zhu & Gupta, 2017): step -> sparsity reached at that step.

  Events at begin, begin + every, ... before end, and at end;
  s_t = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin))^3, s_f at end.
  """
  steps = list(range(begin, end, every)) + [end]
  return {
      t: final if t == end else final + (initial - final) * (1 - (t - begin) / (end - begin)) ** 3
      for t in steps
  }


def _wanted(size, pruned, rate, target, final):
  if final:
    return round(target * size)
  wanted = pruned + math.floor((size - pruned) * rate)
  if target is not None:
    wanted = min(wanted, round(target * size))
  return wanted


def _select_lowest(scores, live, count):
  """Indices of the `count` live entries with the lowest score (stable order)."""
  scores = np.where(np.isnan(scores), np.inf, scores)
  live_index = np.flatnonzero(live)
  order = np.argsort(scores[live_index], kind="stable")
  return live_index[order[:count]]


def score_dtype(dtype):
  """Scores are float32 at least: float64 weights keep float64 scores."""
  return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def random_scores(shapes, seed, step):
  """Uniform float32 draws, one split key per prunable leaf in leaf order."""
  import jax  # pylint: disable=g-import-not-at-top

  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), RANDOM_STREAM_TAG), step)
  keys = jax.random.split(key, len(shapes))
  return [np.asarray(jax.random.uniform(k, shape, np.float32)) for k, shape in zip(keys, shapes)]


def _scores(criterion, new, flips, p, seed, step):
  if callable(criterion):
    return criterion(new, flips)
  if criterion == "random":
    return random_scores([n.shape for n in new], seed, step)
  wide = [n.astype(score_dtype(n.dtype)) for n in new]
  if criterion == "flipout":
    return [np.abs(w) ** w.dtype.type(p) / (f + 1).astype(w.dtype) for w, f in zip(wide, flips)]
  return [np.abs(w) for w in wide]


def simulate(
    weights,
    updates,
    *,
    target=None,
    total_steps=None,
    prune_every=None,
    rate=0.5,
    p=2.0,
    criterion="flipout",
    seed=0,
    cubic=None,
    structure="weight",
    groups=None,
    group_score="mean",
    min_units=1,
    output_axes=None,
    input_axes=None,
):
  """Runs prune as the last link of a chain whose updates are given.

  ``cubic``: ``(initial_sparsity, begin_step, end_step, prune_every)`` for
  ``schedule="cubic"``: each event prunes up to ``round(s_t * size)`` of its
  group (never fewer than already pruned); ``target`` is the final sparsity.

  Args:
    weights: list of float arrays (the prunable leaves, in leaf order), of any
      float dtype (bfloat16 as ``ml_dtypes.bfloat16``); updates are applied in
      that dtype, as ``optax.apply_updates`` does.
    updates: list over steps of lists of arrays.
    criterion: "flipout", "global_magnitude", "magnitude", "random", or a
      NumPy function ``(weights, flips) -> scores`` over lists of arrays.
    structure: "weight", "unit" or (N, M). Structured events count from the
      count the schedule reached at the previous event (as weight pruning
      would have), not from what whole units or runs of M overshot it by.
    groups: "unit": per leaf, the group id of each output unit (-1: never
      pruned); None: each unit its own group.
    output_axes, input_axes: per leaf (default: -1 and -2, Flax's layout).

  Yields per step: (weights, masks, flips), lists of arrays.
  """
  weights = [np.array(w) for w in weights]
  masks = [np.ones(w.shape, bool) for w in weights]
  flips = [np.zeros(w.shape, np.int32) for w in weights]
  # Per scope, the count the schedule has reached: whole units and runs of M overshoot
  # it, and the next event counts from the schedule's count, not from theirs.
  scheduled = {}
  if cubic is None:
    events = reference_events(target, total_steps, prune_every, rate)
  else:
    events = reference_cubic_fractions(cubic[0], target, *cubic[1:])
  for step, step_updates in enumerate(updates, start=1):
    new = [
        np.where(m, (w + u).astype(w.dtype), w.dtype.type(0))
        for w, u, m in zip(weights, step_updates, masks)
    ]
    # sign(0) = 0: moving onto or off exactly zero is a flip.
    flips = [
        np.where(m, f + (np.sign(n) != np.sign(w)), 0).astype(np.int32)
        for f, n, w, m in zip(flips, new, weights, masks)
    ]
    if step in events:
      final = events[step] == "final"
      scores = _scores(criterion, new, flips, p, seed, step)
      # N:M prunes the same share of every run, counted over the whole network.
      layerwise = criterion == "magnitude" and not isinstance(structure, tuple)
      scopes = [[i] for i in range(len(new))] if layerwise else [list(range(len(new)))]
      unit_choice = None
      if structure == "unit":
        unit_choice = _UnitChoice(
            new, scores, masks, output_axes or [-1] * len(new), groups, group_score, min_units
        )
      for scope, group in enumerate(scopes):
        size = sum(new[i].size for i in group)
        pruned = sum(int((~masks[i]).sum()) for i in group)
        before = scheduled.get(scope, 0) if structure != "weight" else pruned
        if cubic is None:
          wanted = _wanted(size, before, rate, target, final)
        else:
          wanted = max(round(events[step] * size), before)
        scheduled[scope] = wanted
        count = wanted - pruned
        if isinstance(structure, tuple):
          masks = _n_of_m_masks(
              scores, masks, input_axes or [-2] * len(new), *structure, count + pruned, size
          )
          continue
        if unit_choice is not None:
          masks = unit_choice.prune(group, count)
          continue
        flat_scores = np.concatenate([scores[i].ravel() for i in group])
        flat_live = np.concatenate([masks[i].ravel() for i in group])
        chosen = _select_lowest(flat_scores, flat_live, max(count, 0))
        flat_masks = flat_live.copy()
        flat_masks[chosen] = False
        offset = 0
        for i in group:
          masks[i] = flat_masks[offset : offset + new[i].size].reshape(new[i].shape)
          offset += new[i].size
      flips = [np.where(m, f, 0).astype(np.int32) for f, m in zip(flips, masks)]
      new = [np.where(m, n, n.dtype.type(0)) for n, m in zip(new, masks)]
    weights = new
    yield weights, masks, flips


class _UnitChoice:
  """Structure "unit": groups of output units, scored by the mean (or sum) of their
  weights' scores in float64, ranked by a stable sort; each leaf keeps its min_units best
  live units; an event takes the fewest lowest groups whose weights reach its count."""

  def __init__(self, new, scores, masks, output_axes, groups, group_score, min_units):
    self.masks = [m.copy() for m in masks]
    self.axes = output_axes
    columns = [np.moveaxis(s, a, -1).reshape(-1, s.shape[a]) for s, a in zip(scores, output_axes)]
    if groups is None:
      offsets = np.cumsum([0] + [c.shape[1] for c in columns])
      groups = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(columns))]
    self.ids = [np.asarray(g) for g in groups]
    count = max([int(g.max(initial=-1)) for g in self.ids] + [-1]) + 1
    sums, weights = np.zeros(count), np.zeros(count, np.int64)
    bad, live = np.zeros(count, bool), np.zeros(count, bool)
    for c, ids, m, a in zip(columns, self.ids, masks, output_axes):
      unit_live = np.moveaxis(m, a, -1).reshape(-1, m.shape[a]).any(axis=0)
      for unit, group in enumerate(ids):
        if group >= 0:
          sums[group] += np.where(np.isfinite(c[:, unit]), c[:, unit], 0).astype(np.float64).sum()
          bad[group] |= not np.isfinite(c[:, unit]).all()
          weights[group] += c.shape[0]
          live[group] |= unit_live[unit]
    values = sums / np.maximum(weights, 1) if group_score == "mean" else sums
    self.values = np.where(bad, np.inf, values)
    self.weights = weights
    protected = np.zeros(count, bool)
    for ids, m, a in zip(self.ids, masks, output_axes):
      unit_live = np.moveaxis(m, a, -1).reshape(-1, m.shape[a]).any(axis=0)
      unit_values = np.array([np.inf if g < 0 else self.values[g] for g in ids])
      order = [u for u in np.argsort(-unit_values, kind="stable") if unit_live[u]]
      for unit in order[:min_units]:
        if ids[unit] >= 0:
          protected[ids[unit]] = True
    self.candidates = live & ~protected

  def prune(self, leaves, count):
    """Masks after pruning the fewest lowest candidate groups of ``leaves`` weighing ``count``."""
    scope = np.zeros(len(self.values), bool)
    for i in leaves:
      scope[self.ids[i][self.ids[i] >= 0]] = True
    candidates = np.flatnonzero(self.candidates & scope)
    order = candidates[np.argsort(self.values[candidates].astype(np.float32), kind="stable")]
    reached = np.cumsum(self.weights[order]) >= count
    chosen = order[: int(np.argmax(reached)) + 1] if count > 0 and reached.any() else order
    chosen = chosen if count > 0 else order[:0]
    for i in leaves:
      gone = np.isin(self.ids[i], chosen) & (self.ids[i] >= 0)
      shape = [1] * self.masks[i].ndim
      shape[self.axes[i]] = gone.size
      self.masks[i] = self.masks[i] & ~gone.reshape(shape)
    return self.masks


def _n_of_m_masks(scores, masks, input_axes, n, m, wanted, size):
  """Structure (N, M): in every run of m weights along the input axis, the lowest-scored
  (dead ones first, then by score, then by position) go, round(wanted / size * m) of them
  (half up), at most m - n."""
  per_run = min((2 * wanted * m + size) // (2 * size), m - n)
  result = []
  for s, mask, axis in zip(scores, masks, input_axes):
    s = np.moveaxis(np.where(np.isnan(s), np.inf, s), axis, -1)
    live = np.moveaxis(mask, axis, -1).copy()
    runs_s, runs_live = s.reshape(-1, m), live.reshape(-1, m)
    for run_s, run_live in zip(runs_s, runs_live):
      order = np.lexsort((np.arange(m), run_s.astype(np.float32), run_live))
      run_live[order[:per_run]] = False
    result.append(np.moveaxis(runs_live.reshape(live.shape), -1, axis))
  return result
