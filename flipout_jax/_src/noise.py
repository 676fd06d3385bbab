r"""The FlipOut paper's gradient noise, as an Optax transformation.

The draw is ``jax.random.normal(key_t, (N,), float32)`` with JAX's default generator
(threefry2x32, partitionable counters), bit for bit, but computed here leaf by leaf with
the 20 rounds unrolled, where the noise is added: JAX's own CPU lowering loops over the
rounds and writes every word out 5 times, and the concatenated draw was written out too.
That is the fastest of JAX's generators on CPU with no change of stream (``rbg`` and
``unsafe_rbg`` are 2.6-9x slower there; ``python -m benchmarks.noise_rng``, BENCHMARKS.md
section 1). Other key implementations (``jax_default_prng_impl``) or
``jax_threefry_partitionable=False`` draw with ``jax.random.normal`` itself.
"""

from collections.abc import Callable
from typing import Any, NamedTuple
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax._src import prunable as prunable_lib

# The noise draws from a stream of its own, ``fold_in(fold_in(key(seed), tag), step)``:
# the trainer's augmentation keys ``fold_in(key(seed), step)`` and the random
# criterion's stream (another tag) never coincide with it for the same seed.
NOISE_STREAM_TAG = zlib.crc32(b"flipout_jax/gradient_noise") & 0x7FFFFFFF


class GradientNoiseState(NamedTuple):
  """State of :func:`gradient_noise`: the number of updates so far."""

  count: jax.Array  # type: ignore[assignment]  # the Optax name, shadowing tuple.count


def _gets_noise(grad) -> bool:
  """Only floating-point gradients get noise.

  ``jax.grad(..., allow_int=True)`` gives ``float0`` gradients for integer
  params (no operation accepts them) and an integer update has no Gaussian
  perturbation; both pass through unchanged.
  """
  dtype = jnp.result_type(grad)
  return dtype != jax.dtypes.float0 and jnp.issubdtype(dtype, jnp.inexact)


def _compute_dtype(dtype) -> np.dtype:
  """float32, or the gradient's dtype where that is wider (float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def _base_key(seed: int) -> jax.Array:
  """``fold_in(key(seed), NOISE_STREAM_TAG)``: it depends on the seed alone, so it is computed
  while tracing and is a constant of the program."""
  with jax.ensure_compile_time_eval():
    return jax.random.fold_in(jax.random.key(seed), NOISE_STREAM_TAG)


def _noise_key(seed: int, count: jax.Array) -> jax.Array:
  return jax.random.fold_in(_base_key(seed), count)


def _noise_key_words(seed: int, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two words of ``_noise_key(seed, count)`` for JAX's threefry keys: ``fold_in`` hashes
  the counter pair ``(0, count)`` (an int32 seeds the high word with 0) under the base key,
  here with the rounds unrolled: JAX's own lowering loops over them and its loop carries copies
  of the key words each step."""
  with jax.ensure_compile_time_eval():
    words = np.asarray(jax.random.key_data(_base_key(seed)))
  b0, b1 = (np.uint32(word) for word in words)
  return _threefry2x32(b0, b1, jnp.uint32(0), jnp.asarray(count).astype(jnp.uint32))


