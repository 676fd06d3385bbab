"""What each method optimises and how: the loss, the Optax chain per method, SNIP masks.

Coupled weight decay (added to the gradient before momentum, as PyTorch's SGD and the paper
do); the learning rate is ``lr * 0.1^(milestones passed)``::

  flipout            gradient_noise -> add_decayed_weights -> sgd -> prune(criterion="flipout")
  global_magnitude   add_decayed_weights -> sgd -> prune(criterion="global_magnitude")
  magnitude          add_decayed_weights -> sgd -> prune(criterion="magnitude")   (layer-wise)
  random             add_decayed_weights -> sgd -> prune(criterion="random")
  taylor             add_decayed_weights -> sgd -> prune(criterion="taylor")   (|w * update|)
  snip               add_decayed_weights -> sgd -> fixed_masks(snip(loss, params, batch 0))
  hoyer_square       loss + hoyer_lambda * hoyer_square(params) until the prune step, then
                     add_decayed_weights -> sgd -> one-shot magnitude pruning (see below)
  dense              add_decayed_weights -> sgd

The gradient noise link is there for each of the five scheduled methods (flipout,
global_magnitude, magnitude, random, taylor) whose noise scale (``config_lib.noise_scale_of``:
``--noise_scale``, default 1 for flipout and 0 for the others) is above 0, so the paper's
ablation rows (flipout without noise, global magnitude with noise) are one flag away.
``--schedule cubic`` swaps their halving events for Zhu & Gupta's cubic ramp
(:func:`cubic_steps`); SNIP, Hoyer-Square and dense take neither.

Hoyer-Square prunes once, at step ``round(T / 2)`` of the ``T`` steps, every weight whose
magnitude is below a threshold, and trains on with the mask fixed and without the regulariser.
With ``hoyer_threshold`` unset (the default) the threshold is the one that reaches ``sparsity``
exactly: the ``round(sparsity * N)``-th smallest ``|w|`` over all prunable weights at that
step. That is one global-magnitude event, so it is implemented as
``prune(sparsity, criterion="global_magnitude")`` with a rate above the target (one event,
landing exactly on the target). With ``hoyer_threshold`` set, ``prune_below(threshold)`` is
used instead, as the paper's reference code did, and the sparsity is whatever it gives.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flipout_jax as flipout
from experiments import config as config_lib
from experiments import input_pipeline


def learning_rate_schedule(config: config_lib.Config, steps_per_epoch: int) -> optax.Schedule:
  """``lr * 0.1^k`` at step ``t`` (from 0), ``k`` = #milestones ``m`` with
  ``t >= m * steps_per_epoch``."""
  boundaries = {int(m) * steps_per_epoch: 0.1 for m in config.milestones}
  return optax.piecewise_constant_schedule(config.lr, boundaries)


def paper_milestones(epochs: int) -> tuple[int, ...]:
  """The paper's learning-rate shape for a run of ``epochs``: x0.1 after
  ``round(150/350 * epochs)`` and ``round(250/350 * epochs)`` epochs (150 and 250 of its 350),
  at least 1, dropping a milestone that is not before the end."""
  marks = sorted({max(1, round(epochs * 150 / 350)), max(1, round(epochs * 250 / 350))})
  return tuple(mark for mark in marks if mark < epochs)


def learning_rate_at(config: config_lib.Config, steps_per_epoch: int, step: int) -> float:
  """The schedule's value at ``step``, computed on the host (for logs)."""
  passed = sum(step >= int(m) * steps_per_epoch for m in config.milestones)
  return config.lr * 0.1**passed


def hoyer_prune_step(total_steps: int) -> int:
  """The step at which ``hoyer_square`` prunes once: the middle of the run."""
  return max(1, round(total_steps / 2))


def cubic_steps(
    config: config_lib.Config, total_steps: int, steps_per_epoch: int
) -> tuple[int, int, int]:
  """``(begin_step, end_step, prune_every)`` of a ``--schedule cubic`` run.

  ``--prune_begin_epoch`` / ``--prune_end_epoch`` in steps (epoch 0: step 1); unset, the
  steps of the halving schedule's first and last events, so both schedules prune over the
  same span. ``--prune_every_steps`` unset: one epoch.

  Raises:
    ValueError: the halving schedule the defaults come from does not fit the run.
  """
  halving = flipout.event_steps(config.sparsity, total_steps, config.prune_rate)
  if (config.prune_begin_epoch is None or config.prune_end_epoch is None) and (
      not halving or halving[0] < 1 or halving[-1] >= total_steps
  ):
    raise ValueError(
        "the default cubic span is the halving schedule's, which does not fit this run; "
        "set --prune_begin_epoch and --prune_end_epoch"
    )
  if config.prune_begin_epoch is None:
    begin = halving[0]
  else:
    begin = max(1, config.prune_begin_epoch * steps_per_epoch)
  end = halving[-1] if config.prune_end_epoch is None else config.prune_end_epoch * steps_per_epoch
  every = config.prune_every_steps or steps_per_epoch
  return begin, end, every


