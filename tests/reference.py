"""A NumPy reference of FlipOut pruning, written from docs/algorithm.md alone.

It shares no code with flipout_jax: schedule, counts, flip counting and the
selection (a stable argsort of the concatenated scores) are restated here.
"""

import math

import numpy as np


def reference_events(target, total_steps, prune_every, rate):
  """Event steps -> None (rate step) or 'final' for the last target-mode event."""
  if prune_every is None:
    k = 0
    while 1 - (1 - rate) ** k < target:
      k += 1
    interval = round(total_steps / (k + 1))
    steps = [i * interval for i in range(1, k + 1)]
    return {s: ("final" if i == k - 1 else None) for i, s in enumerate(steps)}
  last = total_steps - 1 if total_steps else 10**4
  return {s: None for s in range(prune_every, last + 1, prune_every)}


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
):
  """Runs prune as the last link of a chain whose updates are given.

  Args:
    weights: list of float32 arrays (the prunable leaves, in leaf order).
    updates: list over steps of lists of float32 arrays.

  Yields per step: (weights, masks, flips), lists of arrays.
  """
  weights = [np.array(w, np.float32) for w in weights]
  masks = [np.ones(w.shape, bool) for w in weights]
  flips = [np.zeros(w.shape, np.int32) for w in weights]
  events = reference_events(target, total_steps, prune_every, rate)
  for step, step_updates in enumerate(updates, start=1):
    new = [
        np.where(m, (w + u).astype(np.float32), np.float32(0))
        for w, u, m in zip(weights, step_updates, masks)
    ]
    flips = [
        np.where(m, f + (np.sign(n) != np.sign(w)), 0).astype(np.int32)
        for f, n, w, m in zip(flips, new, weights, masks)
    ]
    if step in events:
      final = events[step] == "final"
      if criterion == "flipout":
        scores = [
            (np.abs(n) ** np.float32(p) / (f + 1).astype(np.float32)).astype(np.float32)
            for n, f in zip(new, flips)
        ]
      else:
        scores = [np.abs(n) for n in new]
      groups = (
          [[i] for i in range(len(new))] if criterion == "magnitude" else [list(range(len(new)))]
      )
      for group in groups:
        size = sum(new[i].size for i in group)
        pruned = sum(int((~masks[i]).sum()) for i in group)
        count = _wanted(size, pruned, rate, target, final) - pruned
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
      new = [np.where(m, n, np.float32(0)) for n, m in zip(new, masks)]
    weights = new
    yield weights, masks, flips
