"""What the pruning links add to the optimizer's compiled update, as ceilings (issue 33).

Compile only: bytes accessed per weight, kernels and param copies are deterministic for one
jax version (``benchmarks/link_cost.py``, BENCHMARKS "Link cost"). A ceiling that a jax
upgrade moves is re-measured with ``python -m benchmarks.link_cost`` and written down there;
a change to ``prune`` that adds a pass per weight fails here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import hlo_cost, link_cost

# Steady-step bytes per weight over the dense chain (28.0 on CPU), as measured with jax 0.10.2
# plus a margin well under one byte per weight: one more pass over the weights costs >= 1.
_OVER_DENSE = {
    "fixed_masks_no_flips": 1.5,
    "fixed_masks": 22.5,
    "prune_u16": 22.5,
    "prune": 26.5,
    "noise_prune": 42.5,
}
# Per-weight kernels added per prunable leaf: the flip count (fixed_masks), and the update
# handed to the event's conditional (prune); the conditional itself is one more per program.
_WEIGHT_KERNELS_PER_LEAF = {"fixed_masks_no_flips": 0, "fixed_masks": 1, "prune": 2}


@functools.lru_cache(maxsize=None)
def _costs(model: str, chain: str) -> link_cost.LinkCost:
  params, groups = link_cost.model_params(model)
  return link_cost.measure_chain(chain, params, groups)


def _leaves(model: str) -> int:
  return link_cost.prunable_leaf_count(link_cost.model_params(model)[0])


@pytest.mark.parametrize("model", ["lenet300", "vgg19"])
@pytest.mark.parametrize("chain", list(_OVER_DENSE))
def test_steady_bytes_per_weight_stay_under_their_ceiling(model, chain):
  dense = _costs(model, "dense").steady_bytes_per_weight
  assert dense == pytest.approx(28.0, abs=0.1)
  over = _costs(model, chain).steady_bytes_per_weight - dense
  assert over <= _OVER_DENSE[chain], (chain, over)


@pytest.mark.parametrize("model", ["lenet300", "vgg19"])
@pytest.mark.parametrize("chain", list(_WEIGHT_KERNELS_PER_LEAF))
def test_added_kernels_per_prunable_leaf_stay_under_their_ceiling(model, chain):
  added = _costs(model, chain).weight_kernels - _costs(model, "dense").weight_kernels
  conditional = 1 if chain == "prune" else 0
  assert added <= _WEIGHT_KERNELS_PER_LEAF[chain] * _leaves(model) + conditional, added


@pytest.mark.parametrize("model", ["lenet300", "vgg19"])
@pytest.mark.parametrize("chain", ["fixed_masks", "prune", "noise_prune"])
def test_no_chain_copies_a_param(model, chain):
  assert _costs(model, chain).param_copies == 0


def test_the_mask_alone_costs_what_a_hand_written_where_costs():
  mask = _costs("lenet300", "fixed_masks_no_flips").steady_bytes_per_weight
  assert mask == pytest.approx(_costs("lenet300", "hand_mask").steady_bytes_per_weight, abs=0.1)


def test_xla_counts_the_event_at_every_step_and_the_steady_walk_does_not():
  prune = _costs("lenet300", "prune")
  assert prune.bytes_per_weight > prune.steady_bytes_per_weight + 40


def _xla_bytes(compiled) -> float:
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["bytes accessed"]


@pytest.mark.parametrize("chain", ["dense", "hand_mask_flips", "prune", "noise_prune"])
def test_the_walk_at_the_dearest_branch_is_xlas_cost_analysis(chain):
  params = {
      "w": jax.ShapeDtypeStruct((96, 64), jnp.float32),
      "b": jax.ShapeDtypeStruct((64,), jnp.float32),
      "v": jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32),
  }
  tx = link_cost.CHAINS[chain](params, lambda: None)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = (
      jax.jit(step, donate_argnums=(0, 1))
      .lower(params, jax.eval_shape(tx.init, params), params)
      .compile()
  )
  walked = hlo_cost.program_cost(compiled.as_text())
  # To a few scalar bytes (XLA's accounting of some scalar ops differs); one missed pass over
  # the smallest leaf here is 256 bytes, 2.6e-4 of the figure.
  assert walked.bytes == pytest.approx(_xla_bytes(compiled), rel=1e-4)
  assert walked.steady_bytes <= walked.bytes


def test_a_conditional_counts_its_cheapest_branch_when_steady():
  def program(flag, x):
    return jax.lax.cond(flag, lambda: jnp.sort(x) * 2, lambda: x)

  x = jax.ShapeDtypeStruct((4096,), jnp.float32)
  text = jax.jit(program).lower(jax.ShapeDtypeStruct((), bool), x).compile().as_text()
  cost = hlo_cost.program_cost(text)
  # The sort and the multiply: at least two passes that only the dearest walk counts.
  assert cost.bytes - cost.steady_bytes >= 2 * 4096 * 4


def test_shape_bytes_reads_arrays_and_tuples():
  assert hlo_cost.shape_bytes("f32[3,4]{1,0}") == 48
  assert hlo_cost.shape_bytes("(pred[10]{0}, s32[], bf16[2,2]{1,0})") == 10 + 4 + 8
  assert hlo_cost.shape_bytes("token[]") == 0


def test_the_command_prints_the_table_and_refuses_an_unknown_chain(capsys):
  assert link_cost.main(["--models", "lenet300", "--chains", "dense,hand_mask"]) == 0
  out = capsys.readouterr().out
  assert "| lenet300 | hand_mask" in out and "+1.0" in out
  with pytest.raises(SystemExit) as stopped:
    link_cost.main(["--chains", "dense,nonesuch"])
  assert stopped.value.code == 2
  assert "nonesuch" in capsys.readouterr().err


def test_a_weight_kernel_is_one_that_writes_a_buffer_per_weight():
  params = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}
  dense = link_cost.measure_chain("dense", params)
  hand = link_cost.measure_chain("hand_mask_flips", params)
  assert hand.weight_kernels - dense.weight_kernels == 1  # the flip count's pass
  assert np.isfinite(hand.steady_bytes_per_weight)
