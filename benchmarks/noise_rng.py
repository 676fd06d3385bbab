r"""Cost of the paper's gradient noise: JAX's random bit generators side by side.

``python -m benchmarks.noise_rng`` times, in one process with interleaved repetitions (see
``benchmarks/_common.py``), one float32 standard normal per prunable weight of LeNet-300-100
(266,610 draws, the per-step draw of ``gradient_noise``) with each generator JAX offers
(``jax.random.key(seed, impl=...)``: threefry2x32 with partitionable counters, JAX's default,
and without them; threefry4x32, philox2x32, philox4x32, rbg, unsafe_rbg), and the same
threefry2x32 stream computed by ``gradient_noise`` itself (the 20 rounds unrolled, bit for bit
``jax.random.normal``). Two more rows split that draw's cost: its random bits alone (no normal
transform) and its normal transform alone (``sqrt(2) erf_inv(u)`` of bits that cost nothing to
make: a counter times an odd constant), each with one float32 add per entry so that XLA
computes every entry. The unit is a dense LeNet-300-100 training step at batch 128 timed
beside them: the issue's goal is the whole noise at most 0.5 of that step (``flipout`` at
most 1.5x ``dense``), measured end to end by ``benchmarks.step_overhead``.

A second table times whole training steps beside the same dense step: ``prune`` (no noise),
``flipout`` (the paper's noise), and two ablations of ``flipout`` that show where the noise's
cost lies inside the fused step: its threefry bits used as uniform noise (``sqrt(2) u``, no
normal transform), and its normal transform of bits that cost nothing to make (the counter plus
the step's key, times an odd constant; no threefry). The ablations swap ``gradient_noise``'s
private bit or transform function while their step is compiled; they are measurements, not
noise anyone should train with.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Callable, Sequence
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from experiments import cli
from flipout_jax._src import noise

CASE = _common.CPU_CASES[0]  # lenet300 b128
IMPLS = ("threefry2x32", "threefry4x32", "philox2x32", "philox4x32", "rbg", "unsafe_rbg")
NON_PARTITIONABLE = "threefry2x32 (not partitionable)"
OURS = "threefry2x32 unrolled (gradient_noise)"
BITS_ONLY = "  its bits only (no normal transform)"
TRANSFORM_ONLY = "  its normal transform only (erf_inv)"
_GOLDEN = 0x9E3779B1  # odd: multiplying the counters by it spreads them over 32 bits
# Rows of the in-step table: whole training steps, over a dense step.
PRUNE_STEP = "prune (no noise)"
FLIPOUT_STEP = "flipout (the paper's noise)"
UNIFORM_STEP = "flipout, threefry bits as uniform noise (no normal transform)"
HASHED_STEP = "flipout, normal transform of hashed counters (no threefry)"
IN_STEP = (PRUNE_STEP, FLIPOUT_STEP, UNIFORM_STEP, HASHED_STEP)


def _draw(impl: str, size: int) -> Callable[[jax.Array], jax.Array]:
  def key(count):
    return jax.random.fold_in(jax.random.key(0, impl=impl), count)

  if impl == NON_PARTITIONABLE:

    def draw(count):
      with jax.threefry_partitionable(False):
        return jax.random.normal(_tf_key(count), (size,), jnp.float32)

    return jax.jit(draw)
  if impl == OURS:
    return jax.jit(lambda count: noise._stream_normals(_tf_key(count), 0, size))
  if impl == BITS_ONLY:
    return jax.jit(
        lambda count: jax.lax.bitcast_convert_type(
            noise._stream_bits(_tf_key(count), 0, size) >> 9 | 0x3F800000, jnp.float32
        )
        + 1.0
    )
  if impl == TRANSFORM_ONLY:

    def transform(count):
      bits = (jax.lax.iota(jnp.uint32, size) + count.astype(jnp.uint32)) * jnp.uint32(_GOLDEN)
      return noise._normal_from_bits(bits) + 1.0

    return jax.jit(transform)
  return jax.jit(lambda count: jax.random.normal(key(count), (size,), jnp.float32))


def _tf_key(count):
  return jax.random.fold_in(jax.random.key(0, impl="threefry2x32"), count)


def _uniform_noise(bits: jax.Array) -> jax.Array:
  return np.float32(np.sqrt(2)) * noise._uniform_from_bits(bits)


def _hashed_bits(key: jax.Array, start: int, size: int) -> jax.Array:
  # The step's key keeps XLA from folding the draw into a constant.
  counters = jax.lax.iota(jnp.uint32, size) + np.uint32(start) + jax.random.key_data(key)[0]
  return counters * np.uint32(_GOLDEN)


# The in-step rows that swap a private function of gradient_noise: its name, its stand-in.
_ABLATIONS = {
    UNIFORM_STEP: ("_normal_from_bits", _uniform_noise),
    HASHED_STEP: ("_stream_bits", _hashed_bits),
}


def _ablated_noise(name: str) -> contextlib.AbstractContextManager:
  """``gradient_noise`` with its normal transform or its threefry bits swapped, for ``name``
  (unchanged for a row that is not an ablation)."""
  if name not in _ABLATIONS:
    return contextlib.nullcontext()
  return mock.patch.object(noise, *_ABLATIONS[name])


def _step_runner(case: _common.Case, model: _common.PureModel, name: str) -> _common.StepRunner:
  """A training step of row ``name`` of the in-step table; an ablation is compiled here."""
  variant = _common.PRUNE if name == PRUNE_STEP else _common.FLIPOUT
  runner = _common.StepRunner(case, variant, model=model)
  if name in _ABLATIONS:
    # A jitted step of its own: the ablation is traced into this one compilation only.
    runner.step = _common.make_train_step(model.graphdef, runner.tx)
    with _ablated_noise(name):
      runner(1)
  return runner


def _runner(draw: Callable[[jax.Array], jax.Array]) -> Callable[[int], None]:
  def run(calls: int) -> None:
    out = None
    for count in range(calls):
      out = draw(jnp.int32(count))
    jax.block_until_ready(out)

  return run


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: times every generator against the dense step, prints the table."""
  prog = "python -m benchmarks.noise_rng"
  parser = cli.OneLineParser(prog=prog, description=__doc__.splitlines()[0])
  _common.add_timing_arguments(parser, repetitions=15, window_s=0.3)
  args = parser.parse_args(argv)
  case = _common.TINY_CASES[0] if args.tiny else CASE
  repetitions, window_s = _common.timing_budget(args)
  model = _common.init_model(case)
  size = sum(leaf.size for leaf in jax.tree.leaves(model.params) if leaf.ndim >= 2)
  names = (OURS, BITS_ONLY, TRANSFORM_ONLY, *IMPLS, NON_PARTITIONABLE)
  runners = {"dense step": _common.StepRunner(case, _common.DENSE, model=model)}
  runners.update({name: _runner(_draw(name, size)) for name in names})
  runners.update({name: _step_runner(case, model, name) for name in IN_STEP})
  info = _common.machine_info()
  print(
      f"noise generators on {_common.describe_machine(info)}; {size:,} float32 normals per "
      f"call, unit: one dense {case.label} step; median of {repetitions} interleaved "
      "repetitions [25th-75th percentile]" + (" [TINY: not a result]" if args.tiny else ""),
      flush=True,
  )
  timings = _common.interleaved_timings(runners, repetitions=repetitions, window_s=window_s)
  seconds = timings.seconds

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
      for name in names
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
          [
              [name, f"{1e3 * statistics.median(seconds[name]):.3f}", _ratio(name)]
              for name in IN_STEP
          ],
      )
  )
  if args.json:
    _common.write_json(
        args.json,
        {"benchmark": "noise_rng", "machine": info, "tiny": args.tiny, "samples": seconds},
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
