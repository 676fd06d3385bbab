"""Sparsity reports of (pruned) params."""

import dataclasses

import jax
import numpy as np

from flipout_jax._src import prunable as prunable_lib


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """Sparsity of one prunable leaf.

  ``dead_outputs`` counts output units (last axis, e.g. conv filters or dense
  columns) with no live incoming weight, ``dead_inputs`` input units (second
  to last axis) with no live outgoing weight: the layer collapse that drives
  SNIP and random pruning to chance accuracy at extreme sparsity.
  """

  path: str
  shape: tuple[int, ...]
  size: int
  live: int
  sparsity: float
  dead_outputs: int
  outputs: int
  dead_inputs: int
  inputs: int


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer and total sparsity; ``str(summary)`` is a printable table."""

  layers: tuple[LayerReport, ...]
  size: int
  live: int

  @property
  def sparsity(self) -> float:
    return 1.0 - self.live / self.size

  def to_dict(self) -> dict:
    """JSON-friendly form."""
    return {
        "size": self.size,
        "live": self.live,
        "sparsity": self.sparsity,
        "layers": [dataclasses.asdict(layer) for layer in self.layers],
    }

  def __str__(self) -> str:
    header = (
        f"{'layer':<40} {'shape':<20} {'live':>10} {'sparsity':>9} {'dead out':>12} {'dead in':>12}"
    )
    lines = [header, "-" * len(header)]
    for layer in self.layers:
      lines.append(
          f"{layer.path:<40} {str(layer.shape):<20} {layer.live:>10} "
          f"{layer.sparsity:>9.4%} {f'{layer.dead_outputs}/{layer.outputs}':>12} "
          f"{f'{layer.dead_inputs}/{layer.inputs}':>12}"
      )
    lines.append(f"{'total':<40} {'':<20} {self.live:>10} {self.sparsity:>9.4%}")
    return "\n".join(lines)


def _layer_report(path, leaf) -> LayerReport:
  weights = np.asarray(leaf)
  live = weights != 0
  if weights.ndim >= 2:
    alive_outputs = live.reshape(-1, weights.shape[-1]).any(axis=0)
    alive_inputs = np.moveaxis(live, -2, 0).reshape(weights.shape[-2], -1).any(axis=1)
  else:
    alive_outputs = alive_inputs = live.reshape(-1)
  return LayerReport(
      path=jax.tree_util.keystr(path),
      shape=tuple(weights.shape),
      size=int(weights.size),
      live=int(live.sum()),
      sparsity=float(1.0 - live.sum() / max(weights.size, 1)),
      dead_outputs=int((~alive_outputs).sum()),
      outputs=int(alive_outputs.size),
      dead_inputs=int((~alive_inputs).sum()),
      inputs=int(alive_inputs.size),
  )


def summary(params, where=None) -> Summary:
  """Per-layer shape, live weights, sparsity and dead units of prunable leaves.

  Pruned weights are the exact zeros of prunable leaves.

  Args:
    params: a params tree (arrays may be sharded; they are fetched to host).
    where: prunable leaves, as in :func:`prune` (default: 2+ dimensions).
  """
  prunable_lib.check_where(where)
  prunable = prunable_lib.prunable_tree(params, where)
  selected = prunable_lib.prunable_only(params, prunable)
  layers = tuple(
      _layer_report(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(selected)
  )
  return Summary(layers=layers, size=sum(l.size for l in layers), live=sum(l.live for l in layers))


def sparsity(params, where=None) -> float:
  """Fraction of prunable weights that are exactly zero."""
  return summary(params, where).sparsity
