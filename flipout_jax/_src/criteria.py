"""Pruning criteria: small functions from ``(params, flips)`` to scores.

Every criterion receives the prunable parameters and their flip counts as two
trees shaped like the model's params with ``None`` at leaves that are not
prunable, and returns a tree of scores of the same shape. Weights with the
lowest scores are pruned first. ``jax.tree.map(f, params, flips)`` already
skips the ``None`` leaves, so a user criterion is usually one line.

Built-in scores are float32 at least (float64 weights keep float64 scores):
``|w|^2`` of a float16 weight below about 2.4e-4 would be 0 in float16, and
such weights would then be pruned by position instead of by saliency. See
``docs/algorithm.md`` ("Saliency and what is prunable", "Baselines and custom criteria").
"""

import functools
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Criterion = Callable[[Any, Any], Any]

# The random criterion draws from its own stream,
# ``fold_in(fold_in(key(seed), RANDOM_CRITERION_STREAM), step)``, so that it
# never reuses the ``fold_in(key(seed), step)`` keys of a data pipeline, nor
# gradient noise's stream (another tag), for the same seed. 31 bits, like
# gradient noise's tag, so that it is a valid int32 wherever JAX wants one.
RANDOM_CRITERION_STREAM = zlib.crc32(b"flipout_jax/random_criterion") & 0x7FFFFFFF  # 0x602ACC76


def random_criterion_key(seed: int, step: jax.Array) -> jax.Array:
  """Key of the random criterion's draws at ``step`` (see RANDOM_CRITERION_STREAM)."""
  stream = jax.random.fold_in(jax.random.key(seed), RANDOM_CRITERION_STREAM)
  return jax.random.fold_in(stream, step)


def _wide(w: jax.Array) -> jax.Array:
  """``w`` as float32 at least: bfloat16 and float16 scores would round to ties."""
  return w.astype(jnp.promote_types(w.dtype, jnp.float32))


def flipout_scores(params: Any, flips: Any, *, p: float = 2.0) -> Any:
  r"""FlipOut saliency :math:`|w|^p / (\mathrm{flips}(w) + 1)`, float32 at least."""

  def score(w, f):
    w = _wide(w)
    return jnp.abs(w) ** p / (f + 1).astype(w.dtype)

  return jax.tree.map(score, params, flips)


def magnitude_scores(params: Any, flips: Any) -> Any:
  """Magnitude saliency :math:`|w|` (flip counts are ignored), float32 at least."""
  del flips
  return jax.tree.map(lambda w: jnp.abs(_wide(w)), params)


def random_scores(params: Any, flips: Any, *, key: jax.Array) -> Any:
  """Uniform float32 scores: prunes live weights uniformly at random.

  One key per leaf, ``jax.random.split(key, num_leaves)``, in leaf order.
  ``prune`` passes :func:`random_criterion_key` of its seed and step.
  """
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
