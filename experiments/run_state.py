"""The model, its optimizer and the initial train state of a run (concrete or abstract)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flipout_jax as flipout
from experiments import config as config_lib
from experiments import initializers, models, optimizers


class Setup(NamedTuple):
  """What a run needs besides its data: the model pieces, optimizer and initial state."""

  graphdef_train: Any
  graphdef_eval: Any
  tx: optax.GradientTransformation
  state: dict[str, Any]


# Functions that run once per run (initialisation, SNIP, optimizer init) are compiled with
# XLA's cheap optimisation level on CPU: optimising them takes seconds to tens of seconds
# there (VGG11's initialisation: 17 s against 3 s), running them unoptimised milliseconds.
_RUN_ONCE_CPU_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def run_once(function, *args):
  """Compiles ``function`` for ``args`` (cheaply on CPU) and calls it once."""
  options = _RUN_ONCE_CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(function).lower(*args).compile(compiler_options=options)(*args)


def _model_initializer(
    model_name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int, init: str
):
  """Graph definitions (train and eval mode) and a pure ``() -> (params, batch_stats)``.

  The initializer is meant for :func:`run_once`: one compiled call, where eager
  initialisation would dispatch (and compile) every initializer op separately.
  """

  def create() -> nnx.Module:
    model = models.create_model(
        model_name, input_shape=input_shape, num_classes=num_classes, rngs=nnx.Rngs(seed)
    )
    initializers.apply_init(model, init, seed)
    return model

  abstract_model = nnx.eval_shape(create)
  abstract_model.train()
  graphdef_train, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  abstract_model.eval()
  graphdef_eval, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)

  def initial_state():
    _, params, batch_stats = nnx.split(create(), nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)

  return graphdef_train, graphdef_eval, initial_state


def model_unit_groups(graphdef_eval, params, batch_stats, input_shape):
  """``flipout.unit_groups`` of the model's inference function, for the params.

  The batch statistics are traced as params too (not as arguments, which would pin their
  channels), and only the params' kernels are prunable; their units' biases and BatchNorm
  scales and biases are followers (``where`` of the result).
  """
  apply_fn = lambda state, images: nnx.merge(graphdef_eval, state["params"], state["stats"])(images)
  images = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  kernels = lambda path, leaf: path[0].key == "params" and len(leaf.shape) >= 2
  groups = flipout.unit_groups(
      apply_fn, {"params": params, "stats": batch_stats}, images, where=kernels
  )
  return flipout.UnitGroups(
      groups.ids["params"], groups.flops, groups.where["params"], groups.kernels["params"]
  )


def build_setup(
    config: config_lib.Config,
    input_shape: tuple[int, int, int],
    num_classes: int,
    steps_per_epoch: int,
    snip_batch_source=None,
    *,
    abstract: bool = False,
) -> Setup:
  """Creates the model and optimizer and the initial state.

  ``snip_batch_source`` is ``(dataset, epoch-0 order)`` for SNIP; None (restoring a
  checkpoint, or ``abstract``) gives placeholder all-live masks of the right structure.
  ``abstract=True`` computes only shapes and dtypes (``jax.ShapeDtypeStruct`` leaves).
  """
  graphdef_train, graphdef_eval, initial_state = _model_initializer(
      config.model, tuple(input_shape), num_classes, config.seed, config.init
  )
  evaluate = jax.eval_shape if abstract else run_once
  params, batch_stats = evaluate(initial_state)
  snip_masks = None
  if config.method == "snip":
    if snip_batch_source is None or abstract:
      snip_masks = jax.tree.map(
          lambda leaf: np.ones(leaf.shape, bool) if len(leaf.shape) >= 2 else None, params
      )
    else:
      dataset, first_order = snip_batch_source
      # SNIP scores the first training batch of epoch 0, not augmented.
      batch = (dataset.train_images[first_order[0]], dataset.train_labels[first_order[0]])
      snip_masks = run_once(
          lambda p, b: optimizers.snip_masks(
              graphdef_train, p, batch_stats, b, dataset.mean, dataset.std, config.sparsity
          ),
          params,
          batch,
      )
      # SNIP prunes at initialisation: the first step already trains the sparse network.
      params = run_once(flipout.apply_masks, params, snip_masks)
  groups = None
  if config.structure == "unit":
    groups = model_unit_groups(graphdef_eval, params, batch_stats, input_shape)
  tx = optimizers.build_optimizer(config, steps_per_epoch, snip_masks, groups)
  step = jax.ShapeDtypeStruct((), jnp.int32) if abstract else np.zeros((), np.int32)
  state = {
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": evaluate(tx.init, params),
      "step": step,
  }
  return Setup(graphdef_train, graphdef_eval, tx, state)
