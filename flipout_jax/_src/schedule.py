"""When pruning events happen and how many weights each leaves pruned.

Everything here is plain Python on static sizes, run once when the transform
is built or traced: the event steps (``docs/algorithm.md``, "Schedules") and
the table of pruned counts after each event, which the traced event reads by
index; :func:`plan` bundles them with the traced test "is this step an event".
"""

from collections.abc import Callable
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax._src import select


def check_fraction(name, value, *, low_open: bool) -> float:
  """``value`` as a float in ``(0, 1)`` (``low_open``) or ``[0, 1)``."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise TypeError(f"{name} must be a number, got {type(value).__name__}")
  value = float(value)
  allowed = "(0, 1)" if low_open else "[0, 1)"
  if not (0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0):
    raise ValueError(f"{name} must be in {allowed}, got {value}")
  return value


def check_steps(name, value) -> int | None:
  """``value`` as a positive int, or None."""
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
  if value < 1:
    raise ValueError(f"{name} must be a positive int (>= 1), got {value}")
  return int(value)


def num_events_for(target_sparsity: float, rate: float) -> int:
  r"""Smallest k with :math:`1 - (1 - \mathrm{rate})^k \ge \mathrm{target}`."""
  k = 0
  while 1.0 - (1.0 - rate) ** k < target_sparsity:
    k += 1
  return k


def event_steps(target_sparsity: float, total_steps: int, rate: float = 0.5) -> tuple[int, ...]:
  """Steps (counted from 1) of the pruning events in target mode.

  ``k = num_events_for(target_sparsity, rate)`` events at
  ``i * round(total_steps / (k + 1))`` for ``i = 1..k``: the paper's
  ``f = round(E / (k + 1))``, so the last event leaves time to recover.
  """
  k = num_events_for(target_sparsity, rate)
  interval = round(total_steps / (k + 1))
  return tuple(i * interval for i in range(1, k + 1))


def shortest_schedule(target_sparsity: float, rate: float) -> int:
  """Smallest total_steps from which on every longer run fits its events."""
  k = num_events_for(target_sparsity, rate)
  fits = lambda total: total > 0 and 1 <= event_steps(target_sparsity, total, rate)[-1] < total
  shortest = k * (k + 1) // 2 + 1  # beyond this, total/k - total/(k+1) > 1/2
  while fits(shortest - 1):
    shortest -= 1
  return shortest


def _rate_counts(
    size: int, rate: float, num_events: int | None, cap: int | None, stop_when_stable: bool
) -> list[int]:
  """Cumulative pruned count after each event: P + floor((N - P) * rate).

  With ``stop_when_stable`` the table ends once the count stops changing
  (later events reuse its last entry), which bounds it in rate mode.
  """
  counts: list[int] = []
  pruned = 0
  while num_events is None or len(counts) < num_events:
    step = math.floor((size - pruned) * rate)
    following = pruned + step if cap is None else min(pruned + step, cap)
    if stop_when_stable and following == pruned and counts:
      break
    pruned = following
    counts.append(pruned)
  return counts


def group_sizes(sizes: list[int], layerwise: bool) -> list[int]:
  """Sizes of the groups ranked together: each leaf, or the whole network."""
  return list(sizes) if layerwise else [sum(sizes)]


def count_table(
    sizes: list[int], *, rate, num_events, cap, final_fraction, layerwise: bool
) -> np.ndarray:
  """(events, groups) table of the pruned count after each event.

  A group is the whole network (global ranking) or one leaf (layer-wise). The
  table has the integer dtype of :func:`select.count_dtype`: int32, or int64
  for a group of 2**31 weights or more (which needs ``jax_enable_x64``).
  """
  groups = group_sizes(sizes, layerwise)
  columns = []
  for size in groups:
    column = _rate_counts(
        size,
        rate,
        num_events,
        None if cap is None else round(cap * size),
        stop_when_stable=final_fraction is None,
    )
    if final_fraction is not None and column:
      column[-1] = max(round(final_fraction * size), column[-2] if len(column) > 1 else 0)
    columns.append(column)
  length = max(len(c) for c in columns)
  padded = [c + [c[-1]] * (length - len(c)) if c else [0] * length for c in columns]
  dtype = select.count_dtype(max(groups))
  return np.asarray(padded, dtype).T.reshape(length, len(groups))


SCHEDULES = ("halving", "cubic")


def cubic_event_steps(begin_step: int, end_step: int, prune_every: int) -> tuple[int, ...]:
  """Steps (counted from 1) of the cubic schedule's events.

  ``begin_step, begin_step + prune_every, ...`` while before ``end_step``, then
  ``end_step`` itself: the last event always falls on ``end_step``, also when
  ``prune_every`` does not divide ``end_step - begin_step``.
  """
  return tuple(range(begin_step, end_step, prune_every)) + (end_step,)


def cubic_sparsity(
    step: int, *, initial: float, final: float, begin_step: int, end_step: int
) -> float:
  r"""Zhu & Gupta's sparsity at ``step``:
  :math:`s_f + (s_i - s_f)(1 - (t - t_0) / (t_{end} - t_0))^3`, clipped to
  ``[t_0, t_end]``; ``final`` at ``end_step`` (also when ``begin == end``)."""
  if step >= end_step:
    return final
  progress = max(step - begin_step, 0) / (end_step - begin_step)
  return final + (initial - final) * (1.0 - progress) ** 3


def cubic_count_table(
    sizes: list[int],
    *,
    initial: float,
    final: float,
    steps: tuple[int, ...],
    layerwise: bool,
) -> np.ndarray:
  """(events, groups) table of the pruned count after each cubic event.

  Each group of ``n`` weights has ``round(s_t * n)`` pruned after the event at
  step ``t`` (never fewer than after the previous event); the last event, at
  ``steps[-1]`` (the end step), lands exactly on ``round(final * n)``.
  """
  groups = group_sizes(sizes, layerwise)
  begin, end = steps[0], steps[-1]
  fractions = [
      cubic_sparsity(t, initial=initial, final=final, begin_step=begin, end_step=end) for t in steps
  ]
  columns = []
  for size in groups:
    column, pruned = [], 0
    for fraction in fractions[:-1]:
      pruned = max(pruned, round(fraction * size))
      column.append(pruned)
    column.append(round(final * size))
    columns.append(column)
  dtype = select.count_dtype(max(groups))
  return np.asarray(columns, dtype).T.reshape(len(steps), len(groups))


class Halving(NamedTuple):
  """The paper's schedule (build it with :func:`halving`)."""

  rate: float = 0.5
  every: int | None = None


