"""Which leaves of a params tree are prunable (the ``where`` argument)."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_floating(leaf) -> bool:
  dtype = getattr(leaf, "dtype", None)
  dtype = np.result_type(leaf) if dtype is None else dtype
  return bool(jnp.issubdtype(dtype, jnp.floating))


def _default_where(path, leaf) -> bool:
  """Kernels: floating leaves with 2+ dimensions (integer tables are never pruned)."""
  del path
  return np.ndim(leaf) >= 2 and _is_floating(leaf)


def check_where(where) -> None:
  """Validates ``where`` when a transform is built (before params exist)."""
  if where is None or callable(where):
    return
  leaves = jax.tree.leaves(where)
  if not leaves or not all(isinstance(x, (bool, np.bool_)) for x in leaves):
    raise TypeError(
        "where must be None (floating leaves with 2+ dimensions), a predicate "
        "(path, leaf) -> bool, or a pytree of Python bools shaped like params; "
        f"got {type(where).__name__}"
    )


def describe_leaves(params) -> str:
  """One ``path shape`` entry per leaf, for error messages."""
  return ", ".join(
      f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))}"
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  )


def prunable_tree(params, where) -> Any:
  """A tree shaped like ``params`` with a Python bool per leaf.

  Raises:
    ValueError: ``where`` does not match ``params`` or selects no leaf.
  """
  if where is None or callable(where):
    predicate = where or _default_where
    selected = jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(predicate(path, leaf)), params
    )
  else:
    # jax's stubs name jaxlib's PyTreeDef, which mypy cannot resolve: hence the ignore.
    if jax.tree.structure(where) != jax.tree.structure(params):  # type: ignore[operator]
      raise ValueError(
          "where: the pytree of bools must have the structure of params; "
          f"params leaves are: {describe_leaves(params)}"
      )
    selected = jax.tree.map(bool, where)
  if not any(jax.tree.leaves(selected)):
    raise ValueError(
        "where selects no prunable leaf; by default floating leaves with 2 or more "
        f"dimensions are prunable. Leaves of params: {describe_leaves(params)}"
    )
  return selected


def check_floating(params, masks) -> None:
  """Refuses a non-floating leaf where ``masks`` is not None.

  Sign flips, saliency and the exact zero of a pruned weight need floating
  weights; an integer leaf would also get float updates back.

  Raises:
    TypeError: naming the first such leaf and its dtype.
  """

  def check(path, mask, leaf):
    if mask is not None and not _is_floating(leaf):
      raise TypeError(
          f"flipout: the prunable leaf {jax.tree_util.keystr(path)} has dtype "
          f"{np.result_type(getattr(leaf, 'dtype', leaf))}, but only floating leaves can be "
          "pruned; leave it out of `where` (or of the masks). By default only floating "
          "leaves with 2+ dimensions are prunable."
      )

  jax.tree_util.tree_map_with_path(check, masks, params, is_leaf=lambda x: x is None)


def prunable_only(tree, prunable):
  """``tree`` with ``None`` at leaves that are not prunable."""
  return jax.tree.map(lambda leaf, keep: leaf if keep else None, tree, prunable)


def _is_none(x) -> bool:
  return x is None


def leaves_at(masks, tree) -> list:
  """Leaves of ``tree`` at the masks' non-None positions, in leaf order."""
  return jax.tree.leaves(
      jax.tree.map(lambda m, leaf: None if m is None else leaf, masks, tree, is_leaf=_is_none)
  )


def replace_at(tree, masks, new_leaves):
  """``tree`` with the leaves at the masks' non-None positions replaced."""
  replacements = iter(new_leaves)
  return jax.tree.map(
      lambda m, leaf: leaf if m is None else next(replacements), masks, tree, is_leaf=_is_none
  )
