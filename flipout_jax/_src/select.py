"""Exact selection of the k lowest scores over many arrays, without sorting.

A pruning event must remove exactly the ``k`` live weights with the lowest
scores. Sorting all ``N`` scores costs ``O(N log N)`` and, on CPU, seconds for
tens of millions of weights. Instead each score is mapped to an unsigned 32-bit
key whose integer order is the float order, and the ``k``-th smallest key is
found by a binary search over the 2**32 key values: 32 counting passes over the
keys, so ``O(32 N)`` with no sort and no concatenation of the leaves.

Ties at the threshold are broken by position: leaf order (``jax.tree.leaves``
order) first, then row-major index inside the leaf. That is the order of a
stable ascending sort of the concatenated scores, which is what the NumPy
reference in the tests does.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Larger than the key of any live score (the key of +inf is 0xFF800000), so
# weights that are already pruned are chosen last and never counted twice.
_PRUNED_KEY = 0xFFFFFFFF
_SIGN_BIT = 0x80000000
_SAMPLE_SIZE = 1 << 16


def sortable_keys(scores: jax.Array, live: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order; dead weights last.

  NaN scores rank as +inf (the most salient: a non-finite weight is never
  preferred over a finite one), ``-0.0`` ranks as ``+0.0``.
  """
  scores = jnp.asarray(scores, jnp.float32)
  scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
  scores = jnp.where(scores == 0, 0.0, scores)  # XLA folds `x + 0.0` away
  bits = jax.lax.bitcast_convert_type(scores, jnp.uint32)
  negative = (bits & jnp.uint32(_SIGN_BIT)) != 0
  # IEEE floats compare like sign-magnitude integers: flip all bits of
  # negatives and only the sign bit of positives to get two's order.
  keys = jnp.where(negative, ~bits, bits | jnp.uint32(_SIGN_BIT))
  return jnp.where(live, keys, jnp.uint32(_PRUNED_KEY))


def _count_at_most(keys: Sequence[jax.Array], threshold: jax.Array) -> jax.Array:
  return sum(jnp.sum(k <= threshold, dtype=jnp.int32) for k in keys)


def _sample(keys: Sequence[jax.Array], size: int) -> jax.Array:
  """``size`` keys at fixed pseudo-random positions of the concatenation."""
  sizes = [key.size for key in keys]
  positions = np.sort(np.random.default_rng(0).choice(sum(sizes), size, replace=False))
  starts = np.cumsum([0] + sizes)
  parts = []
  for key, start, stop in zip(keys, starts[:-1], starts[1:]):
    inside = positions[(positions >= start) & (positions < stop)] - start
    if inside.size:
      parts.append(key.ravel()[inside])
  return jnp.concatenate(parts)


def _search_bounds(keys: Sequence[jax.Array], k: jax.Array):
  """A narrow key range that surely holds the threshold, or the full range.

  The k-th smallest of a random sample brackets the k-th smallest key; one
  counting pass checks the bracket, so a bad sample only costs speed.
  """
  total = sum(key.size for key in keys)
  if total <= 16 * _SAMPLE_SIZE:
    return jnp.uint32(0), jnp.uint32(_PRUNED_KEY)
  sample = jnp.sort(_sample(keys, _SAMPLE_SIZE))
  rank = k.astype(jnp.float32) * (_SAMPLE_SIZE / total)
  margin = 3 * np.sqrt(_SAMPLE_SIZE) + 16  # 6 sigma: a binomial std is <= sqrt(n)/2
  low_index = jnp.floor(rank - margin).astype(jnp.int32)
  high_index = jnp.ceil(rank + margin).astype(jnp.int32)
  low = jnp.where(low_index < 0, jnp.uint32(0), sample[jnp.clip(low_index, 0, _SAMPLE_SIZE - 1)])
  high = jnp.where(
      high_index >= _SAMPLE_SIZE,
      jnp.uint32(_PRUNED_KEY),
      sample[jnp.clip(high_index, 0, _SAMPLE_SIZE - 1)],
  )
  holds = (sum(jnp.sum(key < low, dtype=jnp.int32) for key in keys) < k) & (
      _count_at_most(keys, high) >= k
  )
  return (jnp.where(holds, low, jnp.uint32(0)), jnp.where(holds, high, jnp.uint32(_PRUNED_KEY)))


def lowest_k(keys: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Boolean masks marking exactly the ``k`` smallest keys across all arrays.

  Args:
    keys: uint32 arrays from :func:`sortable_keys`.
    k: number to select (traced int32 scalar), ``0 <= k <= total size``.

  Returns:
    One boolean array per key array; exactly ``k`` entries are True in total.
  """
  k = jnp.asarray(k, jnp.int32)

  def halve(bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    enough = _count_at_most(keys, middle) >= k
    return (jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high))

  # Invariant: the smallest t with count(keys <= t) >= k lies in [low, high].
  threshold, _ = jax.lax.while_loop(
      lambda bounds: bounds[0] < bounds[1], halve, _search_bounds(keys, k)
  )
  below = [key < threshold for key in keys]
  ties = [key == threshold for key in keys]
  ties_wanted = k - sum(jnp.sum(b, dtype=jnp.int32) for b in below)
  ties_found = sum(jnp.sum(t, dtype=jnp.int32) for t in ties)
  # Usually every key equal to the threshold is wanted; only otherwise rank the
  # ties by position, since a cumulative sum costs several counting passes.
  chosen_ties = jax.lax.cond(
      ties_found == ties_wanted, lambda: ties, lambda: _first_ties(ties, ties_wanted)
  )
  return [b | t for b, t in zip(below, chosen_ties)]


def _first_ties(ties: Sequence[jax.Array], wanted: jax.Array) -> list[jax.Array]:
  """The first ``wanted`` True entries of ``ties`` in leaf, then index, order."""
  chosen = []
  before = jnp.int32(0)
  for tie in ties:
    rank = before + jnp.cumsum(tie.ravel(), dtype=jnp.int32).reshape(tie.shape)
    chosen.append(tie & (rank <= wanted))
    before = before + jnp.sum(tie, dtype=jnp.int32)
  return chosen
