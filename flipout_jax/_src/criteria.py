"""Pruning criteria: small functions from ``(params, flips)`` to scores.

Every criterion receives the prunable parameters and their flip counts as two
trees shaped like the model's params with ``None`` at leaves that are not
prunable, and returns a tree of scores of the same shape. Weights with the
lowest scores are pruned first. ``jax.tree.map(f, params, flips)`` already
skips the ``None`` leaves, so a user criterion is usually one line.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Criterion = Callable[[Any, Any], Any]


def flipout_scores(params, flips, *, p: float = 2.0):
  r"""FlipOut saliency :math:`|w|^p / (\mathrm{flips}(w) + 1)`."""
  return jax.tree.map(
      lambda w, f: jnp.abs(w) ** p / (f + 1).astype(jnp.result_type(w)), params, flips
  )


def magnitude_scores(params, flips):
  """Magnitude saliency :math:`|w|` (flip counts are ignored)."""
  del flips
  return jax.tree.map(jnp.abs, params)


def random_scores(params, flips, *, key: jax.Array):
  """Uniform random scores: prunes live weights uniformly at random."""
  del flips
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(
      treedef, [jax.random.uniform(k, w.shape, jnp.float32) for k, w in zip(keys, leaves)]
  )


class _Rule(NamedTuple):
  score: Callable[..., Any]  # (params, flips, key) -> scores
  layerwise: bool  # rank inside each leaf instead of globally


CRITERIA = ("flipout", "global_magnitude", "magnitude", "random")


def _ignore_key(score):
  return lambda params, flips, key: score(params, flips)


def resolve(criterion, p: float) -> _Rule:
  """Turns the ``criterion`` argument of ``prune`` into a scoring rule."""
  if callable(criterion):
    return _Rule(_ignore_key(criterion), layerwise=False)
  if not isinstance(criterion, str):
    raise TypeError(
        f"criterion must be one of {CRITERIA} or a callable (params, flips) -> "
        f"scores, got {type(criterion).__name__}"
    )
  rules = {
      "flipout": _Rule(_ignore_key(functools.partial(flipout_scores, p=p)), False),
      "global_magnitude": _Rule(_ignore_key(magnitude_scores), False),
      "magnitude": _Rule(_ignore_key(magnitude_scores), True),
      "random": _Rule(lambda params, flips, key: random_scores(params, flips, key=key), False),
  }
  if criterion not in rules:
    raise ValueError(f"criterion must be one of {CRITERIA} or a callable, got {criterion!r}")
  return rules[criterion]