# Threefry-2x32 (Salmon et al. 2011, 20 rounds), as JAX defines it.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)
_MAX_DRAW = 2**32  # counters' high word is 0 below this
_THREEFRY = "threefry2x32"


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry2x32(k0, k1, x0, x1) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block function, unrolled.

  The same arithmetic as JAX's ``threefry2x32`` primitive. On CPU JAX lowers
  that primitive as a loop over its five 4-round blocks, which writes both
  words of every element out to memory after each block; unrolled, the 20
  rounds are a few hundred fused integer operations per element and XLA fuses
  them (and the normal transform) into the loop that adds the noise.
  """
  keys = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
  x0, x1 = x0 + keys[0], x1 + keys[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = x0 ^ _rotate_left(x1, r)
    x0 = x0 + keys[(block + 1) % 3]
    x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _stream_normals(key: jax.Array, start: int, size: int) -> jax.Array:
  r"""Entries ``start .. start + size`` of ``jax.random.normal(key, (n,), float32)``.

  Bit for bit, for a threefry key under ``jax_threefry_partitionable`` (JAX's
  default) and ``start + size <= 2**32``: entry ``j`` hashes the counter pair
  ``(0, j)``, takes the xor of the two output words as its 32 random bits,
  maps their top 23 bits to a uniform ``u`` in ``(-1, 1)`` and returns
  :math:`\sqrt{2}\,\mathrm{erf}^{-1}(u)`, as ``jax.random.normal`` does. Each
  leaf draws its own slice of the one stream where it is used, so no normal
  is ever written out per weight.
  """
  return _normal_from_bits(_stream_bits(key, start, size))


def _stream_bits(key: jax.Array, start: int, size: int) -> jax.Array:
  """The 32 random bits of entries ``start .. start + size`` (see :func:`_stream_normals`)."""
  words = jax.random.key_data(key)
  return _stream_bits_of_words(words[0], words[1], start, size)


def _stream_bits_of_words(k0, k1, start: int, size: int) -> jax.Array:
  """:func:`_stream_bits` of the key whose two words are ``k0, k1``."""
  counters = jax.lax.iota(jnp.uint32, size) + np.uint32(start)
  y0, y1 = _threefry2x32(k0, k1, jnp.zeros_like(counters), counters)
  return y0 ^ y1


def _normal_from_bits(bits: jax.Array) -> jax.Array:
  """``jax.random.normal``'s transform: sqrt(2) erfinv(u) of :func:`_uniform_from_bits`."""
  return np.float32(np.sqrt(2)) * jax.lax.erf_inv(_uniform_from_bits(bits))


def _uniform_from_bits(bits: jax.Array) -> jax.Array:
  """``jax.random.normal``'s uniform: the top 23 bits to ``u`` in (-1, 1)."""
  mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)  # in [1, 2)
  unit = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1)
  low = np.nextafter(np.float32(-1), np.float32(0))
  return jnp.maximum(low, unit * (np.float32(1) - low) + low)


def _draw(seed: int, count: jax.Array, total: int) -> Callable[[int, int], jax.Array]:
  """``draw(start, size)``: entries ``start .. start + size`` of step ``count``'s standard
  normal draw of ``total`` entries (see :func:`gradient_noise`, "Randomness")."""
  if (
      total > _MAX_DRAW
      or str(jax.random.key_impl(_base_key(seed))) != _THREEFRY
      or not getattr(jax.config, "jax_threefry_partitionable")
  ):
    # Anything but JAX's default threefry: its own draw, split.
    normals = jax.random.normal(_noise_key(seed, count), (total,), jnp.float32)
    return lambda start, size: normals[start : start + size]
  words = _noise_key_words(seed, count)
  return lambda start, size: _normal_from_bits(_stream_bits_of_words(*words, int(start), int(size)))


def _with_noise(g, w, can_be_pruned: bool, scale: float, draw, start: int) -> jax.Array:
  """``g`` plus its noise: ``sigma`` from the live entries' norm, the draw from ``start``."""
  # Widen before squaring: a float16 sum of squares overflows at 65504.
  wide = jnp.asarray(g).astype(_compute_dtype(jnp.result_type(g)))
  live_grad = jnp.where(w != 0, wide, 0) if can_be_pruned else wide
  sigma = scale * jnp.linalg.norm(live_grad.ravel()) / np.sqrt(max(wide.size, 1))
  noise = draw(start, wide.size).reshape(wide.shape).astype(wide.dtype)
  return (wide + sigma * noise).astype(jnp.result_type(g))


def _check_arguments(scale, seed, where, prunable) -> None:
  """Refuses :func:`gradient_noise`'s arguments out of range, naming each."""
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)):
    raise TypeError(f"scale must be a number >= 0, got {type(scale).__name__}")
  if not scale >= 0:
    raise ValueError(f"scale must be >= 0, got {scale}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {type(seed).__name__}")
  prunable_lib.check_where(where)
  prunable_lib.check_where(prunable)


