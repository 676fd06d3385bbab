r"""Where the cost of ``gradient_noise``'s draw lies: ablations of its private functions.

``python -m tests.noise_ablation`` prints ``benchmarks.noise_rng``'s two tables (through
:func:`benchmarks.noise_rng.run`, the same timing method) with the rows that need the library's
private functions, so they live here with the tests rather than in ``benchmarks/``, which uses
the public API only:

* the threefry2x32 stream computed by ``gradient_noise`` itself (the 20 rounds unrolled, bit for
  bit ``jax.random.normal``), and two rows that split its cost: its random bits alone (no
  normal transform) and its normal transform alone (``sqrt(2) erf_inv(u)`` of bits that cost
  nothing to make: a counter times an odd constant), each with one float32 add per entry so
  that XLA computes every entry; JAX's default ``threefry2x32`` draw as the unit of the last
  column;
* training steps of ``flipout`` beside two ablations that show where the noise's cost lies
  inside the fused step: its threefry bits used as uniform noise (``sqrt(2) u``, no normal
  transform), and its normal transform of bits that cost nothing to make (the counter plus
  the step's key, times an odd constant; no threefry). The ablations swap ``gradient_noise``'s
  private bit or transform function while their step is compiled; they are measurements, not
  noise anyone should train with.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common, noise_rng
from flipout_jax._src import noise

OURS = "threefry2x32 unrolled (gradient_noise)"
BITS_ONLY = "  its bits only (no normal transform)"
TRANSFORM_ONLY = "  its normal transform only (erf_inv)"
DRAWS = (OURS, BITS_ONLY, TRANSFORM_ONLY, "threefry2x32")
_GOLDEN = 0x9E3779B1  # odd: multiplying the counters by it spreads them over 32 bits
UNIFORM_STEP = "flipout, threefry bits as uniform noise (no normal transform)"
HASHED_STEP = "flipout, normal transform of hashed counters (no threefry)"
IN_STEP = (noise_rng.FLIPOUT_STEP, UNIFORM_STEP, HASHED_STEP)


def _draws(size: int) -> dict[str, noise_rng.Draw]:
  key = noise_rng.threefry_key

  def bits_only(count):
    bits = noise._stream_bits(key(count), 0, size)
    return jax.lax.bitcast_convert_type(bits >> 9 | 0x3F800000, jnp.float32) + 1.0

  def transform_only(count):
    bits = (jax.lax.iota(jnp.uint32, size) + count.astype(jnp.uint32)) * jnp.uint32(_GOLDEN)
    return noise._normal_from_bits(bits) + 1.0

  return {
      OURS: jax.jit(lambda count: noise._stream_normals(key(count), 0, size)),
      BITS_ONLY: jax.jit(bits_only),
      TRANSFORM_ONLY: jax.jit(transform_only),
      "threefry2x32": noise_rng.generator_draws(size)["threefry2x32"],
  }


def _uniform_noise(bits: jax.Array) -> jax.Array:
  return np.float32(np.sqrt(2)) * noise._uniform_from_bits(bits)


def _hashed_bits(k0: jax.Array, k1: jax.Array, start: int, size: int) -> jax.Array:
  # The step's key word keeps XLA from folding the draw into a constant.
  del k1
  counters = jax.lax.iota(jnp.uint32, size) + np.uint32(start) + k0
  return counters * np.uint32(_GOLDEN)


# The in-step rows that swap a private function of gradient_noise: its name, its stand-in.
_ABLATIONS = {
    UNIFORM_STEP: ("_normal_from_bits", _uniform_noise),
    HASHED_STEP: ("_stream_bits_of_words", _hashed_bits),
}


def ablated_noise(name: str) -> contextlib.AbstractContextManager:
  """``gradient_noise`` with its normal transform or its threefry bits swapped, for ``name``
  (unchanged for a row that is not an ablation)."""
  if name not in _ABLATIONS:
    return contextlib.nullcontext()
  return mock.patch.object(noise, *_ABLATIONS[name])


def _steps(case: _common.Case, model: _common.PureModel) -> dict[str, _common.StepRunner]:
  runners = {noise_rng.FLIPOUT_STEP: _common.StepRunner(case, _common.FLIPOUT, model=model)}
  for name in _ABLATIONS:
    runner = _common.StepRunner(case, _common.FLIPOUT, model=model)
    # A jitted step of its own: the ablation is traced into this one compilation only.
    runner.step = _common.make_train_step(model.graphdef, runner.tx)
    with ablated_noise(name):
      runner(1)
    runners[name] = runner
  return runners


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: times the ablations against the dense step, prints the tables."""
  return noise_rng.run(
      argv,
      "python -m tests.noise_ablation",
      __doc__.splitlines()[0],
      _draws,
      _steps,
      "noise_ablation",
  )


if __name__ == "__main__":
  sys.exit(main())
