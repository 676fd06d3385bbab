r"""Cost of the paper's gradient noise: JAX's random bit generators side by side.

``python -m benchmarks.noise_rng`` times, in one process with interleaved repetitions (see
``benchmarks/_common.py``), one float32 standard normal per prunable weight of LeNet-300-100
(266,610 draws, the per-step draw of ``gradient_noise``) with each generator JAX offers
(``jax.random.key(seed, impl=...)``: threefry2x32 with partitionable counters, JAX's default,
and without them; threefry4x32, philox2x32, philox4x32, rbg, unsafe_rbg). The unit is a dense LeNet-300-100 training step at batch 128 timed
beside them: the issue's goal is the whole noise at most 0.5 of that step (``flipout`` at
most 1.5x ``dense``), measured end to end by ``benchmarks.step_overhead``.

A second table times whole training steps beside the same dense step: ``prune`` (no noise) and
``flipout`` (the paper's noise).

Everything here goes through public APIs. The ablations that split ``gradient_noise``'s own draw
(its unrolled threefry stream, its bits alone, its normal transform alone, and steps with either
swapped out) replace private functions of the library, so they live with the tests:
``python -m tests.noise_ablation`` prints the same tables with those rows, through :func:`run`.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from benchmarks import _common
from experiments import cli

CASE = _common.CPU_CASES[0]  # lenet300 b128
IMPLS = ("threefry2x32", "threefry4x32", "philox2x32", "philox4x32", "rbg", "unsafe_rbg")
NON_PARTITIONABLE = "threefry2x32 (not partitionable)"
# Rows of the in-step table: whole training steps, over a dense step.
PRUNE_STEP = "prune (no noise)"
FLIPOUT_STEP = "flipout (the paper's noise)"
IN_STEP = (PRUNE_STEP, FLIPOUT_STEP)

Draw = Callable[[jax.Array], jax.Array]
StepRows = Callable[[_common.Case, _common.PureModel], dict[str, Callable[[int], None]]]


def threefry_key(count: jax.Array) -> jax.Array:
  """The key of draw ``count``: JAX's default generator, as ``gradient_noise`` uses it."""
  return jax.random.fold_in(jax.random.key(0, impl="threefry2x32"), count)


def _draw(impl: str, size: int) -> Draw:
  if impl == NON_PARTITIONABLE:

    def draw(count):
      with jax.threefry_partitionable(False):
        return jax.random.normal(threefry_key(count), (size,), jnp.float32)

    return jax.jit(draw)
  key = lambda count: jax.random.fold_in(jax.random.key(0, impl=impl), count)
  return jax.jit(lambda count: jax.random.normal(key(count), (size,), jnp.float32))


def generator_draws(size: int) -> dict[str, Draw]:
  """One jitted draw of ``size`` float32 normals per generator JAX offers."""
  return {name: _draw(name, size) for name in (*IMPLS, NON_PARTITIONABLE)}


def training_steps(case: _common.Case, model: _common.PureModel) -> dict[str, _common.StepRunner]:
  """The in-step rows: a step of ``prune`` and of ``flipout`` (the paper's noise)."""
  return {
      PRUNE_STEP: _common.StepRunner(case, _common.PRUNE, model=model),
      FLIPOUT_STEP: _common.StepRunner(case, _common.FLIPOUT, model=model),
  }


def _runner(draw: Draw) -> Callable[[int], None]:
  def run(calls: int) -> None:
    out = None
    for count in range(calls):
      out = draw(jnp.int32(count))
    jax.block_until_ready(out)

  return run


def run(
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    draws: Callable[[int], dict[str, Draw]],
    steps: StepRows,
    benchmark: str,
) -> int:
  """Times ``draws(size)`` and ``steps(case, model)`` against a dense step, prints two tables.

  Args:
    argv: the command line (None: ``sys.argv``).
    prog, description: the command's name and one-line help.
    draws: the rows of the generator table, from the number of prunable weights; it must
      hold a ``"threefry2x32"`` row (the last column's unit).
    steps: the rows of the training-step table.
    benchmark: the name written in the ``--json`` file.
  """
  parser = cli.OneLineParser(prog=prog, description=description)
  _common.add_timing_arguments(parser, repetitions=15, window_s=0.3)
  args = parser.parse_args(argv)
  case = _common.TINY_CASES[0] if args.tiny else CASE
  repetitions, window_s = _common.timing_budget(args)
  model = _common.init_model(case)
  size = sum(leaf.size for leaf in jax.tree.leaves(model.params) if leaf.ndim >= 2)
  draw_rows = draws(size)
  step_rows = steps(case, model)
  runners = {"dense step": _common.StepRunner(case, _common.DENSE, model=model)}
  runners.update({name: _runner(draw) for name, draw in draw_rows.items()})
  runners.update(step_rows)
  info = _common.machine_info()
  print(
      f"noise generators on {_common.describe_machine(info)}; {size:,} float32 normals per "
      f"call, unit: one dense {case.label} step; median of {repetitions} interleaved "
      "repetitions [25th-75th percentile]" + (" [TINY: not a result]" if args.tiny else ""),
      flush=True,
  )
  seconds = _common.interleaved_timings(runners, repetitions=repetitions, window_s=window_s).seconds
  _print_tables(seconds, case, list(draw_rows), list(step_rows))
  if args.json:
    _common.write_json(
        args.json,
        {"benchmark": benchmark, "machine": info, "tiny": args.tiny, "samples": seconds},
    )
  return 0


def _print_tables(
    seconds: dict[str, list[float]], case: _common.Case, draws: list[str], steps: list[str]
) -> None:
  def _ratio(name: str) -> str:
    low, high = _common.ratio_spread(seconds[name], seconds["dense step"])
    median = _common.median_ratio(seconds[name], seconds["dense step"])
    return f"{median:.3f} [{low:.3f}-{high:.3f}]"

  rows = [
      [
          name,
          f"{1e3 * statistics.median(seconds[name]):.3f}",
          _ratio(name),
          f"{_common.median_ratio(seconds[name], seconds['threefry2x32']):.2f}",
      ]
      for name in draws
  ]
  print(
      f"dense {case.label} step: {1e3 * statistics.median(seconds['dense step']):.2f} ms (median)"
  )
  print(
      cli.format_table(
          ["generator", "ms per draw", "draw / dense step", "draw / threefry2x32"], rows
      )
  )
  print(
      cli.format_table(
          ["training step", "ms per step", "step / dense step"],
          [[name, f"{1e3 * statistics.median(seconds[name]):.3f}", _ratio(name)] for name in steps],
      )
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: times every generator against the dense step, prints the table."""
  return run(
      argv,
      "python -m benchmarks.noise_rng",
      __doc__.splitlines()[0],
      generator_draws,
      training_steps,
      "noise_rng",
  )


if __name__ == "__main__":
  sys.exit(main())
