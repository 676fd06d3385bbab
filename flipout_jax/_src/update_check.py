"""Whether params moved by exactly the update ``prune`` returned: ``prune`` is last.

``prune`` must be the last link of ``optax.chain`` (``docs/algorithm.md``). Placed before the
optimizer, it returns an update that the optimizer then scales, so the params of the next
call are not ``params + update``. Waiting for pruned weights to move finds that only after
the first pruning event, which can be hours into a run; this check finds it at the second
update.

Each update keeps a small sample of the prunable weights, a fixed number of evenly spaced
entries over all prunable leaves (about :data:`SAMPLE_SIZE`, at least one per leaf): the
params it saw, and those params plus the update it returned, computed as
``optax.apply_updates`` does (``p + u`` cast to ``p``'s dtype). The next update compares its
params with both: they must all equal the second (the update was applied) or all equal the
first (the update was skipped, as ``optax.apply_if_finite`` and ``optax.MultiSteps`` do, so
params did not move). Equal means equal bits, or within 2 units in the last place of
``|p| + |u|``: a compiler that fuses the optimizer's ``-lr * m`` and ``p + u`` into one fused
multiply-add (XLA on GPUs may) rounds once where the sample rounded twice, and a correct run
must not stop for that; a misplaced ``prune`` moves params by another update altogether.
Anything else stops the run the way a moved pruned weight does: NaN params, and reading the
state raises. No host callback, and a state of a few KiB.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Entries sampled over all prunable leaves, each sampled twice: 2 KiB for float32 params.
SAMPLE_SIZE = 256
# `PruneState.count` of a run this check stopped (-1 is a moved pruned weight, prune.py), and
# what reading such a state raises.
STOPPED_COUNT = -2
STOPPED_MESSAGE = (
    "flipout: the params of an update were not the previous params plus the update "
    "flipout.prune returned, so training was stopped (params are NaN). Put flipout.prune "
    "(or fixed_masks / prune_below) LAST in optax.chain, after the optimizer: "
    "optax.chain(optax.sgd(...), flipout.prune(...)), not optax.chain(flipout.prune(...), "
    "optax.sgd(...)); apply its updates with optax.apply_updates(params, updates) and do not "
    "change params between tx.update calls."
)


class UpdateSample(NamedTuple):
  """Part of :class:`~flipout_jax.PruneState`: a sample of the last update's params.

  Attributes:
    taken: bool scalar, False until an update has taken a sample (and after a resume from a
      checkpoint written without one): the next update then checks nothing.
    before: per prunable leaf, the sampled params the last update saw.
    after: the same entries of ``params + update`` for the update it returned, in the params'
      dtype, as ``optax.apply_updates`` computes them.
  """

  taken: jax.Array
  before: list[jax.Array]
  after: list[jax.Array]


def _stride(size: int, leaves: int) -> int:
  """Stride of the evenly spaced entries sampled in a leaf of ``size`` entries."""
  per_leaf = max(1, SAMPLE_SIZE // max(leaves, 1))
  return max(1, size // per_leaf)


def _sampled(leaf: jax.Array, leaves: int) -> jax.Array:
  """Every ``_stride``-th entry of ``leaf`` in row-major order, at most its share of the
  sample (the entries ``ravel(leaf)[::stride]`` gives, so samples in old checkpoints still
  match). A gather rather than a slice: XLA copies a cheap slice into each fusion that uses
  it, so the params were read again where :func:`read_first` could not order the reads; a
  gather is computed once."""
  leaf = jnp.asarray(leaf)
  per_leaf = max(1, SAMPLE_SIZE // max(leaves, 1))
  positions = np.arange(0, leaf.size, _stride(leaf.size, leaves))[:per_leaf]
  if leaf.ndim == 0:
    return jnp.ravel(leaf)[positions]
  return leaf[np.unravel_index(positions, leaf.shape)]


def empty(params_at_masks: list[Any]) -> UpdateSample:
  """The sample of a state that has seen no update: zeros, and ``taken`` False."""
  count = len(params_at_masks)
  zeros = [jnp.zeros_like(_sampled(jnp.asarray(p), count)) for p in params_at_masks]
  return UpdateSample(taken=jnp.zeros([], bool), before=zeros, after=list(zeros))


def take(
    params_at_masks: list[Any],
    masks: list[Any],
    updates_at_masks: list[Any],
    masked_update: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
) -> UpdateSample:
  """The sample of this update: its params and ``params + updates`` in the params' dtype.

  The update's sampled entries are computed from the sampled masks, params and incoming
  updates, not sampled from the update: so no fusion reads the params after
  :func:`read_first` (a sample of the update fused the update's ``-param`` term, a read of
  the params that nothing ordered before the step overwrites them in place, and XLA copied
  every param each step).

  Args:
    params_at_masks: this update's params at the prunable leaves.
    masks: the masks ``prune`` applies, per leaf.
    updates_at_masks: the updates ``prune`` receives, per leaf.
    masked_update: ``(mask, params, updates) -> update``, the elementwise function that
      ``prune``'s update is, so that on the sampled entries it gives the same entries.
  """
  count = len(params_at_masks)
  before = [_sampled(p, count) for p in params_at_masks]
  after = [
      (b + masked_update(_sampled(m, count), b, _sampled(u, count))).astype(b.dtype)
      for b, m, u in zip(before, masks, updates_at_masks)
  ]
  return UpdateSample(taken=jnp.ones([], bool), before=before, after=after)


def read_first(sample: UpdateSample) -> list[jax.Array]:
  """Per leaf, a bool scalar, always True but not provably so to XLA, read from every entry
  of the leaf's sample. ``prune``'s update of the leaf depends on it, which orders the
  sample's reads of the params before the training step overwrites them in place."""
  return [
      (jnp.bitwise_or.reduce(jnp.concatenate([_bits(b), _bits(a)])) | 1) != 0
      for b, a in zip(sample.before, sample.after)
  ]


