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
      prune_every=every,
      criterion=criterion,
      schedule="cubic",
      initial_sparsity=initial,
      begin_step=begin,
      end_step=end,
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
  tx = flipout.prune(target, prune_every=4, schedule="cubic", begin_step=2, end_step=13)
  counts = _pruned_per_step(tx, 16)
  assert counts[12] == round(target * SIZE)  # step 13 = end_step
  assert counts[11] < counts[12] or target * SIZE < 2
  assert counts[-1] == counts[12]  # nothing after the last event


def test_counts_follow_the_cubic_formula_and_only_change_at_events():
  initial, target, begin, end, every = 0.2, 0.95, 3, 12, 4
  tx = flipout.prune(
      target,
      prune_every=every,
      schedule="cubic",
      initial_sparsity=initial,
      begin_step=begin,
      end_step=end,
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
  tx = flipout.prune(0.8, prune_every=5, schedule="cubic", begin_step=6, end_step=6)
  counts = _pruned_per_step(tx, 9)
  assert counts == [0] * 5 + [round(0.8 * SIZE)] * 4


def test_end_step_just_before_total_steps_is_allowed():
  tx = flipout.prune(0.6, total_steps=10, prune_every=3, schedule="cubic", begin_step=1, end_step=9)
  counts = _pruned_per_step(tx, 10)
  assert counts[8] == round(0.6 * SIZE) and counts[7] < counts[8]


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(schedule="Cubic"), ValueError, "schedule must be one of"),
        (dict(schedule=3), TypeError, "schedule must be a str"),
        (dict(rate=0.5), ValueError, "rate"),
        (dict(begin_step=None), ValueError, "missing begin_step"),
        (dict(end_step=None), ValueError, "missing end_step"),
        (dict(prune_every=None), ValueError, "missing prune_every"),
        (dict(target_sparsity=None), ValueError, "missing target_sparsity"),
        (dict(begin_step=0), ValueError, "begin_step must be a positive int"),
        (dict(begin_step=2.5), TypeError, "begin_step"),
        (dict(end_step=1), ValueError, "end_step must be >= begin_step=2"),
        (dict(total_steps=10), ValueError, "end_step must be < total_steps=10"),
        (dict(initial_sparsity=0.95), ValueError, "initial_sparsity must be in [0, target"),
        (dict(initial_sparsity=-0.1), ValueError, "initial_sparsity must be in [0, 1)"),
        (dict(initial_sparsity="0.1"), TypeError, "initial_sparsity must be a number"),
        (dict(prune_every=0), ValueError, "prune_every"),
    ],
)
def test_bad_cubic_arguments_are_refused_at_build_time(kwargs, error, words):
  arguments = dict(target_sparsity=0.9, prune_every=2, schedule="cubic", begin_step=2, end_step=10)
  arguments.update(kwargs)
  with pytest.raises(error, match=re.escape(words)):
    flipout.prune(**arguments)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(begin_step=3), "begin_step"),
        (dict(end_step=9), "end_step"),
        (dict(initial_sparsity=0.2), "initial_sparsity"),
    ],
)
def test_cubic_arguments_without_the_cubic_schedule_are_refused(kwargs, words):
  with pytest.raises(ValueError, match=f"{words}: only for schedule='cubic'"):
    flipout.prune(0.9, total_steps=100, **kwargs)


def test_halving_keeps_its_default_rate():
  """rate=None is the halving schedule's 0.5: the paper's table is unchanged."""
  assert flipout.prune(0.999, total_steps=1100) is not None
  counts = _pruned_per_step(flipout.prune(0.75, total_steps=9), 9)
  assert counts[2] == SIZE // 2 and counts[5] == round(0.75 * SIZE)
