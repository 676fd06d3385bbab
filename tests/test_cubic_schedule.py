"""The cubic (Zhu & Gupta, 2017) sparsity schedule of ``flipout.prune(schedule="cubic")``."""

import re

import jax
import numpy as np
import optax
import pytest

import flipout_jax as flipout
from tests import reference
from tests.test_prune import _params, _run_and_compare

SIZE = sum(int(np.prod(shape)) for shape in ((3, 3, 2, 4), (12, 5), (5, 3)))


@pytest.mark.parametrize(
    "criterion,initial,begin,end,every",
    [
        ("flipout", 0.0, 3, 25, 4),  # every does not divide the span: last event at 25
        ("flipout", 0.3, 1, 21, 5),
        ("global_magnitude", 0.1, 5, 30, 3),
        ("magnitude", 0.0, 2, 26, 6),  # layer-wise: each leaf follows its own ramp
        ("random", 0.2, 4, 28, 8),
    ],
)
def test_cubic_run_matches_reference(criterion, initial, begin, end, every):
  target = 0.9
  tx = flipout.prune(
      target,
      total_steps=34,
      criterion=criterion,
      schedule=flipout.cubic(begin_step=begin, end_step=end, every=every, initial_sparsity=initial),
  )
  _run_and_compare(tx, 34, target=target, criterion=criterion, cubic=(initial, begin, end, every))


def _pruned_per_step(tx, steps, params=None, update_scale=0.01):
  """Pruned weights after each of ``steps`` updates of ``tx``, each ``update_scale`` everywhere
  (``params``: ``test_prune``'s by default)."""
  params = _params(1) if params is None else params
  state = tx.init(params)
  step_fn = jax.jit(tx.update)
  constant = jax.tree.map(lambda x: update_scale * np.ones_like(x), params)
  counts = []
  for _ in range(steps):
    updates, state = step_fn(constant, state, params)
    params = optax.apply_updates(params, updates)
    counts.append(sum(int((~m).sum()) for m in jax.tree.leaves(flipout.masks(state))))
  return counts


@pytest.mark.parametrize("target", [0.5, 0.9, 0.987, 0.999])
def test_last_event_lands_exactly_on_the_target(target):
  tx = flipout.prune(target, schedule=flipout.cubic(begin_step=2, end_step=13, every=4))
  counts = _pruned_per_step(tx, 16)
  assert counts[12] == round(target * SIZE)  # step 13 = end_step
  assert counts[11] < counts[12] or target * SIZE < 2
  assert counts[-1] == counts[12]  # nothing after the last event


def test_counts_follow_the_cubic_formula_and_only_change_at_events():
  initial, target, begin, end, every = 0.2, 0.95, 3, 12, 4
  tx = flipout.prune(
      target,
      schedule=flipout.cubic(begin_step=begin, end_step=end, every=every, initial_sparsity=initial),
  )
  counts = _pruned_per_step(tx, 15)
  fractions = reference.reference_cubic_fractions(initial, target, begin, end, every)
  assert sorted(fractions) == [3, 7, 11, 12] == list(flipout.cubic_event_steps(begin, end, every))
  expected, pruned = [], 0
  for step in range(1, 16):
    if step in fractions:
      pruned = max(pruned, round(fractions[step] * SIZE))
    expected.append(pruned)
  assert counts == expected
  # The formula itself at the first and a middle event.
  assert fractions[3] == pytest.approx(initial)
  assert fractions[7] == pytest.approx(target + (initial - target) * (1 - 4 / 9) ** 3)


def test_single_event_when_begin_equals_end():
  tx = flipout.prune(0.8, schedule=flipout.cubic(begin_step=6, end_step=6, every=5))
  counts = _pruned_per_step(tx, 9)
  assert counts == [0] * 5 + [round(0.8 * SIZE)] * 4


def test_end_step_just_before_total_steps_is_allowed():
  tx = flipout.prune(0.6, total_steps=10, schedule=flipout.cubic(begin_step=1, end_step=9, every=3))
  counts = _pruned_per_step(tx, 10)
  assert counts[8] == round(0.6 * SIZE) and counts[7] < counts[8]


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(begin_step=None), TypeError, "got None for begin_step"),
        (dict(end_step=None), TypeError, "got None for end_step"),
        (dict(every=None), TypeError, "got None for every"),
        (dict(begin_step=0), ValueError, "begin_step must be a positive int"),
        (dict(begin_step=2.5), TypeError, "begin_step"),
        (dict(end_step=1), ValueError, "end_step must be >= begin_step=2"),
        (dict(initial_sparsity=-0.1), ValueError, "initial_sparsity must be in [0, 1)"),
        (dict(initial_sparsity="0.1"), TypeError, "initial_sparsity must be a number"),
        (dict(every=0), ValueError, "every must be a positive int"),
    ],
)
def test_bad_cubic_arguments_are_refused_when_the_schedule_is_built(kwargs, error, words):
  arguments = dict(begin_step=2, end_step=10, every=2)
  arguments.update(kwargs)
  with pytest.raises(error, match=re.escape(words)):
    flipout.cubic(**arguments)


@pytest.mark.parametrize(
    "kwargs,schedule,error,words",
    [
        (dict(schedule="Cubic"), None, ValueError, "schedule must be 'halving', flipout.halving"),
        (dict(schedule=3), None, TypeError, "schedule must be 'halving'"),
        (dict(schedule="cubic"), None, ValueError, "schedule='cubic' needs its steps: write"),
        (dict(target_sparsity=None), {}, ValueError, "target_sparsity: the cubic schedule ramps"),
        (dict(total_steps=10), {}, ValueError, "end_step must be < total_steps=10"),
        ({}, dict(initial_sparsity=0.95), ValueError, "initial_sparsity must be in [0, target"),
    ],
)
def test_a_schedule_that_does_not_fit_prune_is_refused_at_build_time(
    kwargs, schedule, error, words
):
  arguments = dict(target_sparsity=0.9)
  if schedule is not None:
    arguments["schedule"] = flipout.cubic(2, 10, every=2, **schedule)
  arguments.update(kwargs)
  with pytest.raises(error, match=re.escape(words)):
    flipout.prune(**arguments)


def test_halving_keeps_its_default_rate():
  """The halving schedule's rate is 0.5 unless given: the paper's table is unchanged."""
  assert flipout.prune(0.999, total_steps=1100) is not None
  counts = _pruned_per_step(flipout.prune(0.75, total_steps=9), 9)
  assert counts[2] == SIZE // 2 and counts[5] == round(0.75 * SIZE)