def _bits(x: jax.Array) -> jax.Array:
  """``x``'s bits as unsigned integers: NaN equals NaN, and -0.0 differs from 0.0."""
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def moved_otherwise(sample: UpdateSample, params_at_masks: list[Any]) -> jax.Array:
  """Whether params are neither the last update's params nor those plus its update.

  Args:
    sample: the sample the last update took (``taken`` False: nothing to check).
    params_at_masks: this update's params at the prunable leaves.

  Returns:
    A bool scalar, True when ``prune`` was not last or params were changed between updates.
  """
  count = len(params_at_masks)
  now = [_sampled(p, count).astype(b.dtype) for p, b in zip(params_at_masks, sample.before)]
  applied = _all(_close(n, a, b) for n, a, b in zip(now, sample.after, sample.before))
  skipped = _all(_close(n, b, b) for n, b in zip(now, sample.before))
  return sample.taken & ~(applied | skipped)


def _all(checks) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(check) for check in checks]))


def _close(now: jax.Array, expected: jax.Array, before: jax.Array) -> jax.Array:
  """``now`` equals ``expected`` bit for bit, or within the rounding of one fused multiply-add
  of ``before + u`` (``u = expected - before``): 2 ulp of ``|before| + |u|``."""
  wide = jnp.promote_types(now.dtype, jnp.float32)
  now_w, expected_w, before_w = (x.astype(wide) for x in (now, expected, before))
  scale = jnp.abs(before_w) + jnp.abs(expected_w - before_w)
  tolerance = 2 * jnp.finfo(now.dtype).eps * scale
  return (_bits(now) == _bits(expected)) | (jnp.abs(now_w - expected_w) <= tolerance)


def sample_bytes(sample: UpdateSample) -> int:
  """Bytes the sample holds, for tests and docs."""
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(sample))
