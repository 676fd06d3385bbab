"""The masking link that ``prune``, ``fixed_masks`` and ``prune_below`` share.

One ``optax`` transformation: pruned weights' updates rewritten to ``-w`` (so they land on
exactly zero), sign flips of live weights counted, and, under one ``lax.cond`` at events and
sample steps only, the event's new masks and the update sample from which the next update
checks that the link is last in the chain (``update_check.py``). Its state is
:class:`PruneState`. The trades each choice makes against the compiled step's bytes and
kernels are in ``docs/algorithm.md`` and ``benchmarks/link_cost.py``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax._src import counters
from flipout_jax._src import events
from flipout_jax._src import prunable as prunable_lib
from flipout_jax._src import update_check


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
NOT_LAST = -1
NOT_LAST_MESSAGE = (
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


def _prunable_leaves(state, params, updates) -> tuple[list, list]:
  """``(params, updates)`` at the state's prunable leaves, checked against its masks."""
  if params is None:
    raise ValueError(
        "params: flipout pruning needs the current params; call tx.update(updates, state, params)"
    )
  try:
    params_at_masks = prunable_lib.leaves_at(state.masks, params)
    updates_at_masks = prunable_lib.leaves_at(state.masks, updates)
  except (ValueError, TypeError) as error:
    raise ValueError(
        "params do not match the pruning state (was the state built for "
        f"another model?): {error}"
    ) from None
  for mask, param in zip(jax.tree.leaves(state.masks), params_at_masks):
    if mask.shape != np.shape(param):
      raise ValueError(
          f"params do not match the pruning state: a prunable leaf has shape "
          f"{np.shape(param)} but its mask has shape {mask.shape}"
      )
  return params_at_masks, updates_at_masks


def _step_flips(mask_leaves, flip_leaves, params_at_masks, updates_at_masks) -> list:
  """The flip counts of this step, under the masks before any event: ``& m`` (through the
  ``where``) because zeroing a masked weight of dense params (fixed_masks' first step) is not
  a flip, and pruned weights keep a count of 0. One pass per leaf, which an event reads (as
  int32, so ``flips + 1`` cannot wrap) and resets where it prunes."""
  return [
      jnp.where(m, counters.add_flips(f, jnp.sign((p + u).astype(p.dtype)) != jnp.sign(p)), 0)
      for m, f, p, u in zip(mask_leaves, flip_leaves, params_at_masks, updates_at_masks)
  ]


def _never(step) -> jax.Array:
  del step
  return jnp.bool_(False)


class _StepState(NamedTuple):
  """What one update has computed before it decides the masks."""

  step: jax.Array
  not_last: jax.Array
  params: list  # at the prunable leaves
  updates: list
  flips: list | None  # this step's counts (_step_flips), None without counts


