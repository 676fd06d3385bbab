r"""FlipOut pruning as an Optax gradient transformation.

``prune`` goes **last** in an ``optax.chain``: it receives the final update
``u`` of every weight ``w``, so the parameters after the step are
``w_new = w + u``. For each prunable leaf it

1. keeps pruned weights at exactly zero by rewriting their update to ``-w``
   (momentum buffers and Adam moments keep pushing them otherwise);
2. counts sign flips of live weights,
   :math:`\mathrm{flips} \mathrel{+}= [\mathrm{sign}(w_{new}) \ne \mathrm{sign}(w)]`
   with ``sign(0) = 0``;
3. at a pruning event, scores ``w_new`` with the flip counts that include this
   step, e.g. FlipOut's :math:`|w|^p / (\mathrm{flips} + 1)`, and removes the
   live weights with the lowest scores, globally over all prunable leaves,
   resetting their flip counts to zero.

Everything is traced: the event is a ``lax.cond`` on the step counter held in
the state, and the number of weights pruned at each event is a table computed
in Python from the static leaf sizes (``schedule.py``). Selection is exact
without sorting (``select.py``). The state holds a bool mask and a flip
counter per prunable weight (3 bytes with the uint16 counters of schedules
whose last event is at step 65535 or earlier, 5 with int32 ones, see
``counters.py``) and nothing for other leaves, plus a fixed sample of about
2 KiB from which the next update checks that ``prune`` is last
(``update_check.py``); the masking link itself is ``masking.py``. The algorithm, schedules and
design decisions are described in ``docs/algorithm.md``.
"""

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax._src import counters
from flipout_jax._src import criteria as criteria_lib
from flipout_jax._src import events
from flipout_jax._src import masking
from flipout_jax._src.masking import CHECK_EVERY  # noqa: F401  (read by tests)
from flipout_jax._src.masking import PruneState
from flipout_jax._src import prunable as prunable_lib
from flipout_jax._src import schedule as schedule_lib
from flipout_jax._src import structure as structure_lib
from flipout_jax._src import update_check

# Public through flipout_jax; the checks are shared with baselines.snip.
event_steps = schedule_lib.event_steps
cubic_event_steps = schedule_lib.cubic_event_steps
num_events_for = schedule_lib.num_events_for
_check_fraction = schedule_lib.check_fraction
_check_steps = schedule_lib.check_steps


# ---------------------------------------------------------------------------
# Public transformations.
# ---------------------------------------------------------------------------


# Keywords of earlier versions, each with what to write instead.
_MOVED_KEYWORDS = {
    "prune_every": "schedule=flipout.halving(every=...) or flipout.cubic(..., every=...)",
    "rate": "schedule=flipout.halving(rate=...)",
    "initial_sparsity": "schedule=flipout.cubic(..., initial_sparsity=...)",
    "begin_step": "schedule=flipout.cubic(begin_step=..., end_step=..., every=...)",
    "end_step": "schedule=flipout.cubic(begin_step=..., end_step=..., every=...)",
    "p": "criterion=flipout.flipout_criterion(p=...)",
    "seed": "criterion=flipout.random_criterion(seed=...)",
    "groups": "structure=flipout.units(groups)",
    "group_score": "structure=flipout.units(groups, score=...)",
    "min_units": "structure=flipout.units(groups, min_units=...)",
    "kernel_layout": "structure=flipout.units(..., kernel_layout=...) or "
    "flipout.n_of_m(n, m, kernel_layout=...)",
}


def _refuse_moved_keywords(transform):
  """``transform`` answering a keyword of earlier versions with what to write instead."""

  @functools.wraps(transform)
  def checked(*args, **kwargs):
    for name in kwargs:
      if name in _MOVED_KEYWORDS:
        raise TypeError(f"prune: {name}= is no longer a keyword; write {_MOVED_KEYWORDS[name]}")
    return transform(*args, **kwargs)

  return checked


