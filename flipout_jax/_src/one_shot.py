r"""One-shot pruning of a trained model: Wanda and magnitude, per output unit.

Wanda (Sun et al., 2023) scores each weight :math:`S_{ij} = |W_{ij}| \, \lVert X_j \rVert_2`,
its magnitude times the norm of the input feature it multiplies over calibration data
(:func:`flipout_jax.activation_norms`), and prunes, in every output unit separately, the
lowest-scored share of its incoming weights (or, with an N:M structure, the lowest ``M - N``
of every run of ``M`` along the input axis). Without norms it is magnitude pruning per output.
Train on (or fine-tune) with ``flipout.fixed_masks(masks)`` last in the chain.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flipout_jax._src import layout as layout_lib
from flipout_jax._src import prunable as prunable_lib
from flipout_jax._src import schedule as schedule_lib
from flipout_jax._src import structure as structure_lib


def _lowest_per_unit(scores: jax.Array, output_axis: int, count: int) -> jax.Array:
  """The live mask with the ``count`` lowest scores of every output unit pruned (ties by
  position: a stable sort)."""
  moved = jnp.moveaxis(scores, output_axis, -1)
  matrix = moved.reshape(-1, moved.shape[-1])
  rank = jnp.argsort(jnp.argsort(matrix, axis=0, stable=True), axis=0, stable=True)
  keep = (rank >= count).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, output_axis)


def wanda(
    params: Any,
    norms: Any,
    target_sparsity: float | None = None,
    *,
    structure: Any = "weight",
    where: Any = None,
    kernel_layout: layout_lib.KernelLayout = "in_out",
) -> Any:
  r"""Wanda's masks: per output unit, the weights of lowest :math:`|W_{ij}| \lVert X_j \rVert`.

  Example::

    norms = flipout.activation_norms(apply_fn, params, calibration_batch)
    masks = flipout.wanda(params, norms, 0.5)                 # or structure="2:4"
    tx = optax.chain(optax.adam(1e-4), flipout.fixed_masks(masks))  # fine-tune, masks fixed

  Args:
    params: a trained model's params.
    norms: :func:`activation_norms` of the model on calibration data (a tree shaped like
      params, arrays that broadcast against their kernels), or None: magnitude per output.
    target_sparsity: the share of each output unit's incoming weights pruned,
      ``round(target_sparsity * fan_in)`` of them, in ``[0, 1)``; for N:M, None or ``1 - N/M``.
    structure: ``"weight"``, or ``"N:M"`` such as ``"2:4"`` / :func:`n_of_m`: in every run of
      ``M`` weights along the input axis, the ``M - N`` lowest-scored go.
    where: prunable leaves, as in :func:`prune`.
    kernel_layout: which axes of a kernel hold its output and input units, as in
      :func:`units`.

  Returns:
    Masks shaped like params: bool arrays (True = live) at prunable leaves, ``None``
    elsewhere, for :func:`fixed_masks`. Pure JAX: ``jax.jit`` compiles it (``norms`` and
    ``params`` traced, the rest static).

  Raises:
    ValueError: a fraction out of range, a structure other than weights or N:M, a
      prunable leaf without norms, or an input width that is not a multiple of M.
  """
  spec = structure_lib.parse(structure)
  if spec.kind == "unit":
    raise ValueError("structure: wanda prunes weights or N:M, not units; got units(...)")
  if spec.kind == "n:m":
    target_sparsity = structure_lib.check_n_of_m_target(spec, target_sparsity)
  elif target_sparsity is None:
    raise ValueError("target_sparsity: give the share of weights to prune, in [0, 1)")
  fraction = schedule_lib.check_fraction("target_sparsity", target_sparsity, low_open=False)
  prunable_lib.check_where(where)
  layout_lib.check_argument(kernel_layout)
  prunable = prunable_lib.prunable_tree(params, where)

  def mask(path, leaf, is_prunable, norm):
    if not is_prunable:
      return None
    name = jax.tree_util.keystr(path)
    if np.ndim(leaf) < 2:
      raise ValueError(f"wanda prunes kernels of 2+ dimensions; leave {name} out of `where`")
    scores = jnp.abs(leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32)))
    if norms is not None:
      if norm is None:
        raise ValueError(
            f"norms has no activation norms for {name}: no matrix product or ungrouped "
            "convolution of apply_fn multiplies it; leave it out of `where`"
        )
      scores = scores * norm
    output_axis, input_axis = layout_lib.unit_axes(kernel_layout, path, leaf)
    if spec.kind == "n:m":
      if np.shape(leaf)[input_axis] % spec.m:
        raise ValueError(
            f"structure '{spec.n}:{spec.m}': the input axis of {name}, shape "
            f"{np.shape(leaf)}, is not a multiple of M={spec.m}"
        )
      live = jnp.ones(np.shape(leaf), bool)
      return structure_lib.keep_n_of_m(scores, live, input_axis, spec.m, spec.m - spec.n)
    fan_in = np.size(leaf) // np.shape(leaf)[output_axis]
    return _lowest_per_unit(scores, output_axis, round(fraction * fan_in))

  norm_tree = norms if norms is not None else jax.tree.map(lambda _: None, params)
  return jax.tree_util.tree_map_with_path(
      mask, params, prunable, norm_tree, is_leaf=lambda x: x is None
  )