def _masks_flips_and_sample(state, now: _StepState, event, sampling: bool, stopped_or_masked):
  """This step's masks, flip counts and update sample.

  One conditional decides the masks and takes the update sample, at events and at sample
  steps only; between them it passes its operands through (no work per weight).
  """
  mask_leaves, flips, sample = jax.tree.leaves(state.masks), now.flips, state.last_update
  mask_structure = jax.tree.structure(state.masks)
  is_event, rule = event if event is not None else (_never, None)

  # The weights after this step, as a function: each use recomputes them from params and
  # updates inside its own fused loop, so they are never written out per weight.
  def new_params():
    return [
        jnp.where(m, (p + u).astype(p.dtype), jnp.zeros_like(p))
        for m, p, u in zip(mask_leaves, now.params, now.updates)
    ]

  def event_masks_and_flips():
    if rule is None:
      return mask_leaves, flips

    def with_event():
      masks = jax.tree.leaves(
          rule(
              now.step,
              lambda: mask_structure.unflatten(new_params()),
              state.masks,
              lambda: mask_structure.unflatten([counters.as_int32(f) for f in flips]),
              lambda: mask_structure.unflatten(
                  [jnp.where(m, u, jnp.zeros_like(u)) for m, u in zip(mask_leaves, now.updates)]
              ),
          )
      )
      return masks, [jnp.where(m, f, 0) for m, f in zip(masks, flips)]

    happens = is_event(now.step) & ~now.not_last
    return jax.lax.cond(happens, with_event, lambda: (mask_leaves, flips))

  def special_step():
    masks, new_flips = event_masks_and_flips()
    if not sampling:
      return masks, new_flips, sample
    taken = update_check.take(now.params, masks, now.updates, stopped_or_masked)
    return masks, new_flips, taken

  def steady_step():
    return mask_leaves, flips, sample._replace(taken=jnp.bool_(False)) if sampling else sample

  if flips is None:
    return mask_leaves, flips, sample  # nothing but the update reads the old params
  if rule is None and not sampling:
    # `(f | 1) != 0` is always True: it only makes the updates depend on the
    # flip counts. The counts read the old params, which the training step
    # then overwrites in place with w + update; without this dependency XLA
    # cannot order the read before the write and copies every param first.
    return [m & ((f | 1) != 0) for m, f in zip(mask_leaves, flips)], flips, sample
  special = _sample_step(now.step) if sampling else jnp.bool_(False)
  if rule is not None:
    special = special | (is_event(now.step) & ~now.not_last)
  # The updates depend on the masks this conditional returns, and it reads the flip
  # counts and (at its rare steps) the params: so every read of the old params is
  # ordered before the training step overwrites them in place, with no copy.
  return jax.lax.cond(special, special_step, steady_step)


def _initial_state(params, masks, flip_dtype) -> PruneState:
  """Step 0: the initial ``masks``, zero flip counts of ``flip_dtype`` (None: no counts)."""
  flips = None
  if flip_dtype is not None:
    flips = jax.tree.map(lambda m: jnp.zeros(m.shape, flip_dtype), masks)
  return PruneState(
      count=jnp.zeros([], jnp.int32),
      masks=masks,
      flips=flips,
      last_update=update_check.empty(prunable_lib.leaves_at(masks, params)),
  )


def masking_transform(
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
    masks = initial_masks(params, prunable_lib.prunable_tree(params, where))
    prunable_lib.check_floating(params, masks)
    check_leaves(masks, params)
    return _initial_state(params, masks, flip_dtype if counts_flips else None)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # e.g. a loss `value` for other links of the chain
    params_at_masks, updates_at_masks = _prunable_leaves(state, params, updates)
    mask_structure = jax.tree.structure(state.masks)
    mask_leaves = jax.tree.leaves(state.masks)
    step = state.count + 1
    pruned_moved, moved_otherwise = _chain_checks(step, state, params, params_at_masks)
    # A stopped run (count -1 or -2, so step 0 or -1) stays stopped.
    not_last = pruned_moved | moved_otherwise | (step <= NOT_LAST + 1)
    flips = None
    if state.flips is not None:
      flips = _step_flips(
          mask_leaves, jax.tree.leaves(state.flips), params_at_masks, updates_at_masks
      )

    # A misplaced prune must never train a dense model silently: it stops the
    # run with NaN params, and masks() / flip_counts() then say why.
    def stopped_or_masked(mask, param, update):
      return jnp.where(not_last, jnp.nan, _masked_update(mask, param, update))

    sampling = takes_samples and state.last_update is not None
    step_state = _StepState(step, not_last, params_at_masks, updates_at_masks, flips)
    event = make_event(state.masks, params) if make_event else None
    masks, flips, sample = _masks_flips_and_sample(
        state, step_state, event, sampling, stopped_or_masked
    )
    masked_updates = [
        stopped_or_masked(m, p, u) for m, p, u in zip(masks, params_at_masks, updates_at_masks)
    ]
    updates = prunable_lib.replace_at(updates, state.masks, masked_updates)
    stopped_code = jnp.where(moved_otherwise, update_check.STOPPED_COUNT, NOT_LAST)
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


def all_live(params, prunable):
  return jax.tree.map(
      lambda leaf, keep: jnp.ones(np.shape(leaf), bool) if keep else None, params, prunable
  )
