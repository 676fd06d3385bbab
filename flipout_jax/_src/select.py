r"""Exact selection of the k lowest scores over many arrays, without sorting.

A pruning event must remove exactly the ``k`` live weights with the lowest
scores. Sorting all ``N`` scores costs ``O(N log N)`` and, on CPU, seconds for
tens of millions of weights. Instead each score is mapped to an unsigned
integer key whose integer order is the float order, and the threshold

.. math:: t = \min \{ t : \#\{\mathrm{key} \le t\} \ge k \}

is found by searching the key values, with no sort and no concatenation of
the leaves (``docs/algorithm.md``, "Selection without a sort"). Each pass
over the weights counts ``#{key <= t_i}`` for ``m`` thresholds at once,
which cut the remaining interval of keys into ``m + 1`` parts, so a pass
gains ``log2(m + 1)`` bits: 13 passes for uint32 keys (``m = 5``), where a
bisection needs 32, so ``O(13 N)``. The ``m`` counts share one integer sum:
per weight ``sum_i [key <= t_i] << (6 i)``, summed over rows of ``_ROW = 32``
weights, so no field exceeds 32 and none carries into the next (6 bits
each, 5 fields in an int32); only the row sums are written, and a second,
small sum unpacks and totals each field.

Memory: the keys may be given as a function that computes them (from the
weights and flip counts); it is called again inside every counting pass, so
XLA fuses each leaf's score, key, comparisons and packed partial sum into
one loop and no score or key per weight is ever written. Only the row sums
of a count (at most ``1 / 16`` of an int per weight, see :func:`count`) are.

Scores are compared as float32 (uint32 keys), or as float64 (uint64 keys)
when any score is float64, which needs ``jax_enable_x64``: float64 scores
that are equal in float32 are still ranked exactly. Counts are int32, or
int64 for 2**31 weights or more, which also needs ``jax_enable_x64``. Either
way the counts are packed into an int64 instead, 10 thresholds per pass: 19
passes for uint64 keys (a bisection: 64), 10 for uint32.

Ties at the threshold are broken by position: leaf order (``jax.tree.leaves``
order) first, then row-major index inside the leaf. That is the order of a
stable ascending sort of the concatenated scores, which is what the NumPy
reference in the tests does. When a tie group is split, a second bisection
over positions finds where to cut it.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_ROW = 32  # XLA's CPU tree-reduction window: rows this long are summed in place
# A row's count is at most _ROW = 32, which needs 6 bits: 5 thresholds fit in
# a packed int32 sum, 10 in an int64 (the sign bit left unused).
_FIELD_BITS = 6
MAX_INT32_COUNT = 2**31 - 1


class _KeyFormat(NamedTuple):
  float_type: type
  key_type: type
  sign_bit: int
  # Larger than the key of any live score (the key of +inf is the sign bit
  # plus the exponent bits), so weights that are already pruned are chosen
  # last and never counted twice.
  pruned: int


_INFINITY_BITS = {jnp.uint32: 0x7F800000, jnp.uint64: 0x7FF0000000000000}
_KEYS_32 = _KeyFormat(jnp.float32, jnp.uint32, 1 << 31, 2**32 - 1)
_KEYS_64 = _KeyFormat(jnp.float64, jnp.uint64, 1 << 63, 2**64 - 1)


def count_dtype(size: int):
  """Integer dtype that counts up to ``size`` weights: int32, or int64 with x64.

  Raises:
    ValueError: ``size`` needs int64 but ``jax_enable_x64`` is off.
  """
  if size <= MAX_INT32_COUNT:
    return np.int32
  if not jax.config.read("jax_enable_x64"):
    raise ValueError(
        f"flipout: {size} prunable weights are ranked together, more than the 2**31 - 1 "
        "prunable weights that int32 counts can hold. Enable 64-bit counts with "
        "jax.config.update('jax_enable_x64', True) (or JAX_ENABLE_X64=1) before building "
        "the optimizer state, or prune fewer leaves (`where`)."
    )
  return np.int64


def _key_format(dtype) -> _KeyFormat:
  return _KEYS_64 if jnp.dtype(dtype) == jnp.float64 else _KEYS_32


def sortable_keys(scores: jax.Array, live: jax.Array | bool) -> jax.Array:
  """Maps float scores to unsigned keys with the same order; dead weights last.

  float64 scores give uint64 keys, all others (float32, half precision,
  integers) are compared as float32 and give uint32 keys. NaN scores rank as
  +inf (the most salient: a non-finite weight is never preferred over a finite
  one), ``-0.0`` ranks as ``+0.0``.
  """
  scores = jnp.asarray(scores)
  keys = _key_format(scores.dtype)
  # Everything is done on the bits, so the score is read once: XLA does not
  # fuse a costly score (a division) into a loop that reads it several
  # times, and would write it out per weight instead.
  bits = jax.lax.bitcast_convert_type(scores.astype(keys.float_type), keys.key_type)
  sign = keys.key_type(keys.sign_bit)
  magnitude = bits & ~sign
  infinity = keys.key_type(_INFINITY_BITS[keys.key_type])
  # NaN (exponent all ones, mantissa not 0) -> +inf; -0.0 -> +0.0.
  bits = jnp.where(magnitude > infinity, infinity, jnp.where(magnitude == 0, 0, bits))
  negative = (bits & sign) != 0
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


# Keys are either arrays or, to hold no key per weight, a function returning
# them that is called again inside every counting pass (see ``lowest_k_cut``).
Keys = Sequence[jax.Array] | Callable[[], Sequence[jax.Array]]


def _common_format(keys: Sequence[jax.Array]) -> tuple[list[jax.Array], _KeyFormat]:
  if any(k.dtype == jnp.uint64 for k in keys):
    return [_widen(k) for k in keys], _KEYS_64
  return list(keys), _KEYS_32


def count(mask: jax.Array, dtype=np.int32) -> jax.Array:
  """Number of True entries of ``mask``, without materialising it per weight.

  XLA on CPU rewrites a long reduction into a windowed tree (for precision)
  that reads a materialised input. Rows of at most ``_ROW`` entries
  (:func:`_in_rows`: a reshape, or a pad with False to whole rows, so that
  ``mask`` has that one consumer) are summed where ``mask`` is computed, and
  only the row sums, ``1 / 16`` of an int per weight at most, are written.
  """
  rows = jnp.sum(_in_rows(mask.ravel()), axis=1, dtype=dtype)
  # The barrier keeps XLA from merging the two sums back into one long one.
  return jnp.sum(jax.lax.optimization_barrier(rows), dtype=dtype)


def _in_rows(flat: jax.Array) -> jax.Array:
  """``flat`` as rows of at most ``_ROW`` entries, to be summed along axis 1.

  Rows of ``_ROW``, or of the largest length from ``_ROW / 2`` to ``_ROW``
  that divides the size: then the rows are a plain reshape. Otherwise the
  end is padded with zeros to whole rows of ``_ROW``; XLA fuses the pad, but
  its per-entry bounds check stops the loop from being vectorised (a leaf of
  250,000 weights counted 6x slower than one of 250,016).
  """
  size = flat.size
  for length in range(_ROW, _ROW // 2 - 1, -1):
    if size % length == 0:
      return flat.reshape(-1, length)
  return jnp.pad(flat, (0, -size % _ROW)).reshape(-1, _ROW)


def _pack_type(key_type, dtype):
  """The integer that packs a pass's counts: int64 where x64 is needed anyway.

  That is with uint64 keys or int64 counts; every sum over the weights then
  stays int64, as a count of 2**31 weights or more must be.
  """
  wide = jnp.dtype(key_type).itemsize == 8 or jnp.dtype(dtype).itemsize == 8
  return np.dtype(np.int64 if wide else np.int32)


def _fields(pack) -> int:
  """How many thresholds one packed ``pack`` sum counts (the sign bit unused)."""
  return (np.iinfo(pack).bits - 1) // _FIELD_BITS


def _count_at_most_each(keys: Sequence[jax.Array], thresholds: jax.Array, dtype) -> jax.Array:
  """``count(keys <= t)`` for each ``t`` of ``thresholds``, in one pass over the keys.

  The comparisons with all thresholds are packed into one integer per key (a
  bit field of ``_FIELD_BITS`` each, at most :func:`_fields` of them) and
  summed in rows as :func:`count` does, so each leaf costs one fused loop
  that computes its keys once and writes only the row sums; the fields are
  then separated and totalled in ``dtype`` over the row sums alone.
  """
  pack = _pack_type(thresholds.dtype, dtype)
  assert thresholds.size <= _fields(pack), (thresholds.size, pack)
  shifts = np.arange(thresholds.size) * _FIELD_BITS
  field = pack.type((1 << _FIELD_BITS) - 1)
  totals = jnp.zeros(thresholds.shape, dtype)
  for key in keys:
    flat = key.ravel()
    packed = sum(
        (flat <= thresholds[i]).astype(pack) << pack.type(shift) for i, shift in enumerate(shifts)
    )
    rows = jnp.sum(_in_rows(packed), axis=1, dtype=pack)
    # The fields are summed in rows of row sums too: one long sum over the
    # row sums would be rewritten as a tree that writes every field of every
    # row out first (5 / 32 of a word per weight). The barrier keeps XLA from
    # merging the two sums of each field back into one long one.
    rows = _in_rows(rows)[None]
    fields = (rows >> shifts.astype(pack)[:, None, None]) & field
    partial = jax.lax.optimization_barrier(jnp.sum(fields, axis=2, dtype=dtype))
    totals = totals + jnp.sum(partial, axis=1, dtype=dtype)
  return totals


class Cut(NamedTuple):
  """Where the ``k`` lowest keys end: all keys below ``threshold``, and the
  keys equal to it at (leaf order, then row-major) positions below ``position``."""

  threshold: jax.Array
  position: jax.Array


def lowest_k_cut(keys: Keys, k) -> Cut:
  """The :class:`Cut` of the ``k`` smallest keys across all arrays, exactly.

  Args:
    keys: arrays from :func:`sortable_keys`, or a function returning them.
      With a function, no key array exists at once: it is called again in
      every counting pass, inside the pass's loop, so XLA fuses each leaf's
      keys (and whatever the function computes them from) into that pass's
      sums. uint32 keys are widened when others are uint64, so float32 and
      float64 scores rank together.
    k: number to select (traced integer scalar), ``0 <= k <= total size``.

  The threshold ``t`` is the smallest key with ``count(keys <= t) >= k``,
  found by narrowing an interval of key values: each counting pass counts
  ``keys <= t_i`` for ``m`` thresholds spread over the interval (5, or 10
  with uint64 keys or int64 counts; see :func:`_count_at_most_each`) and
  keeps the part where the count first reaches ``k``: 13 passes for uint32
  keys (10 with int64 counts), 19 for uint64. The counts at the two ends of
  the final interval give ``count(keys < t)`` and ``count(keys <= t)`` for
  free. When only some of
  the keys equal to ``t`` are wanted, a second bisection finds the smallest
  position ``q`` with ``count(keys == t and pos < q) >= k - count(keys < t)``;
  otherwise the loop never runs and ``q`` is the total size.
  """
  compute = _as_function(keys)
  abstract = jax.eval_shape(compute)
  sizes = [int(np.prod(key.shape)) for key in abstract]
  total = sum(sizes)
  form = _KEYS_64 if any(key.dtype == jnp.uint64 for key in abstract) else _KEYS_32
  dtype = count_dtype(total)
  k = jnp.asarray(k, dtype)
  fresh = _Fresh(lambda: _common_format(compute())[0])

  parts = _fields(_pack_type(form.key_type, dtype)) + 1
  steps: np.ndarray = np.arange(1, parts, dtype=form.key_type)

  # Invariant: low <= t <= high, below = count(keys < low) and
  # at_most = count(keys <= high).
  def narrow_keys(carry):
    low, high, below, at_most = carry
    span = high - low
    # low + floor(span * i / parts), without the product overflowing: the
    # thresholds rise, stay below high, and split the interval evenly.
    thresholds = low + (span // parts) * steps + (span % parts) * steps // parts
    counted = _count_at_most_each(fresh(thresholds), thresholds, dtype)
    # The counts rise with the thresholds: the first that reaches k (or high,
    # whose count does) ends the part that holds t.
    part = jnp.sum(counted < k)
    return (
        jnp.concatenate([low[None], thresholds + 1])[part],
        jnp.concatenate([thresholds, high[None]])[part],
        jnp.concatenate([below[None], counted])[part],
        jnp.concatenate([counted, at_most[None]])[part],
    )

  start = (
      form.key_type(0),
      form.key_type(form.pruned),
      jnp.zeros([], dtype),
      jnp.asarray(total, dtype),
  )
  threshold, _, below, at_most = jax.lax.while_loop(
      lambda carry: carry[0] < carry[1], narrow_keys, start
  )
  return Cut(threshold, _tie_position(fresh, threshold, k - below, at_most - below, sizes, dtype))


def _tie_position(fresh, threshold, ties_wanted, ties, sizes: list[int], dtype) -> jax.Array:
  """The smallest position ``q`` with ``count(keys == threshold and pos < q) >= ties_wanted``
  (``ties``: how many keys equal ``threshold``), by bisection; the total size when all ties
  are wanted."""
  offsets = np.cumsum([0] + sizes)[:-1]

  def halve_positions(carry):
    low, high = carry
    middle = low + (high - low) // 2
    counted = sum(
        count((key.ravel() == threshold) & _before(key.size, middle - dtype(offset)), dtype)
        for key, offset in zip(fresh(middle), offsets)
    )
    enough = counted >= ties_wanted
    return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

  # Usually every key equal to the threshold is wanted: then the positional
  # search has nothing to do (its range is empty, the loop never runs).
  everything = jnp.asarray(sum(sizes), dtype)
  some = ties != ties_wanted
  position, _ = jax.lax.while_loop(
      lambda carry: carry[0] < carry[1],
      halve_positions,
      (jnp.where(some, jnp.zeros([], dtype), everything), everything),
  )
  return position


def chosen_by(cut: Cut, keys: Keys) -> list[jax.Array]:
  """Boolean masks of the keys inside ``cut`` (one per key array, same shapes).

  ``keys`` as for :func:`lowest_k_cut`; a function is called once more here.
  """
  keys = _common_format(_as_function(keys)())[0]
  dtype = cut.position.dtype
  offsets = np.cumsum([0] + [key.size for key in keys])[:-1]
  return [
      (
          (key.ravel() < cut.threshold)
          | ((key.ravel() == cut.threshold) & _before(key.size, cut.position - dtype.type(offset)))
      ).reshape(key.shape)
      for key, offset in zip(keys, offsets)
  ]


def lowest_k(keys: Keys, k) -> list[jax.Array]:
  """Boolean masks marking exactly the ``k`` smallest keys across all arrays.

  Args:
    keys: arrays from :func:`sortable_keys`, or a function returning them
      (see :func:`lowest_k_cut`).
    k: number to select (traced integer scalar), ``0 <= k <= total size``.

  Returns:
    One boolean array per key array; exactly ``k`` entries are True in total.
  """
  return chosen_by(lowest_k_cut(keys, k), keys)


def _as_function(keys: Keys) -> Callable[[], list[jax.Array]]:
  if callable(keys):
    return lambda: [jnp.asarray(key) for key in keys()]
  arrays = [jnp.asarray(key) for key in keys]
  return lambda: arrays


class _Fresh:
  """Calls ``compute`` anew at each use, in a way XLA can neither hoist nor share.

  XLA moves loop-invariant code out of while loops, and computes a value
  used by several sums once, into a buffer, when it is costly (a division);
  either would hold every key in memory at once. Each call passes the arrays
  ``compute`` closes over through an optimization barrier together with
  ``carry`` (a loop's carry) and a tag of its own, so every counting pass
  recomputes its keys inside its own fused sums and nothing per weight is
  written.
  """

  def __init__(self, compute: Callable[[], list[jax.Array]]):
    self._converted, self._operands = jax.closure_convert(compute)
    self._calls = 0

  def __call__(self, carry) -> list[jax.Array]:
    self._calls += 1
    tag = jnp.asarray(self._calls, jnp.int32)
    operands, _ = jax.lax.optimization_barrier((self._operands, (carry, tag)))
    return self._converted(*operands)


def _before(size: int, position: jax.Array) -> jax.Array:
  """Whether each index of a flat array of ``size`` is below ``position`` (any int).

  A bare 1-D iota compared with a scalar: XLA neither hoists it out of a loop
  nor writes it out per weight (a reshaped iota it would).
  """
  return jnp.arange(size, dtype=position.dtype) < position
