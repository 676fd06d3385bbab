"""Exact selection of the k lowest scores over many arrays, without sorting.

A pruning event must remove exactly the ``k`` live weights with the lowest
scores. Sorting all ``N`` scores costs ``O(N log N)`` and, on CPU, seconds for
tens of millions of weights. Instead each score is mapped to an unsigned
integer key whose integer order is the float order, and the ``k``-th smallest
key is found by a binary search over the key values: one counting pass over the
keys per key bit, so ``O(32 N)`` with no sort and no concatenation of the
leaves (``docs/algorithm.md``, "Selection without a sort").

Scores are compared as float32 (uint32 keys), or as float64 (uint64 keys, 64
passes) when any score is float64, which needs ``jax_enable_x64``: float64
scores that are equal in float32 are still ranked exactly. Counts are int32,
or int64 for 2**31 weights or more, which also needs ``jax_enable_x64``.

Ties at the threshold are broken by position: leaf order (``jax.tree.leaves``
order) first, then row-major index inside the leaf. That is the order of a
stable ascending sort of the concatenated scores, which is what the NumPy
reference in the tests does.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_SAMPLE_SIZE = 1 << 16
MAX_INT32_COUNT = 2**31 - 1


class _KeyFormat(NamedTuple):
  float_type: type
  key_type: type
  sign_bit: int
  # Larger than the key of any live score (the key of +inf is the sign bit
  # plus the exponent bits), so weights that are already pruned are chosen
  # last and never counted twice.
  pruned: int


_KEYS_32 = _KeyFormat(jnp.float32, jnp.uint32, 1 << 31, 2**32 - 1)
_KEYS_64 = _KeyFormat(jnp.float64, jnp.uint64, 1 << 63, 2**64 - 1)


def count_dtype(size: int):
  """Integer dtype that counts up to ``size`` weights: int32, or int64 with x64.

  Raises:
    ValueError: ``size`` needs int64 but ``jax_enable_x64`` is off.
  """
  if size <= MAX_INT32_COUNT:
    return np.int32
  if not jax.config.jax_enable_x64:
    raise ValueError(
        f"flipout: {size} prunable weights are ranked together, more than the 2**31 - 1 "
        "prunable weights that int32 counts can hold. Enable 64-bit counts with "
        "jax.config.update('jax_enable_x64', True) (or JAX_ENABLE_X64=1) before building "
        "the optimizer state, or prune fewer leaves (`where`)."
    )
  return np.int64


def _key_format(dtype) -> _KeyFormat:
  return _KEYS_64 if jnp.dtype(dtype) == jnp.float64 else _KEYS_32


def sortable_keys(scores: jax.Array, live: jax.Array) -> jax.Array:
  """Maps float scores to unsigned keys with the same order; dead weights last.

  float64 scores give uint64 keys, all others (float32, half precision,
  integers) are compared as float32 and give uint32 keys. NaN scores rank as
  +inf (the most salient: a non-finite weight is never preferred over a finite
  one), ``-0.0`` ranks as ``+0.0``.
  """
  scores = jnp.asarray(scores)
  keys = _key_format(scores.dtype)
  scores = scores.astype(keys.float_type)
  scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
  scores = jnp.where(scores == 0, 0.0, scores)  # XLA folds `x + 0.0` away
  bits = jax.lax.bitcast_convert_type(scores, keys.key_type)
  negative = (bits & keys.key_type(keys.sign_bit)) != 0
  # IEEE floats compare like sign-magnitude integers: flip all bits of
  # negatives and only the sign bit of positives to get two's order.
  ordered = jnp.where(negative, ~bits, bits | keys.key_type(keys.sign_bit))
  return jnp.where(live, ordered, keys.key_type(keys.pruned))


def _widen(keys: jax.Array) -> jax.Array:
  """uint32 keys as the uint64 keys of the same scores taken as float64."""
  if keys.dtype == jnp.uint64:
    return keys
  sign = jnp.uint32(_KEYS_32.sign_bit)
  positive = (keys & sign) != 0
  bits = jnp.where(positive, keys ^ sign, ~keys)
  scores = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return jnp.where(
      keys == jnp.uint32(_KEYS_32.pruned),
      jnp.uint64(_KEYS_64.pruned),
      sortable_keys(scores.astype(jnp.float64), True),
  )


def _common_format(keys: Sequence[jax.Array]) -> tuple[list[jax.Array], _KeyFormat]:
  if any(k.dtype == jnp.uint64 for k in keys):
    return [_widen(k) for k in keys], _KEYS_64
  return list(keys), _KEYS_32


def _count_at_most(keys: Sequence[jax.Array], threshold: jax.Array, dtype) -> jax.Array:
  return sum(jnp.sum(k <= threshold, dtype=dtype) for k in keys)


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


def _search_bounds(keys: Sequence[jax.Array], k: jax.Array, form: _KeyFormat):
  """A narrow key range that surely holds the threshold, or the full range.

  The k-th smallest of a random sample brackets the k-th smallest key; one
  counting pass checks the bracket, so a bad sample only costs speed.
  """
  total = sum(key.size for key in keys)
  lowest, highest = form.key_type(0), form.key_type(form.pruned)
  if total <= 16 * _SAMPLE_SIZE:
    return lowest, highest
  sample = jnp.sort(_sample(keys, _SAMPLE_SIZE))
  rank = k.astype(jnp.float32) * (_SAMPLE_SIZE / total)
  margin = 3 * np.sqrt(_SAMPLE_SIZE) + 16  # 6 sigma: a binomial std is <= sqrt(n)/2
  low_index = jnp.floor(rank - margin).astype(jnp.int32)
  high_index = jnp.ceil(rank + margin).astype(jnp.int32)
  low = jnp.where(low_index < 0, lowest, sample[jnp.clip(low_index, 0, _SAMPLE_SIZE - 1)])
  high = jnp.where(
      high_index >= _SAMPLE_SIZE, highest, sample[jnp.clip(high_index, 0, _SAMPLE_SIZE - 1)]
  )
  holds = (sum(jnp.sum(key < low, dtype=k.dtype) for key in keys) < k) & (
      _count_at_most(keys, high, k.dtype) >= k
  )
  return jnp.where(holds, low, lowest), jnp.where(holds, high, highest)


def lowest_k(keys: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Boolean masks marking exactly the ``k`` smallest keys across all arrays.

  Args:
    keys: arrays from :func:`sortable_keys`; uint32 keys are widened when
      others are uint64, so float32 and float64 scores rank together.
    k: number to select (traced integer scalar), ``0 <= k <= total size``.

  Returns:
    One boolean array per key array; exactly ``k`` entries are True in total.
  """
  keys, form = _common_format(keys)
  k = jnp.asarray(k, count_dtype(sum(key.size for key in keys)))

  def halve(bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    enough = _count_at_most(keys, middle, k.dtype) >= k
    return (jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high))

  # Invariant: the smallest t with count(keys <= t) >= k lies in [low, high].
  threshold, _ = jax.lax.while_loop(
      lambda bounds: bounds[0] < bounds[1], halve, _search_bounds(keys, k, form)
  )
  below = [key < threshold for key in keys]
  ties = [key == threshold for key in keys]
  ties_wanted = k - sum(jnp.sum(b, dtype=k.dtype) for b in below)
  ties_found = sum(jnp.sum(t, dtype=k.dtype) for t in ties)
  # Usually every key equal to the threshold is wanted; only otherwise rank the
  # ties by position, since a cumulative sum costs several counting passes.
  chosen_ties = jax.lax.cond(
      ties_found == ties_wanted, lambda: ties, lambda: _first_ties(ties, ties_wanted)
  )
  return [b | t for b, t in zip(below, chosen_ties)]


def _first_ties(ties: Sequence[jax.Array], wanted: jax.Array) -> list[jax.Array]:
  """The first ``wanted`` True entries of ``ties`` in leaf, then index, order."""
  chosen = []
  before = jnp.zeros([], wanted.dtype)
  for tie in ties:
    rank = before + jnp.cumsum(tie.ravel(), dtype=wanted.dtype).reshape(tie.shape)
    chosen.append(tie & (rank <= wanted))
    before = before + jnp.sum(tie, dtype=wanted.dtype)
  return chosen