def gradient_noise(
    scale: float = 1.0, seed: int = 0, where: Any = None, *, prunable: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Adds Gaussian noise scaled to each leaf's gradient norm over live weights.

  For every selected leaf with ``n`` entries,

  .. math::
    g \leftarrow g + \mathcal{N}(0, \sigma^2), \qquad
    \sigma = \mathrm{scale} \cdot \lVert g \odot \mathrm{live} \rVert_2 / \sqrt{n},

  where ``live`` is 0 at pruned weights, the exact zeros of prunable leaves (a
  live weight at exactly 0.0 counts as pruned), 1 elsewhere; see
  ``docs/algorithm.md``. Put it first in the chain, on the loss gradient.

  Only floating-point gradients get noise (``float0`` and integer ones pass
  through). ``sigma`` and ``g + noise`` are computed in float32 (float64 for
  float64 gradients) and cast back, so a float16 leaf whose sum of squares
  exceeds 65504 still gets finite noise of the right size.

  Randomness: the update with ``count == t`` in the state draws one float32
  standard normal vector for all selected leaves, split in leaf order, from
  the noise's own stream::

    key_t = fold_in(fold_in(key(seed), NOISE_STREAM_TAG), t)
    NOISE_STREAM_TAG = zlib.crc32(b"flipout_jax/gradient_noise") & 0x7FFFFFFF

  so it never reuses the keys ``fold_in(key(seed), t)`` of data augmentation
  or the random criterion's stream (another tag) for the same seed. The key
  is a pure function of ``(seed, count)``: a run resumed from a checkpointed
  state draws the same noise as one that never stopped.

  The draw is ``jax.random.normal(key_t, (N,), float32)`` with JAX's default
  generator, bit for bit (computed leaf by leaf where the noise is added: see
  this module's docstring).

  Args:
    scale: the paper's lambda, ``>= 0``.
    seed: base seed of the noise stream (an int).
    where: leaves that get noise: ``None`` (all leaves), a pytree of bools or
      a predicate ``(path, leaf) -> bool``.
    prunable: leaves whose zeros are pruned weights; the same convention as
      ``prune``'s ``where`` (default: leaves with 2+ dimensions).

  Returns:
    A ``GradientTransformationExtraArgs`` needing ``params`` in ``update`` (other
    keyword arguments of ``update``, e.g. a loss ``value``, are ignored).
  """
  _check_arguments(scale, seed, where, prunable)
  noisy_where = where if where is not None else (lambda path, leaf: True)

  def init_fn(params):
    prunable_lib.prunable_tree(params, noisy_where)
    return GradientNoiseState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # e.g. a loss `value` for other links of the chain
    if params is None:
      raise ValueError(
          "params: gradient_noise needs the current params to "
          "know which weights are pruned; call tx.update(g, state, params)"
      )
    noisy = jax.tree.leaves(prunable_lib.prunable_tree(params, noisy_where))
    pruning = jax.tree.leaves(prunable_lib.prunable_tree(params, prunable))
    grads, treedef = jax.tree.flatten(updates)
    noisy = [add_noise and _gets_noise(g) for g, add_noise in zip(grads, noisy)]
    # One stream for all leaves: leaf i gets its entries offsets[i] onwards.
    sizes = [np.size(g) if add_noise else 0 for g, add_noise in zip(grads, noisy)]
    offsets = np.cumsum([0] + sizes)
    draw = _draw(seed, state.count, int(offsets[-1]))
    new = [
        _with_noise(g, w, can_be_pruned, scale, draw, start) if add_noise else g
        for g, w, add_noise, can_be_pruned, start in zip(
            grads, treedef.flatten_up_to(params), noisy, pruning, offsets
        )
    ]
    return treedef.unflatten(new), GradientNoiseState(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
