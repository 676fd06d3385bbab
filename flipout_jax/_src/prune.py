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
(``update_check.py``). The algorithm, schedules and
design decisions are described in ``docs/algorithm.md``.
"""

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax._src import counters
from flipout_jax._src import criteria as criteria_lib
from flipout_jax._src import events
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


class PruneState(NamedTuple):
  """State of :func:`prune`, :func:`fixed_masks` and :func:`prune_below`.

  Attributes:
    count: number of updates applied so far (int32 scalar); negative once the
      run was stopped because ``prune`` was not last: -1 when pruned weights
      moved, -2 when params did not move by the update it returned.
    masks: tree shaped like params, a bool array (True = live) at each prunable
      leaf and ``None`` elsewhere.
    flips: tree shaped like params, sign-flip counts of live weights at each
      prunable leaf (0 for pruned weights) and ``None`` elsewhere: uint16 or
      int32 (``prune``'s ``flip_count_dtype``); read them with
      :func:`flip_counts`. ``None`` for ``fixed_masks(..., count_flips=False)``.
    last_update: a sample of the last update's params and of those params plus
      its update (a few KiB in all), from which the next update checks that
      ``prune`` is last; ``None`` (states built without it) checks nothing.
  """

  count: jax.Array  # type: ignore[assignment]  # the Optax name, shadowing tuple.count
  masks: Any
  flips: Any
  last_update: update_check.UpdateSample | None = None


# ---------------------------------------------------------------------------
# The transformation shared by prune, fixed_masks and prune_below.
# ---------------------------------------------------------------------------


_CHECKED_PER_LEAF = 1024
# `count` of a state whose pruned weights moved between updates (prune was not
# last in the chain); the run is stopped and reading the state raises.
_NOT_LAST = -1
_NOT_LAST_MESSAGE = (
    "flipout: pruned weights moved between updates, so training was stopped "
    "(params are NaN). Put flipout.prune (or fixed_masks / prune_below) LAST in "
    "optax.chain, after the optimizer, so it sees the final update; and do not "
    "modify params between tx.update calls."
)
# Besides step 1 and every event, the update sample is taken every this many steps, and the
# checks run at the update after each sample (docs/algorithm.md, "Checking the chain").
CHECK_EVERY = 1000


def _pruned_weights_moved(masks, params) -> jax.Array:
  """Whether a pruned weight is no longer zero: ``prune`` was not last.

  A misplaced ``prune`` moves nearly every pruned weight, so about 1024
  evenly spaced weights per leaf suffice. No host callback: one would slow
  down every step's dispatch; the state and the params carry the failure
  instead. A non-finite pruned weight is divergence (a NaN update, kept at
  zero by adding ``-param``, is NaN), not a misplaced ``prune``: the loop's
  own finiteness check reports that, and "put prune last" would mislead.
  """

  def spaced(x):
    return x.ravel()[:: max(1, x.size // _CHECKED_PER_LEAF)]

  moved = [
      jnp.any(~spaced(m) & (spaced(p) != 0) & jnp.isfinite(spaced(p)))
      for m, p in zip(jax.tree.leaves(masks), prunable_lib.leaves_at(masks, params))
  ]
  return jnp.any(jnp.stack(moved))


def _check_step(step) -> jax.Array:
  """Steps that check the chain whatever the sample: the second, and one after each
  :data:`CHECK_EVERY` (``fixed_masks``, which takes no sample, checks only there)."""
  return (step == 2) | (step % CHECK_EVERY == 1)


def _sample_step(step) -> jax.Array:
  """Non-event steps that take the update sample: the first, and every :data:`CHECK_EVERY`."""
  return (step == 1) | (step % CHECK_EVERY == 0)


def _chain_checks(step, state, params, params_at_masks) -> tuple[jax.Array, jax.Array]:
  """``(pruned weights moved, params moved otherwise)``, both bool scalars.

  Under a ``lax.cond`` that runs at the update after a sample and at :func:`_check_step`:
  its operands (params, masks, the sample) are buffers the step holds anyway, so the steps
  in between pay one scalar predicate, not a pass or a kernel per leaf.
  """
  sample = state.last_update
  run = _check_step(step) & (step > 1)
  if sample is not None:
    run = run | sample.taken

  def check():
    moved = _pruned_weights_moved(state.masks, params)
    if sample is None:
      return moved, jnp.bool_(False)
    return moved, update_check.moved_otherwise(sample, params_at_masks)

  no_alarm = lambda: (jnp.bool_(False), jnp.bool_(False))
  return jax.lax.cond(run, check, no_alarm)


def _masking_transform(
    where,
    initial_masks: Callable[[Any, Any], Any],
    make_event: events.MakeEvent | None,
    check_leaves: Callable[[Any, Any], Any] = lambda masks, params: None,
    flip_dtype=np.int32,
    takes_samples: bool = True,
    counts_flips: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Builds the transform: masking, flip counting and optional events.

  Args:
    where: which leaves are prunable (see :func:`prune`).
    initial_masks: ``(params, prunable) -> masks`` at init.
    make_event: ``(masks, params) -> (is_event(step), event_rule)``, called at
      trace time (it reads only shapes); None for no events.
    check_leaves: called at init with the masks and params, to refuse params
      that ``make_event`` could not trace.
    flip_dtype: storage of the flip counts (``counters.flip_count_dtype``).
    takes_samples: whether updates take the sample that finds a misplaced link
      at the second update (``update_check.py``); without it, the chain is
      checked by its pruned weights alone.
    counts_flips: whether the state counts sign flips (``False``: ``flips``
      is ``None``; only without events, which read the counts).
  """
  prunable_lib.check_where(where)

  def init_fn(params):
    prunable = prunable_lib.prunable_tree(params, where)
    masks = initial_masks(params, prunable)
    prunable_lib.check_floating(params, masks)
    check_leaves(masks, params)
    flips = None
    if counts_flips:
      flips = jax.tree.map(lambda m: jnp.zeros(m.shape, flip_dtype), masks)
    return PruneState(
        count=jnp.zeros([], jnp.int32),
        masks=masks,
        flips=flips,
        last_update=update_check.empty(prunable_lib.leaves_at(masks, params)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # e.g. a loss `value` for other links of the chain
    if params is None:
      raise ValueError(
          "params: flipout pruning needs the current params; call "
          "tx.update(updates, state, params)"
      )
    mask_structure = jax.tree.structure(state.masks)
    try:
      params_at_masks = prunable_lib.leaves_at(state.masks, params)
      updates_at_masks = prunable_lib.leaves_at(state.masks, updates)
    except (ValueError, TypeError) as error:
      raise ValueError(
          "params do not match the pruning state (was the state built for "
          f"another model?): {error}"
      ) from None
    mask_leaves = jax.tree.leaves(state.masks)
    for mask, param in zip(mask_leaves, params_at_masks):
      if mask.shape != np.shape(param):
        raise ValueError(
            f"params do not match the pruning state: a prunable leaf has shape "
            f"{np.shape(param)} but its mask has shape {mask.shape}"
        )
    step = state.count + 1
    pruned_moved, moved_otherwise = _chain_checks(step, state, params, params_at_masks)
    # A stopped run (count -1 or -2, so step 0 or -1) stays stopped.
    not_last = pruned_moved | moved_otherwise | (step <= _NOT_LAST + 1)

    # The weights after this step, as a function: each use recomputes them from params and
    # updates inside its own fused loop, so they are never written out per weight.
    def new_params():
      return [
          jnp.where(m, (p + u).astype(p.dtype), jnp.zeros_like(p))
          for m, p, u in zip(mask_leaves, params_at_masks, updates_at_masks)
      ]

    # The flip counts of this step, under the masks before any event: `& m` (through the
    # `where`) because zeroing a masked weight of dense params (fixed_masks' first step) is
    # not a flip, and pruned weights keep a count of 0. One pass per leaf, which an event
    # reads (as int32, so `flips + 1` cannot wrap) and resets where it prunes.
    flips = None
    if state.flips is not None:
      flips = [
          jnp.where(m, counters.add_flips(f, jnp.sign((p + u).astype(p.dtype)) != jnp.sign(p)), 0)
          for m, f, p, u in zip(
              mask_leaves, jax.tree.leaves(state.flips), params_at_masks, updates_at_masks
          )
      ]

    # A misplaced prune must never train a dense model silently: it stops the
    # run with NaN params, and masks() / flip_counts() then say why.
    def stopped_or_masked(mask, param, update):
      return jnp.where(not_last, jnp.nan, _masked_update(mask, param, update))

    # One conditional decides the masks and takes the update sample, at events and at
    # sample steps only; between them it passes its operands through (no work per weight).
    sample = state.last_update
    is_event, event = make_event(state.masks, params) if make_event else (None, None)
    sampling = takes_samples and sample is not None

    def event_masks_and_flips():
      if event is None:
        return mask_leaves, flips

      def with_event():
        masks = jax.tree.leaves(
            event(
                step,
                lambda: mask_structure.unflatten(new_params()),
                state.masks,
                lambda: mask_structure.unflatten([counters.as_int32(f) for f in flips]),
            )
        )
        return masks, [jnp.where(m, f, 0) for m, f in zip(masks, flips)]

      return jax.lax.cond(is_event(step) & ~not_last, with_event, lambda: (mask_leaves, flips))

    def special_step():
      masks, new_flips = event_masks_and_flips()
      if not sampling:
        return masks, new_flips, sample
      taken = update_check.take(params_at_masks, masks, updates_at_masks, stopped_or_masked)
      return masks, new_flips, taken

    def steady_step():
      return mask_leaves, flips, sample._replace(taken=jnp.bool_(False)) if sampling else sample

    if flips is None:
      masks = mask_leaves  # nothing but the update reads the old params
    elif event is None and not sampling:
      # `(f | 1) != 0` is always True: it only makes the updates depend on the
      # flip counts. The counts read the old params, which the training step
      # then overwrites in place with w + update; without this dependency XLA
      # cannot order the read before the write and copies every param first.
      masks = [m & ((f | 1) != 0) for m, f in zip(mask_leaves, flips)]
    else:
      special = _sample_step(step) if sampling else jnp.bool_(False)
      if event is not None:
        special = special | (is_event(step) & ~not_last)
      # The updates depend on the masks this conditional returns, and it reads the flip
      # counts and (at its rare steps) the params: so every read of the old params is
      # ordered before the training step overwrites them in place, with no copy.
      masks, flips, sample = jax.lax.cond(special, special_step, steady_step)
    masked_updates = [
        stopped_or_masked(m, p, u) for m, p, u in zip(masks, params_at_masks, updates_at_masks)
    ]
    updates = prunable_lib.replace_at(updates, state.masks, masked_updates)
    stopped_code = jnp.where(moved_otherwise, update_check.STOPPED_COUNT, _NOT_LAST)
    return updates, PruneState(
        count=jnp.where(state.count < 0, state.count, jnp.where(not_last, stopped_code, step)),
        masks=mask_structure.unflatten(masks if event or sampling else mask_leaves),
        flips=None if flips is None else mask_structure.unflatten(flips),
        last_update=sample,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _masked_update(mask, param, update):
  r"""``update`` at live weights, ``-param`` at pruned ones, in a dtype holding both.

  With float32 params and bfloat16 updates (low-precision gradients through
  ``optax.sgd``), ``-param`` rounded to bfloat16 would leave pruned weights a
  hair off zero, which the next step reads as a misplaced ``prune``. In
  :math:`\mathrm{result\_type}(w, u)`, ``optax.apply_updates`` computes
  :math:`w + (-w) = 0` exactly, and the update of a live weight is unchanged.
  """
  wide = jnp.result_type(param, update)
  if jnp.dtype(update.dtype) != jnp.dtype(wide):
    # Round to the update's own dtype explicitly: XLA may otherwise skip that rounding where
    # it fuses the optimizer's arithmetic into this op ("excess precision"), and do so in one
    # fusion and not another, so that the update check's sample and the applied update differ.
    info = jnp.finfo(update.dtype)
    update = jax.lax.reduce_precision(update, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return jnp.where(mask, update.astype(wide), -param.astype(wide))


def _all_live(params, prunable):
  return jax.tree.map(
      lambda leaf, keep: jnp.ones(np.shape(leaf), bool) if keep else None, params, prunable
  )


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
      (:func:`random_criterion`), or a callable ``(params, flips) -> scores`` over trees
      with ``None`` at non-prunable leaves (lowest pruned first).
    structure: what goes together: ``"weight"`` (the paper's), ``"unit"`` or :func:`units`
      (output units, coupled ones together), ``"N:M"`` such as ``"2:4"`` or :func:`n_of_m`.
    where: prunable leaves: ``None`` (floating leaves with 2+ dimensions), a pytree of bools
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
  return _masking_transform(where, _all_live, make_event, check_leaves, flip_dtype)


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
  return _masking_transform(where, initial, None, takes_samples=False, counts_flips=count_flips)


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

  def event(_, new_params, masks, flips):
    del flips
    return jax.tree.map(lambda m, w: m & (jnp.abs(w) >= threshold), masks, new_params())

  def make_event(masks, params):
    del masks, params
    return (lambda current: current == at_step), event

  flip_dtype = counters.flip_count_dtype(None, at_step)
  return _masking_transform(where, _all_live, make_event, flip_dtype=flip_dtype)


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
  if concrete and int(count) == _NOT_LAST:
    raise ValueError(_NOT_LAST_MESSAGE)
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
