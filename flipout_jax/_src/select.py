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

# Larger than the key of any live score (the key of +inf is 0xFF800000), so
# weights that are already pruned are chosen last and never counted twice.
_PRUNED_KEY = 0xFFFFFFFF
_SIGN_BIT = 0x80000000


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


def lowest_k(keys: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Boolean masks marking exactly the ``k`` smallest keys across all arrays.

  Args:
    keys: uint32 arrays from :func:`sortable_keys`.
    k: number to select (traced int32 scalar), ``0 <= k <= total size``.

  Returns:
    One boolean array per key array; exactly ``k`` entries are True in total.
  """
  k = jnp.asarray(k, jnp.int32)

  def halve(_, bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    enough = _count_at_most(keys, middle) >= k
    return (jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high))

  # Invariant: the smallest t with count(keys <= t) >= k lies in [low, high].
  threshold, _ = jax.lax.fori_loop(
      0, 32, halve, (jnp.uint32(0), jnp.uint32(_PRUNED_KEY)))
  below = [key < threshold for key in keys]
  ties_wanted = k - sum(jnp.sum(b, dtype=jnp.int32) for b in below)
  selected = []
  ties_before = jnp.int32(0)
  for key, key_below in zip(keys, below):
    tie = key == threshold
    tie_rank = ties_before + jnp.cumsum(tie.ravel(), dtype=jnp.int32).reshape(tie.shape)
    selected.append(key_below | (tie & (tie_rank <= ties_wanted)))
    ties_before = ties_before + jnp.sum(tie, dtype=jnp.int32)
  return selected
