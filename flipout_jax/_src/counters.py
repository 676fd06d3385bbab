"""Flip counters: the narrowest storage that keeps every count an event reads exact.

A weight flips at most once per step, so the counts a pruning event at step
``t`` reads are at most ``t``. When the schedule's last event falls at step
65535 or earlier, uint16 counters hold every count any event reads, exactly:
2 bytes per prunable weight instead of 4, which is most of the pruning state
(with the 1-byte mask, 3 bytes instead of 5) and, on large networks, a
visible share of a training step's peak memory and memory traffic. After that
last event nothing reads the counts for a decision, and they saturate at
65535 instead of wrapping around. Longer or open-ended schedules count in
int32. Criteria always receive int32 counts (``docs/algorithm.md``, "State").
"""

import jax
import jax.numpy as jnp
import numpy as np

FLIP_COUNT_DTYPES = ("uint16", "int32")
_NARROW_LIMIT = int(np.iinfo(np.uint16).max)


def flip_count_dtype(requested, last_event_step: int | None) -> np.dtype:
  """Storage dtype of the flip counts of ``prune``.

  Args:
    requested: ``None`` (uint16 when ``last_event_step <= 65535``, else int32),
      ``"uint16"`` or ``"int32"`` (or the NumPy/JAX dtypes of those names).
    last_event_step: the last step an event can fall on; None: no bound.

  Raises:
    TypeError, ValueError: ``requested`` is not one of the allowed values, or
      is uint16 while an event could read a count above 65535.
  """
  if requested is None:
    narrow = last_event_step is not None and last_event_step <= _NARROW_LIMIT
    return np.dtype(np.uint16 if narrow else np.int32)
  try:
    dtype = np.dtype(requested)
  except TypeError:
    raise TypeError(
        f"flip_count_dtype must be None or one of {FLIP_COUNT_DTYPES}, got {requested!r}"
    ) from None
  if dtype.name not in FLIP_COUNT_DTYPES:
    raise ValueError(
        f"flip_count_dtype must be None or one of {FLIP_COUNT_DTYPES}, got {dtype.name!r}"
    )
  if dtype == np.uint16 and (last_event_step is None or last_event_step > _NARROW_LIMIT):
    when = "no last event" if last_event_step is None else f"an event at step {last_event_step}"
    raise ValueError(
        f"flip_count_dtype='uint16' holds counts up to {_NARROW_LIMIT}, but the schedule has "
        f"{when}, whose counts can exceed it: use 'int32' or None"
    )
  return dtype


def add_flips(counts: jax.Array, flipped: jax.Array) -> jax.Array:
  """``counts + flipped`` in the counts' dtype, saturating at its maximum."""
  top = jnp.iinfo(counts.dtype).max
  return counts + (flipped & (counts != top)).astype(counts.dtype)


def as_int32(counts: jax.Array) -> jax.Array:
  """Counts as int32, the dtype criteria and readers of the state receive."""
  return counts.astype(jnp.int32)
