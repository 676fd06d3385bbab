r"""The FlipOut paper's gradient noise, as an Optax transformation."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flipout_jax._src import prunable as prunable_lib


class GradientNoiseState(NamedTuple):
  """State of :func:`gradient_noise`: the number of updates so far."""

  count: jax.Array


def gradient_noise(
    scale: float = 1.0, seed: int = 0, where=None, *, prunable=None
) -> optax.GradientTransformation:
  r"""Adds Gaussian noise scaled to each leaf's gradient norm over live weights.

  For every selected leaf with ``n`` entries,

  .. math::
    g \leftarrow g + \mathcal{N}(0, \sigma^2), \qquad
    \sigma = \mathrm{scale} \cdot \lVert g \odot \mathrm{live} \rVert_2 / \sqrt{n},

  where ``live`` is 1 for live weights and 0 for pruned ones (all ones for
  leaves that are not prunable). Put it first in the chain, on the loss
  gradient. Pruned weights are the exact zeros of prunable leaves (``prune``
  keeps them so); a live weight that is exactly 0.0 is counted as pruned
  here, which only changes sigma when a weight sits exactly on zero.

  Args:
    scale: the paper's lambda, ``>= 0``.
    seed: base seed; step ``t`` draws one normal vector for all selected
      leaves from ``fold_in(key(seed), t)`` and splits it in leaf order.
    where: leaves that get noise: ``None`` (all leaves), a pytree of bools or
      a predicate ``(path, leaf) -> bool``.
    prunable: leaves whose zeros are pruned weights; the same convention as
      ``prune``'s ``where`` (default: leaves with 2+ dimensions).

  Returns:
    A ``GradientTransformation`` needing ``params`` in ``update``.
  """
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)):
    raise TypeError(f"scale must be a number >= 0, got {type(scale).__name__}")
  if not scale >= 0:
    raise ValueError(f"scale must be >= 0, got {scale}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {type(seed).__name__}")
  prunable_lib.check_where(where)
  prunable_lib.check_where(prunable)
  noisy_where = where if where is not None else (lambda path, leaf: True)

  def init_fn(params):
    prunable_lib.prunable_tree(params, noisy_where)
    return GradientNoiseState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "params: gradient_noise needs the current params to "
          "know which weights are pruned; call tx.update(g, state, params)"
      )
    noisy = jax.tree.leaves(prunable_lib.prunable_tree(params, noisy_where))
    pruning = jax.tree.leaves(prunable_lib.prunable_tree(params, prunable))
    grads, treedef = jax.tree.flatten(updates)
    # One draw for all leaves, split afterwards: a draw per leaf compiles a
    # separate random-number kernel for each (seconds per leaf on CPU).
    sizes = [g.size if add_noise else 0 for g, add_noise in zip(grads, noisy)]
    normals = jax.random.normal(
        jax.random.fold_in(jax.random.key(seed), state.count), (sum(sizes),), jnp.float32
    )
    offsets = np.cumsum([0] + sizes)
    new = []
    for g, w, add_noise, can_be_pruned, start in zip(
        grads, treedef.flatten_up_to(params), noisy, pruning, offsets
    ):
      if not add_noise:
        new.append(g)
        continue
      live_grad = jnp.where(w != 0, g, 0) if can_be_pruned else g
      sigma = scale * jnp.linalg.norm(live_grad.ravel().astype(jnp.float32)) / np.sqrt(g.size)
      noise = normals[start : start + g.size].reshape(g.shape)
      new.append((g + sigma * noise).astype(g.dtype))
    return treedef.unflatten(new), GradientNoiseState(count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)
