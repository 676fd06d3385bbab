"""What each pruning link adds to the optimizer's compiled update: bytes, kernels, copies.

    python -m benchmarks.link_cost [--models lenet300,vgg19,resnet18] [--chains ...] [--json F]

Compiles (never runs) ``jit(tx.update + optax.apply_updates)`` of each chain for each model's
params, with params and state donated as in a training loop, and reads the optimized program
(``benchmarks/hlo_cost.py``): bytes accessed per weight, at the step between pruning events
(``steady``: each conditional at its cheapest branch) and as XLA's cost analysis counts them
(``xla``: each conditional at its dearest branch, so the pruning event as if it ran every
step); top-level kernels added per prunable leaf, all of them and those that write a buffer
per weight (the rest are scalar: step counters, predicates, conditionals); and the ``copy``
ops of a param-sized buffer. A second or so per row
on CPU; the figures are deterministic for one jax version, so tests assert them as ceilings.

The chains (``dense`` is the base of the others: coupled weight decay then momentum SGD, the
paper's optimizer):

* ``dense``: add_decayed_weights(5e-4) -> sgd(0.01, momentum 0.9);
* ``fixed_masks`` / ``fixed_masks_no_flips``: dense -> flipout.fixed_masks(all live), counting
  flips / with ``count_flips=False``;
* ``prune`` / ``prune_u16``: dense -> flipout.prune(0.999) for a run of 10^8 steps (int32 flip
  counts) / of 60000 steps (uint16 ones);
* ``noise_prune``: flipout.gradient_noise(1.0) -> dense -> flipout.prune(0.999) (the paper's);
* ``prune_unit`` / ``prune_2:4``: prune with ``structure="unit"`` / ``structure="2:4"``;
* ``prune_below``: dense -> flipout.prune_below(1e-3, step=10^7);
* ``hand_mask`` / ``hand_mask_flips``: hand-written links, the floors: ``where(mask, u, -w)``,
  and that plus an int32 flip count (ordered before the params' in-place write), no checks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flipout_jax as flipout
from benchmarks import _common, hlo_cost
from experiments import cli, models

STEADY_STEPS = 10**8
UINT16_STEPS = 60_000


def dense_chain() -> optax.GradientTransformation:
  """The base of every chain: coupled weight decay, then momentum SGD."""
  return optax.chain(
      optax.add_decayed_weights(_common.WEIGHT_DECAY),
      optax.sgd(_common.LEARNING_RATE, momentum=_common.MOMENTUM),
  )


def _all_live(params) -> Any:
  return jax.tree.map(lambda p: np.ones(p.shape, bool) if len(p.shape) >= 2 else None, params)


def _hand_link(count_flips: bool) -> optax.GradientTransformation:
  """The floor of a masking link: the mask (and an int32 flip count) and nothing else."""

  def init(params):
    masks = _all_live(params)
    flips = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.int32), masks)
    return masks, flips

  def update(updates, state, params):
    masks, flips = state

    def leaf(u, m, f, p):
      if m is None:
        return u, None
      if not count_flips:
        return jnp.where(m, u, -p), f
      new_f = jnp.where(m, f + (jnp.sign(p + u) != jnp.sign(p)).astype(f.dtype), 0)
      # The update depends on the counts, so their read of p comes before p is overwritten.
      return jnp.where(m & ((new_f | 1) != 0), u, -p), new_f

    pairs = jax.tree.map(leaf, updates, masks, flips, params, is_leaf=lambda x: x is None)
    is_pair = lambda x: isinstance(x, tuple)
    new_updates = jax.tree.map(lambda pair: pair[0], pairs, is_leaf=is_pair)
    new_flips = jax.tree.map(lambda pair: pair[1], pairs, is_leaf=is_pair)
    return new_updates, (masks, new_flips)

  return optax.GradientTransformation(init, update)


def _prune(**kwargs) -> Callable[[Any, Any], optax.GradientTransformation]:
  return lambda params, groups: optax.chain(dense_chain(), flipout.prune(0.999, **kwargs))


CHAINS: dict[str, Callable[[Any, Any], optax.GradientTransformation]] = {
    "dense": lambda params, groups: dense_chain(),
    "fixed_masks": lambda params, groups: optax.chain(
        dense_chain(), flipout.fixed_masks(_all_live(params))
    ),
    "fixed_masks_no_flips": lambda params, groups: optax.chain(
        dense_chain(), flipout.fixed_masks(_all_live(params), count_flips=False)
    ),
    "prune": _prune(total_steps=STEADY_STEPS),
    "prune_u16": _prune(total_steps=UINT16_STEPS),
    "noise_prune": lambda params, groups: optax.chain(
        flipout.gradient_noise(1.0), dense_chain(), flipout.prune(0.999, total_steps=STEADY_STEPS)
    ),
    "prune_unit": lambda params, groups: optax.chain(
        dense_chain(),
        flipout.prune(0.9, total_steps=STEADY_STEPS, structure=flipout.units(groups())),
    ),
    "prune_2:4": lambda params, groups: optax.chain(
        dense_chain(),
        flipout.prune(
            total_steps=STEADY_STEPS,
            structure="2:4",
            where=lambda path, leaf: len(leaf.shape) >= 2 and leaf.shape[-2] % 4 == 0,
        ),
    ),
    "prune_below": lambda params, groups: optax.chain(
        dense_chain(), flipout.prune_below(1e-3, step=10**7)
    ),
    "hand_mask": lambda params, groups: optax.chain(dense_chain(), _hand_link(False)),
    "hand_mask_flips": lambda params, groups: optax.chain(dense_chain(), _hand_link(True)),
}
DEFAULT_CHAINS = (
    "dense",
    "fixed_masks",
    "fixed_masks_no_flips",
    "prune",
    "prune_u16",
    "noise_prune",
)
DEFAULT_MODELS = ("lenet300", "vgg19", "resnet18")


class LinkCost(NamedTuple):
  """One chain's compiled update on one model (bytes per weight of all params)."""

  chain: str
  bytes_per_weight: float
  steady_bytes_per_weight: float
  kernels: int
  weight_kernels: int
  param_copies: int


