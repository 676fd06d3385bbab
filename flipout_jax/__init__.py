"""flipout_jax: FlipOut pruning as a pure Optax gradient transformation.

FlipOut (Apostol, Stol, Forré, 2021) prunes the weights whose sign keeps
flipping during training: saliency ``|w|^p / (flips + 1)``, ranked globally,
at a few pruning events. Typical use::

  tx = optax.chain(
      flipout.gradient_noise(scale=1.0, seed=0),
      optax.add_decayed_weights(5e-4),
      optax.sgd(lr_schedule, momentum=0.9),
      flipout.prune(target_sparsity=0.999, total_steps=num_steps),  # last
  )
"""

from flipout_jax._src.baselines import hoyer_square
from flipout_jax._src.baselines import snip
from flipout_jax._src.compact import Compacted
from flipout_jax._src.compact import activation_norms
from flipout_jax._src.compact import CompactionReport
from flipout_jax._src.compact import LayerCompaction
from flipout_jax._src.compact import compact
from flipout_jax._src.compact import flops
from flipout_jax._src.criteria import Criterion
from flipout_jax._src.criteria import flipout_criterion
from flipout_jax._src.criteria import flipout_scores
from flipout_jax._src.criteria import magnitude_criterion
from flipout_jax._src.criteria import magnitude_scores
from flipout_jax._src.criteria import random_criterion
from flipout_jax._src.criteria import random_scores
from flipout_jax._src.criteria import taylor_criterion
from flipout_jax._src.criteria import taylor_scores
from flipout_jax._src.export import export
from flipout_jax._src.export import load
from flipout_jax._src.noise import GradientNoiseState
from flipout_jax._src.one_shot import wanda
from flipout_jax._src.noise import gradient_noise
from flipout_jax._src.prune import PruneState
from flipout_jax._src.prune import apply_masks
from flipout_jax._src.prune import cubic_event_steps
from flipout_jax._src.prune import event_steps
from flipout_jax._src.prune import fixed_masks
from flipout_jax._src.prune import flip_counts
from flipout_jax._src.prune import masks
from flipout_jax._src.prune import num_events_for
from flipout_jax._src.prune import prune
from flipout_jax._src.prune import prune_below
from flipout_jax._src.report import LayerReport
from flipout_jax._src.report import Summary
from flipout_jax._src.report import sparsity
from flipout_jax._src.schedule import Cubic
from flipout_jax._src.schedule import Halving
from flipout_jax._src.schedule import cubic
from flipout_jax._src.schedule import halving
from flipout_jax._src.structure import Structure
from flipout_jax._src.structure import n_of_m
from flipout_jax._src.structure import units
from flipout_jax._src.report import summary
from flipout_jax._src.unit_groups import UnitFlops
from flipout_jax._src.unit_groups import UnitGroups
from flipout_jax._src.unit_groups import unit_groups

__version__ = "0.1.0"

__all__ = (
    "Compacted",
    "CompactionReport",
    "Criterion",
    "Cubic",
    "GradientNoiseState",
    "Halving",
    "LayerCompaction",
    "LayerReport",
    "PruneState",
    "Structure",
    "Summary",
    "UnitFlops",
    "UnitGroups",
    "activation_norms",
    "apply_masks",
    "compact",
    "cubic",
    "cubic_event_steps",
    "event_steps",
    "export",
    "fixed_masks",
    "flip_counts",
    "flops",
    "flipout_criterion",
    "flipout_scores",
    "gradient_noise",
    "halving",
    "hoyer_square",
    "load",
    "magnitude_criterion",
    "magnitude_scores",
    "masks",
    "n_of_m",
    "num_events_for",
    "prune",
    "prune_below",
    "random_criterion",
    "random_scores",
    "snip",
    "sparsity",
    "summary",
    "taylor_criterion",
    "taylor_scores",
    "unit_groups",
    "units",
    "wanda",
)