class Cubic(NamedTuple):
  """Zhu & Gupta's cubic ramp (build it with :func:`cubic`)."""

  begin_step: int
  end_step: int
  every: int
  initial_sparsity: float = 0.0


Schedule = Halving | Cubic


def halving(rate: float = 0.5, every: int | None = None) -> Halving:
  r"""The paper's schedule: each event prunes ``floor((N - P) * rate)`` more of the ``N``
  prunable weights (``P`` already pruned); ``schedule="halving"`` is ``halving()``.

  * ``every=None`` (**target mode**, needs ``prune``'s ``target_sparsity`` and
    ``total_steps``): with ``k`` the smallest number of events such that
    :math:`1 - (1 - \mathrm{rate})^k \ge \mathrm{target}`, events fall at steps
    ``i * round(total_steps / (k + 1))``, ``i = 1..k``; the last lands exactly on
    ``round(target_sparsity * N)``.
  * ``every=n`` (**rate mode**, the paper's): an event every ``n`` steps, capped at
    ``round(target_sparsity * N)`` when a target is given, and only at steps before
    ``total_steps`` when that is given (never at the last step).

  Args:
    rate: fraction of the live weights each event prunes, in ``(0, 1)``.
    every: steps between events (rate mode), a positive int, or None (target mode).

  Raises:
    TypeError, ValueError: an argument out of range, naming it.
  """
  return Halving(check_fraction("rate", rate, low_open=True), check_steps("every", every))


def cubic(begin_step: int, end_step: int, every: int, initial_sparsity: float = 0.0) -> Cubic:
  r"""Zhu & Gupta's cubic ramp (2017; TF Model Optimization's and SparseML's polynomial
  decay): events at ``begin_step``, ``begin_step + every``, ... before ``end_step``, and at
  ``end_step``. After the event at step ``t`` each group of ``N`` weights has
  ``round(s_t * N)`` pruned, never fewer than after the previous event, with

  .. math::
    s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(t_{end} - t_0))^3,

  :math:`s_i` = ``initial_sparsity``, :math:`s_f` = ``prune``'s ``target_sparsity`` (which
  this schedule needs), :math:`t_0` = ``begin_step``, :math:`t_{end}` = ``end_step``; the
  last event lands exactly on ``round(target_sparsity * N)``.

  Args:
    begin_step: step of the first event, ``>= 1``.
    end_step: step of the last event, ``>= begin_step`` (and, when ``prune`` is given
      ``total_steps``, ``< total_steps``).
    every: steps between events, ``>= 1``.
    initial_sparsity: :math:`s_i`, in ``[0, target_sparsity]``.

  Raises:
    TypeError, ValueError: an argument out of range, naming it.
  """
  begin = check_steps("begin_step", begin_step)
  end = check_steps("end_step", end_step)
  step = check_steps("every", every)
  if begin is None or end is None or step is None:
    missing = [
        n for n, v in (("begin_step", begin), ("end_step", end), ("every", step)) if v is None
    ]
    raise TypeError(
        f"cubic needs begin_step, end_step and every; got None for {', '.join(missing)}"
    )
  if end < begin:
    raise ValueError(f"end_step must be >= begin_step={begin}, got {end}")
  return Cubic(
      begin, end, step, check_fraction("initial_sparsity", initial_sparsity, low_open=False)
  )