def update_program(params: Any, tx: optax.GradientTransformation) -> str:
  """Optimized HLO of ``(params, state, grads) -> (apply_updates(params, u), state')``,
  params and state donated; ``params`` may hold ``jax.ShapeDtypeStruct`` leaves."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, params)
  return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()


def measure_chain(name: str, params: Any, groups: Callable[[], Any] = lambda: None) -> LinkCost:
  """The cost of chain ``name`` (one of :data:`CHAINS`) on ``params`` (``groups()``: the unit
  groups ``prune_unit`` reads).

  A param-sized copy is a ``copy`` of a buffer at least as large as the smallest prunable
  leaf (leaves of 2+ dimensions), and a per-weight kernel one whose results hold at least one
  byte per entry of that leaf (a bool mask of it, say), as opposed to the scalar kernels of
  counters, predicates and conditionals.
  """
  cost = hlo_cost.program_cost(update_program(params, CHAINS[name](params, groups)))
  leaves = jax.tree.leaves(params)
  weights = sum(int(np.prod(p.shape)) for p in leaves)
  prunable = [p for p in leaves if len(p.shape) >= 2]
  smallest = min(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in prunable)
  fewest_entries = min(int(np.prod(p.shape)) for p in prunable)
  return LinkCost(
      chain=name,
      bytes_per_weight=cost.bytes / weights,
      steady_bytes_per_weight=cost.steady_bytes / weights,
      kernels=cost.kernels,
      weight_kernels=sum(1 for size in cost.kernel_outputs if size >= fewest_entries),
      param_copies=sum(1 for size in cost.copies if size >= smallest),
  )


def model_params(model: str) -> tuple[Any, Callable[[], Any]]:
  """Abstract params of an experiments family, and a function giving its unit groups (traced
  from the model only when ``prune_unit`` asks)."""
  shape = _common.MNIST_SHAPE if model in ("lenet300", "lenet5") else _common.CIFAR_SHAPE
  case = _common.Case(model, 32, shape)
  return _common.abstract_model(case).params, lambda: _common.unit_groups_of(case)


def prunable_leaf_count(params: Any) -> int:
  """Leaves of 2+ dimensions: the prunable ones by default."""
  return sum(1 for p in jax.tree.leaves(params) if len(p.shape) >= 2)


def table(model: str, costs: Sequence[LinkCost], prunable_leaves: int) -> list[list[Any]]:
  """Rows of the printed table; the first cost is the baseline of the differences."""
  base = costs[0]
  return [
      [
          model,
          c.chain,
          f"{c.steady_bytes_per_weight:.1f}",
          f"{c.steady_bytes_per_weight - base.steady_bytes_per_weight:+.1f}",
          f"{c.bytes_per_weight:.1f}",
          c.kernels,
          f"{(c.kernels - base.kernels) / prunable_leaves:+.2f}",
          f"{(c.weight_kernels - base.weight_kernels) / prunable_leaves:+.2f}",
          c.param_copies,
      ]
      for c in costs
  ]


HEADERS = [
    "model",
    "chain",
    "steady B/weight",
    "over first",
    "xla B/weight",
    "kernels",
    "added / prunable leaf",
    "per-weight ones / leaf",
    "param copies",
]


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.OneLineParser(prog="python -m benchmarks.link_cost", description=__doc__)
  parser.add_argument(
      "--models",
      type=cli.comma_separated(models.MODEL_NAMES),
      default=DEFAULT_MODELS,
      help=f"comma-separated experiments families among {','.join(models.MODEL_NAMES)}",
  )
  parser.add_argument(
      "--chains",
      type=cli.comma_separated(tuple(CHAINS)),
      default=DEFAULT_CHAINS,
      help=f"comma-separated chains among {','.join(CHAINS)}; the first is the baseline",
  )
  parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = parser.parse_args(argv)
  rows, records = [], []
  for model in args.models:
    params, groups = model_params(model)
    costs = [measure_chain(chain, params, groups) for chain in args.chains]
    rows += table(model, costs, prunable_leaf_count(params))
    records += [{"model": model, **c._asdict()} for c in costs]
  print(cli.format_table(HEADERS, rows))
  print(_common.describe_machine(_common.machine_info()))
  if args.json:
    _common.write_json(args.json, {"machine": _common.machine_info(), "rows": records})
  return 0


if __name__ == "__main__":
  sys.exit(main())
