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
import numpy as np

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


class Criterion(NamedTuple):
  """A pruning criterion, as ``prune`` takes it: build one with :func:`flipout_criterion`,
  :func:`random_criterion` or :func:`magnitude_criterion`, or pass a name or a callable."""

  score: Callable[..., Any]  # (params, flips, key) -> scores, lowest pruned first
  layerwise: bool = False  # rank inside each leaf instead of globally
  seed: int = 0  # the base of ``key``'s stream (random_criterion_key)
  # score takes the event step's final update too: (params, flips, key, updates).
  reads_updates: bool = False


def scores(rule: Criterion, params: Callable, flips: Callable, key, updates: Callable) -> Any:
  """``rule``'s scores at an event; the trees are functions, called only if ``rule`` reads
  them (each call recomputes its tree inside the fused pass that reads it)."""
  if rule.reads_updates:
    return rule.score(params(), flips(), key, updates())
  return rule.score(params(), flips(), key)


CRITERIA = ("flipout", "global_magnitude", "magnitude", "random", "taylor")


def _ignore_key(score):
  return lambda params, flips, key: score(params, flips)


def flipout_criterion(p: float = 2.0) -> Criterion:
  r"""FlipOut's saliency :math:`|w|^p / (\mathrm{flips} + 1)`, ranked globally
  (``criterion="flipout"`` is ``flipout_criterion(2.0)``).

  Args:
    p: exponent of ``|w|``, ``> 0``.

  Raises:
    TypeError, ValueError: ``p`` is not a number ``> 0``.
  """
  if isinstance(p, bool) or not isinstance(p, (int, float, np.number)):
    raise TypeError(f"p must be a positive number, got {type(p).__name__}")
  if not p > 0:
    raise ValueError(f"p must be > 0, got {p}")
  return Criterion(_ignore_key(functools.partial(flipout_scores, p=float(p))))


def magnitude_criterion(layerwise: bool = False) -> Criterion:
  """``|w|``, ranked over all prunable leaves (``criterion="global_magnitude"``) or inside
  each leaf, whose counts then use the leaf's own size (``layerwise=True``,
  ``criterion="magnitude"``)."""
  if not isinstance(layerwise, bool):
    raise TypeError(f"layerwise must be a bool, got {type(layerwise).__name__}")
  return Criterion(_ignore_key(magnitude_scores), layerwise)


def random_criterion(seed: int = 0) -> Criterion:
  """Uniform scores: live weights pruned uniformly at random (``criterion="random"`` is
  ``random_criterion(0)``).

  Its draws at step ``t`` come from ``fold_in(fold_in(key(seed), 0x602ACC76), t)``, a stream
  of their own (the tag is ``zlib.crc32(b"flipout_jax/random_criterion") & 0x7FFFFFFF``), so
  they never coincide with the ``fold_in(key(seed), t)`` keys of a data pipeline or with
  gradient noise's stream.

  Raises:
    TypeError: ``seed`` is not an int.
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {type(seed).__name__}")
  return Criterion(lambda params, flips, key: random_scores(params, flips, key=key), seed=int(seed))


def taylor_scores(params: Any, updates: Any) -> Any:
  r"""First-order Taylor saliency :math:`|w \cdot \Delta w|`, float32 at least: the
  estimated change of the loss when ``w`` is removed, :math:`|g \cdot w|` (Molchanov et
  al.), with the step's final update :math:`\Delta w` standing in for :math:`-\eta g`."""
  return jax.tree.map(lambda w, u: jnp.abs(_wide(w) * _wide(u)), params, updates)


def taylor_criterion() -> Criterion:
  r"""First-order Taylor importance :math:`|w \cdot \Delta w|`, ranked globally
  (``criterion="taylor"``).

  :math:`\Delta w` is the update ``prune`` receives at the event step, the optimizer's
  final one: exactly :math:`-\eta g` under plain SGD, a momentum-smoothed gradient under
  momentum, a preconditioned one under Adam; gradient noise chained before the optimizer is
  part of it. One step's update: by units, each group sums it over its weights.
  """
  return Criterion(
      lambda params, flips, key, updates: taylor_scores(params, updates), reads_updates=True
  )


_NAMED = {
    "flipout": flipout_criterion,
    "global_magnitude": magnitude_criterion,
    "magnitude": lambda: magnitude_criterion(layerwise=True),
    "random": random_criterion,
    "taylor": taylor_criterion,
}


def resolve(criterion) -> Criterion:
  """Turns the ``criterion`` argument of ``prune`` into a :class:`Criterion`."""
  if isinstance(criterion, Criterion):
    return criterion
  if callable(criterion):
    return Criterion(_ignore_key(criterion))
  if not isinstance(criterion, str):
    raise TypeError(
        f"criterion must be one of {CRITERIA}, a Criterion or a callable (params, flips) -> "
        f"scores, got {type(criterion).__name__}"
    )
  if criterion not in _NAMED:
    raise ValueError(
        f"criterion must be one of {CRITERIA}, a Criterion or a callable, got {criterion!r}"
    )
  return _NAMED[criterion]()