_CUBIC_HINT = "schedule=flipout.cubic(begin_step=..., end_step=..., every=...)"


def resolve(schedule) -> Schedule:
  """Reads ``prune``'s ``schedule`` argument: ``"halving"``, :func:`halving` or :func:`cubic`.

  Raises:
    TypeError, ValueError: anything else, naming what is allowed.
  """
  if isinstance(schedule, (Halving, Cubic)):
    return schedule
  if schedule == "halving":
    return halving()
  if schedule == "cubic":
    raise ValueError(f"schedule='cubic' needs its steps: write {_CUBIC_HINT}")
  kind = ValueError if isinstance(schedule, str) else TypeError
  raise kind(
      f"schedule must be 'halving', flipout.halving(rate=..., every=...) or {_CUBIC_HINT[9:]}, "
      f"got {schedule!r}"
  )


def _check_cubic_fits(schedule: Cubic, target_sparsity, total_steps) -> None:
  """The cubic ramp against ``prune``'s target and run length."""
  if target_sparsity is None:
    raise ValueError("target_sparsity: the cubic schedule ramps to it; give one")
  if schedule.initial_sparsity > target_sparsity:
    raise ValueError(
        f"initial_sparsity must be in [0, target_sparsity={target_sparsity}], got "
        f"{schedule.initial_sparsity}"
    )
  if total_steps is not None and schedule.end_step >= total_steps:
    raise ValueError(
        f"end_step must be < total_steps={total_steps} (the last event needs steps after "
        f"it), got {schedule.end_step}"
    )


class Plan(NamedTuple):
  """When ``prune``'s events fall and how many weights each leaves pruned."""

  is_event: Callable[[jax.Array], jax.Array]  # traced step -> whether it is an event
  event_index: Callable[[jax.Array], jax.Array]  # traced event step -> row of the table
  table: Callable[[list[int], bool], np.ndarray]  # (leaf sizes, layerwise) -> count table
  # The last step an event can fall on (flip counts read at events never
  # exceed it); None when events go on for as long as training does.
  last_step: int | None


def _at_steps(steps) -> tuple[Callable, Callable]:
  step_array = np.asarray(steps or [0], np.int32)
  return (lambda step: jnp.any(step == step_array)), (lambda step: jnp.argmax(step == step_array))


def plan(target_sparsity, total_steps, schedule: Schedule) -> Plan:
  """The :class:`Plan` of ``prune``'s checked arguments.

  Raises:
    ValueError: no schedule is given, or ``total_steps`` is too short for the
      events of target mode, or the cubic ramp does not fit the target or the run.
  """
  if isinstance(schedule, Cubic):
    _check_cubic_fits(schedule, target_sparsity, total_steps)
    steps = cubic_event_steps(schedule.begin_step, schedule.end_step, schedule.every)
    table = lambda sizes, layerwise: cubic_count_table(
        sizes,
        initial=schedule.initial_sparsity,
        final=target_sparsity,
        steps=steps,
        layerwise=layerwise,
    )
    return Plan(*_at_steps(steps), table, max(steps))
  rate, prune_every = schedule.rate, schedule.every
  num_events: int | None
  last_step: int | None
  if prune_every is None:
    if target_sparsity is None or total_steps is None:
      raise ValueError(
          "prune needs a schedule: target_sparsity with total_steps (target mode), or "
          "schedule=flipout.halving(every=...) (rate mode, optionally capped by "
          "target_sparsity)"
      )
    steps = event_steps(target_sparsity, total_steps, rate)
    if steps and (steps[0] < 1 or steps[-1] >= total_steps):
      raise ValueError(
          f"total_steps={total_steps} is too short for the {len(steps)} pruning "
          f"events that target_sparsity={target_sparsity} needs at rate={rate} "
          f"(events at multiples of round(total_steps / {len(steps) + 1}) must "
          f"fall before the last step): use total_steps >= "
          f"{shortest_schedule(target_sparsity, rate)}"
      )
    num_events, final_fraction, cap = len(steps), target_sparsity, None
    is_event, event_index = _at_steps(steps)
    last_step = max(steps, default=0)
  else:
    num_events = None if total_steps is None else (total_steps - 1) // prune_every
    final_fraction, cap = None, target_sparsity
    last_step = None if num_events is None else num_events * prune_every

    def is_event(step):
      within = True if total_steps is None else step < total_steps
      return (step % prune_every == 0) & within

    def event_index(step):
      return step // prune_every - 1

  table = lambda sizes, layerwise: count_table(
      sizes,
      rate=rate,
      num_events=num_events,
      cap=cap,
      final_fraction=final_fraction,
      layerwise=layerwise,
  )
  return Plan(is_event, event_index, table, last_step)