@_refuse_moved_keywords
def prune(
    target_sparsity: float | None = None,
    *,
    total_steps: int | None = None,
    schedule: str | schedule_lib.Schedule = "halving",
    criterion: str | criteria_lib.Criterion | Callable[[Any, Any], Any] = "flipout",
    structure: str | structure_lib.Structure = "weight",
    where: Any = None,
    flip_count_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""FlipOut pruning (and the paper's baselines) as the last link of a chain.

  At each event of the ``schedule`` the live weights (or groups of them, by ``structure``)
  with the lowest ``criterion`` scores are pruned, ranked over all prunable leaves; pruned
  weights stay exactly zero after ``optax.apply_updates``, under any optimizer and dtype.
  Ties go by leaf order, then index; non-finite weights are pruned last. The algorithm:
  ``docs/algorithm.md``.

  Args:
    target_sparsity: fraction of prunable weights to prune, in ``[0, 1)``.
    total_steps: optimizer steps of the run: the target mode of :func:`halving` needs it;
      otherwise no event falls at or after it.
    schedule: when events fall and what each prunes: ``"halving"`` (``halving()``, the
      paper's), :func:`halving` or :func:`cubic`.
    criterion: ``"flipout"`` (:math:`|w|^2 / (\mathrm{flips} + 1)`, or
      :func:`flipout_criterion` for another exponent), ``"global_magnitude"``,
      ``"magnitude"`` (layer-wise, :func:`magnitude_criterion`), ``"random"``
      (:func:`random_criterion`), ``"taylor"`` (:math:`|w \cdot \Delta w|`,
      :func:`taylor_criterion`), or a callable ``(params, flips) -> scores`` over trees
      with ``None`` at non-prunable leaves (lowest pruned first).
    structure: what goes together: ``"weight"`` (the paper's), ``"unit"`` or :func:`units`
      (output units, coupled ones together), ``"N:M"`` such as ``"2:4"`` or :func:`n_of_m`.
    where: prunable leaves: ``None`` (floating leaves with 2+ dimensions, or the
      ``where`` of :func:`unit_groups`' groups given to :func:`units`), a pytree of bools
      shaped like params, or a predicate ``(path, leaf) -> bool``.
    flip_count_dtype: ``None`` (uint16 when the last event falls at step 65535 or earlier,
      int32 otherwise), ``"uint16"`` (exact at every event, saturating after the last) or
      ``"int32"``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a :class:`PruneState`: last in the
    chain (a misplaced one stops at the second update), ``params`` needed in ``update``.

  Example:
    >>> params = {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4)}
    >>> tx = optax.chain(optax.sgd(0.1), flipout.prune(0.5, total_steps=4))
    >>> state = tx.init(params)
    >>> for _ in range(4):  # the event is at step 2
    ...   updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> flipout.sparsity(params), int(flipout.masks(state)["kernel"].sum())
    (0.5, 8)
  """
  if target_sparsity is not None:
    target_sparsity = _check_fraction("target_sparsity", target_sparsity, low_open=False)
  total_steps = _check_steps("total_steps", total_steps)
  chosen_schedule = schedule_lib.resolve(schedule)
  rule = criteria_lib.resolve(criterion)
  structure_spec = structure_lib.parse(structure)
  if structure_spec.kind == "n:m":
    target_sparsity = structure_lib.check_n_of_m_target(structure_spec, target_sparsity)
  plan = schedule_lib.plan(target_sparsity, total_steps, chosen_schedule)
  flip_dtype = counters.flip_count_dtype(flip_count_dtype, plan.last_step)
  check_leaves, make_event = events.factory(structure_spec, rule, plan)
  if where is None and structure_spec.where is not None:
    where = structure_spec.where  # units(groups from unit_groups): kernels and followers
  return masking.masking_transform(where, masking.all_live, make_event, check_leaves, flip_dtype)


def fixed_masks(masks: Any, *, count_flips: bool = True) -> optax.GradientTransformationExtraArgs:
  """Trains with a fixed mask (e.g. from :func:`snip`); last in the chain.

  The first update zeroes the masked weights of dense params; afterwards they
  stay exactly zero.

  Args:
    masks: tree shaped like params with bool arrays at prunable leaves and
      ``None`` elsewhere, as returned by :func:`snip` or :func:`masks`.
    count_flips: keep flip counts as :func:`prune` does (True, for reading
      with :func:`flip_counts`), or not: the state then holds no counts
      (``flip_counts`` gives ``None``) and the link costs one read of the
      1-byte mask per weight over the optimizer's update, where counting
      reads and writes a 4-byte count too (``benchmarks/link_cost.py``).
  """
  if not isinstance(count_flips, bool):
    raise TypeError(f"count_flips must be a bool, got {type(count_flips).__name__}")
  mask_leaves = jax.tree.leaves(masks)
  if not mask_leaves:
    raise ValueError("masks: no mask leaves given (expected bool arrays at prunable leaves)")
  if not all(np.asarray(m).dtype == bool for m in mask_leaves):
    raise TypeError("masks must hold bool arrays (True = live) and None elsewhere")

  def initial(params, prunable):
    del prunable
    try:
      prunable_lib.leaves_at(masks, params)
    except (ValueError, TypeError) as error:
      raise ValueError(f"masks do not match params: {error}") from None
    return jax.tree.map(jnp.asarray, masks)

  where = lambda path, leaf: True  # every leaf the masks name; checked at init
  # No update sample: its reads of the params would need an ordering (or a copy) that no
  # event's conditional provides here; the fixed pruned weights check the chain instead.
  return masking.masking_transform(
      where, initial, None, takes_samples=False, counts_flips=count_flips
  )


def prune_below(
    threshold: float, *, step: int, where: Any = None
) -> optax.GradientTransformationExtraArgs:
  """One-shot pruning of live weights with ``|w| < threshold`` at ``step``.

  The Hoyer-Square baseline: train with :func:`hoyer_square` in the loss,
  prune the small weights once at ``step`` (counted from 1), then train on
  with the mask fixed. Last in the chain.
  """
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
    raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
  if not threshold >= 0:
    raise ValueError(f"threshold must be >= 0, got {threshold}")
  at_step = _check_steps("step", step)
  if at_step is None:
    raise ValueError("step must be a positive int")

  def event(_, new_params, masks, flips, updates):
    del flips, updates
    return jax.tree.map(lambda m, w: m & (jnp.abs(w) >= threshold), masks, new_params())

  def make_event(masks, params):
    del masks, params
    return (lambda current: current == at_step), event

  flip_dtype = counters.flip_count_dtype(None, at_step)
  return masking.masking_transform(where, masking.all_live, make_event, flip_dtype=flip_dtype)


# ---------------------------------------------------------------------------
# Reading the state.
# ---------------------------------------------------------------------------


def _prune_state(opt_state) -> PruneState:
  found = [
      state
      for _, state in optax.tree_utils.tree_get_all_with_path(opt_state, PruneState.__name__)
      if isinstance(state, PruneState)
  ]
  if len(found) != 1:
    raise ValueError(
        f"opt_state: expected exactly one flipout pruning state in the optimizer "
        f"state, found {len(found)}"
    )
  count = jax.tree.leaves(found[0].count)[0]
  # Only a concrete count can be read (not a tracer or a ShapeDtypeStruct).
  concrete = isinstance(count, (jax.Array, np.ndarray, np.integer, int)) and not isinstance(
      count, jax.core.Tracer
  )
  if concrete and int(count) == masking.NOT_LAST:
    raise ValueError(masking.NOT_LAST_MESSAGE)
  if concrete and int(count) == update_check.STOPPED_COUNT:
    raise ValueError(update_check.STOPPED_MESSAGE)
  return found[0]


def masks(opt_state: Any) -> Any:
  """Masks (True = live) from an optimizer state, ``None`` at non-prunable leaves."""
  return _prune_state(opt_state).masks


def flip_counts(opt_state: Any) -> Any:
  """Sign-flip counts from an optimizer state as int32, ``None`` at non-prunable leaves.

  Stored uint16 counts (see ``prune``'s ``flip_count_dtype``) are widened, so
  arithmetic on them cannot wrap. ``None`` for ``fixed_masks(..., count_flips=False)``.
  """
  return jax.tree.map(counters.as_int32, _prune_state(opt_state).flips)


def apply_masks(params: Any, masks: Any) -> Any:
  """``params`` with pruned weights set to zero (``None`` masks: unchanged).

  Example:
    >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    >>> masks = {"kernel": jnp.array([[True, False], [False, True]]), "bias": None}
    >>> flipout.apply_masks(params, masks)["kernel"]
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
  """
  masked = [
      jnp.where(m, p, jnp.zeros_like(p))
      for m, p in zip(jax.tree.leaves(masks), prunable_lib.leaves_at(masks, params))
  ]
  return prunable_lib.replace_at(params, masks, masked)
