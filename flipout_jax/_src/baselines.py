"""The paper's one-shot baselines: SNIP masks and the Hoyer-Square regulariser."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flipout_jax._src import prunable as prunable_lib
from flipout_jax._src import prune as prune_lib
from flipout_jax._src import select


def snip(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    target_sparsity: float,
    where: Any = None,
) -> Any:
  r"""SNIP masks: keep the weights with the largest connection sensitivity.

  Scores each prunable weight by :math:`|\partial L / \partial w \cdot w|` on
  one batch at initialisation and prunes exactly
  ``round(target_sparsity * N)`` of the ``N`` prunable weights with the lowest
  scores, ranked globally (ties by leaf order, then index). Train on with
  :func:`fixed_masks`.

  Args:
    loss_fn: ``(params, batch) -> scalar loss``.
    params: the initial params.
    batch: one batch, passed to ``loss_fn``.
    target_sparsity: fraction pruned, in ``[0, 1)``.
    where: prunable leaves, as in :func:`prune`.

  Returns:
    Masks shaped like params: bool arrays (True = live) at prunable leaves,
    ``None`` elsewhere.
  """
  target_sparsity = prune_lib._check_fraction(  # pylint: disable=protected-access
      "target_sparsity", target_sparsity, low_open=False
  )
  prunable_lib.check_where(where)
  prunable = prunable_lib.prunable_tree(params, where)
  grads = jax.grad(loss_fn)(params, batch)
  sensitivity = prunable_lib.prunable_only(
      jax.tree.map(lambda g, w: jnp.abs(g * w), grads, params), prunable
  )
  leaves, treedef = jax.tree.flatten(sensitivity)
  keys = [select.sortable_keys(s, True) for s in leaves]
  num_prunable = sum(s.size for s in leaves)
  chosen = select.lowest_k(keys, round(target_sparsity * num_prunable))
  return jax.tree.unflatten(treedef, [~c for c in chosen])


def hoyer_square(params: Any, where: Any = None) -> jax.Array:
  r"""Hoyer-Square regulariser summed over prunable leaves.

  .. math:: H(W) = \sum_{\mathrm{leaves}} (\sum |w|)^2 / \sum w^2

  Add ``lambda_h * hoyer_square(params)`` to the loss; a leaf that is all
  zeros contributes 0. Then prune the small weights once with
  :func:`prune_below`.
  """
  prunable_lib.check_where(where)
  prunable = prunable_lib.prunable_only(params, prunable_lib.prunable_tree(params, where))

  def leaf_term(w):
    squares = jnp.sum(jnp.square(w))
    safe = jnp.where(squares > 0, squares, 1.0)
    return jnp.where(squares > 0, jnp.square(jnp.sum(jnp.abs(w))) / safe, 0.0)

  return sum(leaf_term(w) for w in jax.tree.leaves(prunable))
