"""What each method optimises and how: the loss, the Optax chain per method, SNIP masks.

Coupled weight decay (added to the gradient before momentum, as PyTorch's SGD and the paper
do); the learning rate is ``lr * 0.1^(milestones passed)``::

  flipout            gradient_noise -> add_decayed_weights -> sgd -> prune(criterion="flipout")
  global_magnitude   add_decayed_weights -> sgd -> prune(criterion="global_magnitude")
  magnitude          add_decayed_weights -> sgd -> prune(criterion="magnitude")   (layer-wise)
  random             add_decayed_weights -> sgd -> prune(criterion="random")
  snip               add_decayed_weights -> sgd -> fixed_masks(snip(loss, params, batch 0))
  hoyer_square       loss + hoyer_lambda * hoyer_square(params) until the prune step, then
                     add_decayed_weights -> sgd -> one-shot magnitude pruning (see below)
  dense              add_decayed_weights -> sgd

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


def learning_rate_at(config: config_lib.Config, steps_per_epoch: int, step: int) -> float:
  """The schedule's value at ``step``, computed on the host (for logs)."""
  passed = sum(step >= int(m) * steps_per_epoch for m in config.milestones)
  return config.lr * 0.1**passed


def hoyer_prune_step(total_steps: int) -> int:
  """The step at which ``hoyer_square`` prunes once: the middle of the run."""
  return max(1, round(total_steps / 2))


def _pruning_transform(
    config: config_lib.Config, total_steps: int, snip_masks
) -> optax.GradientTransformation | None:
  """The last link of the chain: how (and whether) the method prunes."""
  method = config.method
  if method == "dense":
    return None
  if method in config_lib.SCHEDULED_CRITERIA:
    return flipout.prune(
        config.sparsity,
        total_steps=total_steps,
        rate=config.prune_rate,
        p=config.p,
        criterion=config_lib.SCHEDULED_CRITERIA[method],
        seed=config.seed,
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
      rate=(1.0 + config.sparsity) / 2.0,
      criterion="global_magnitude",
  )


def build_optimizer(
    config: config_lib.Config, steps_per_epoch: int, snip_masks=None
) -> optax.GradientTransformation:
  """The method's Optax chain (see the module docstring); ``snip_masks`` for ``snip``.

  Raises:
    config_lib.ConfigError: the schedule is too short for the pruning events the target needs.
  """
  total_steps = config.epochs * steps_per_epoch
  links = []
  if config.method == "flipout" and config.noise_scale > 0:
    links.append(flipout.gradient_noise(config.noise_scale, seed=config.seed))
  links += [
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum),
  ]
  try:
    pruning = _pruning_transform(config, total_steps, snip_masks)
  except ValueError as error:
    raise config_lib.ConfigError(
        f"{config.epochs} epochs of {steps_per_epoch} steps cannot reach --sparsity="
        f"{config.sparsity} with --prune_rate={config.prune_rate}: {config_lib.one_line(error)}; "
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