def _structure(config: config_lib.Config, unit_groups) -> dict[str, Any]:
  """``prune``'s structure arguments: ``unit_groups`` for ``unit``; for ``N:M``, only the
  kernels whose input width is a multiple of M (a first conv on 1 or 3 channels stays
  dense, as NVIDIA's ASP leaves it)."""
  if config.structure == "weight":
    return {}
  if config.structure == "unit":
    normalize = None if config.unit_normalize == "none" else config.unit_normalize
    structure = flipout.units(
        unit_groups,
        score=config.group_score,
        cost=config.unit_cost,
        normalize=normalize,
        round_to=config.unit_round_to,
    )
    # The units' biases and norm parameters are masked with them: a pruned unit is zero.
    return dict(structure=structure, where=unit_groups.where)
  m = int(config.structure.split(":")[1])
  divisible = lambda path, leaf: len(leaf.shape) >= 2 and leaf.shape[-2] % m == 0
  return dict(structure=config.structure, where=divisible)


def _criterion(config: config_lib.Config) -> str | flipout.Criterion:
  """``--method`` as ``prune``'s criterion, with ``--p`` (flipout) or ``--seed`` (random)."""
  name = config_lib.SCHEDULED_CRITERIA[config.method]
  if name == "flipout":
    return flipout.flipout_criterion(config.p)
  if name == "random":
    return flipout.random_criterion(config.seed)
  return name


def _schedule(config: config_lib.Config, total_steps: int, steps_per_epoch: int):
  """``--schedule`` as ``prune``'s schedule."""
  if config.schedule == "cubic":
    begin, end, every = cubic_steps(config, total_steps, steps_per_epoch)
    return flipout.cubic(begin, end, every, initial_sparsity=config.initial_sparsity)
  return flipout.halving(rate=config.prune_rate)


def _pruning_transform(
    config: config_lib.Config, total_steps: int, steps_per_epoch: int, snip_masks, unit_groups
) -> optax.GradientTransformation | None:
  """The last link of the chain: how (and whether) the method prunes."""
  method = config.method
  if method == "dense":
    return None
  if method in config_lib.SCHEDULED_CRITERIA:
    return flipout.prune(
        config.sparsity,
        total_steps=total_steps,
        schedule=_schedule(config, total_steps, steps_per_epoch),
        criterion=_criterion(config),
        **_structure(config, unit_groups),
    )
  if method == "snip":
    return flipout.fixed_masks(snip_masks)
  if config.hoyer_threshold is not None:
    return flipout.prune_below(config.hoyer_threshold, step=hoyer_prune_step(total_steps))
  # One global-magnitude event at round(T / 2) (a rate above the target means one event),
  # landing exactly on round(sparsity * N): pruning below the target's magnitude quantile.
  return flipout.prune(
      config.sparsity,
      total_steps=total_steps,
      criterion="global_magnitude",
      schedule=flipout.halving(rate=(1.0 + config.sparsity) / 2.0),
  )


def build_optimizer(
    config: config_lib.Config, steps_per_epoch: int, snip_masks=None, unit_groups=None
) -> optax.GradientTransformation:
  """The method's Optax chain (see the module docstring); ``snip_masks`` for ``snip``,
  ``unit_groups`` (``flipout.unit_groups`` of the model) for ``--structure=unit``.

  Raises:
    config_lib.ConfigError: the schedule is too short for the pruning events the target needs.
  """
  total_steps = config.epochs * steps_per_epoch
  links = []
  noise_scale = config_lib.noise_scale_of(config)
  if config.method in config_lib.SCHEDULED_CRITERIA and noise_scale > 0:
    links.append(flipout.gradient_noise(noise_scale, seed=config.seed))
  links += [
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum),
  ]
  try:
    pruning = _pruning_transform(config, total_steps, steps_per_epoch, snip_masks, unit_groups)
  except ValueError as error:
    schedule = (
        f"--prune_rate={config.prune_rate}"
        if config.schedule == "halving"
        else f"--schedule={config.schedule}"
    )
    raise config_lib.ConfigError(
        f"{config.epochs} epochs of {steps_per_epoch} steps cannot reach --sparsity="
        f"{config.sparsity} with {schedule}: {config_lib.one_line(error)}; "
        "train for more epochs or lower --sparsity"
    ) from None
  if pruning is not None:
    links.append(pruning)
  return optax.chain(*links)


def has_pruning_state(config: config_lib.Config) -> bool:
  return config.method != "dense"


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy ``-log softmax(logits)[label]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def snip_masks(graphdef_train, params, batch_stats, batch, mean, std, sparsity: float):
  """SNIP masks (``flipout.snip``) from one unaugmented batch ``(uint8 images, labels)``.

  Pure, to be compiled once (``run_state.run_once``): eagerly, every small op of the selection
  would compile on its own.
  """

  def loss_fn(candidate_params, images_and_labels):
    images, labels = images_and_labels
    inputs = input_pipeline.normalize(images, mean, std)
    logits = nnx.merge(graphdef_train, candidate_params, batch_stats)(inputs)
    return jnp.mean(cross_entropy(logits, labels))

  return flipout.snip(loss_fn, params, batch, sparsity)
