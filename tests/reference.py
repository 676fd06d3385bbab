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

  Yields per step: (weights, masks, flips), lists of arrays.
  """
  weights = [np.array(w) for w in weights]
  masks = [np.ones(w.shape, bool) for w in weights]
  flips = [np.zeros(w.shape, np.int32) for w in weights]
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
      groups = (
          [[i] for i in range(len(new))] if criterion == "magnitude" else [list(range(len(new)))]
      )
      for group in groups:
        size = sum(new[i].size for i in group)
        pruned = sum(int((~masks[i]).sum()) for i in group)
        if cubic is None:
          count = _wanted(size, pruned, rate, target, final) - pruned
        else:
          count = max(round(events[step] * size), pruned) - pruned
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
