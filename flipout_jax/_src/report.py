"""Sparsity reports of (pruned) params.

Pruned weights are the exact zeros of prunable leaves (see ``docs/algorithm.md``).
A weight that is NaN or infinite says nothing about whether it was pruned: a
misplaced ``prune`` stops the run by making every prunable weight NaN, and a
diverged run has them too. The reports count such weights apart and give a NaN
sparsity for them rather than calling the run dense (or sparse).
"""

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from flipout_jax._src import layout as layout_lib
from flipout_jax._src import prunable as prunable_lib


def _sparsity(size: int, live: int, non_finite: int) -> float:
  r"""Fraction of exact zeros, :math:`1 - \mathrm{live} / \mathrm{size}`.

  0.0 when there is no entry (nothing is pruned); NaN when an entry is not
  finite (unknown).
  """
  if non_finite:
    return math.nan
  if size == 0:
    return 0.0
  return 1.0 - live / size


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """Sparsity of one prunable leaf.

  ``live`` counts the finite nonzero weights, ``non_finite`` the NaN and
  infinite ones (live or pruned: unknown), the rest are exact zeros (pruned).
  ``sparsity`` is the fraction of exact zeros, 0.0 for a leaf with no entry
  and NaN when ``non_finite > 0``.

  ``dead_outputs`` counts output units (e.g. conv filters or dense columns)
  with no nonzero incoming weight, ``dead_inputs`` input units with no nonzero
  outgoing weight: the layer collapse that drives SNIP and random pruning to
  chance accuracy at extreme sparsity. ``str(summary)`` shows the units left
  of each kind against the layer's width (``live_outputs / outputs``). Which axes hold the units is
  :func:`summary`'s ``kernel_layout``: the last two axes (outputs last) for
  ``"in_out"``, the first two (outputs first) for ``"out_in"``. A NaN or
  infinite weight connects its units.
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
  non_finite: int = 0

  @property
  def live_outputs(self) -> int:
    """Output units left (the table's "units out": left / before pruning)."""
    return self.outputs - self.dead_outputs

  @property
  def live_inputs(self) -> int:
    """Input units left (the table's "units in": left / before pruning)."""
    return self.inputs - self.dead_inputs


_STOPPED = (
    "WARNING: {} prunable weights are NaN/inf: this run was stopped (flipout.prune was not "
    "last in optax.chain; flipout.masks(opt_state) says so) or it diverged. Which weights are "
    "pruned is unknown; sparsity is NaN."
)


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer and total sparsity; ``str(summary)`` is a printable table.

  ``live`` and ``non_finite`` are totals over the layers, as in
  :class:`LayerReport`. ``sparsity`` is ``1 - live / size``: 0.0 when there is
  no prunable entry, NaN when ``non_finite > 0`` (the table then starts with a
  warning).
  """

  layers: tuple[LayerReport, ...]
  size: int
  live: int
  non_finite: int = 0

  @property
  def sparsity(self) -> float:
    return _sparsity(self.size, self.live, self.non_finite)

  def to_dict(self) -> dict:
    """JSON-friendly form (``json.dumps`` writes a NaN sparsity as ``NaN``)."""
    return {
        "size": self.size,
        "live": self.live,
        "non_finite": self.non_finite,
        "sparsity": self.sparsity,
        "layers": [dataclasses.asdict(layer) for layer in self.layers],
    }

  def __str__(self) -> str:
    header = (
        f"{'layer':<40} {'shape':<20} {'live':>10} {'sparsity':>9} {'units out':>12} "
        f"{'units in':>12} {'NaN/inf':>9}"
    )
    lines = [header, "-" * len(header)]
    for layer in self.layers:
      lines.append(
          f"{layer.path:<40} {str(layer.shape):<20} {layer.live:>10} "
          f"{layer.sparsity:>9.4%} {f'{layer.live_outputs}/{layer.outputs}':>12} "
          f"{f'{layer.live_inputs}/{layer.inputs}':>12} {layer.non_finite:>9}"
      )
    lines.append(
        f"{'total':<40} {'':<20} {self.live:>10} {self.sparsity:>9.4%} {'':>12} {'':>12} "
        f"{self.non_finite:>9}"
    )
    if self.non_finite:
      # First and last, so that neither a head nor a tail of the log hides it.
      warning = _STOPPED.format(self.non_finite)
      lines = [warning, *lines, warning]
    return "\n".join(lines)


def _any_along(connected: np.ndarray, axis: int) -> np.ndarray:
  """Whether each index of ``axis`` has a connection; explicit sizes, so 0-size axes work."""
  moved = np.moveaxis(connected, axis, 0)
  return np.asarray(moved.reshape(moved.shape[0], math.prod(moved.shape[1:])).any(axis=1))


def _layer_report(path, leaf, layout: str) -> LayerReport:
  weights = np.asarray(leaf)
  finite = np.isfinite(weights)
  connected = weights != 0  # NaN != 0: a NaN weight still connects its units
  live = int((connected & finite).sum())
  non_finite = int(weights.size - finite.sum())
  if weights.ndim >= 2:
    output_axis, input_axis = layout_lib.KERNEL_LAYOUTS[layout]
    alive_outputs = _any_along(connected, output_axis)
    alive_inputs = _any_along(connected, input_axis)
  else:
    alive_outputs = alive_inputs = connected.reshape(-1)
  return LayerReport(
      path=jax.tree_util.keystr(path),
      shape=tuple(weights.shape),
      size=int(weights.size),
      live=live,
      sparsity=_sparsity(int(weights.size), live, non_finite),
      dead_outputs=int((~alive_outputs).sum()),
      outputs=int(alive_outputs.size),
      dead_inputs=int((~alive_inputs).sum()),
      inputs=int(alive_inputs.size),
      non_finite=non_finite,
  )


def summary(
    params: Any, where: Any = None, *, kernel_layout: layout_lib.KernelLayout = "in_out"
) -> Summary:
  """Per-layer shape, live weights, sparsity and dead units of prunable leaves.

  Pruned weights are the exact zeros of prunable leaves; NaN and infinite
  weights are counted apart (``non_finite``) and make the sparsity NaN, with
  a warning in ``str(summary)``: such params come from a stopped run (a
  misplaced ``prune``) or a diverged one. Leaves with a zero-size dimension
  are reported with size 0.

  Args:
    params: a params tree (arrays may be sharded; they are fetched to host).
    where: prunable leaves, as in :func:`prune` (default: 2+ dimensions).
    kernel_layout: which axes of a kernel hold its output and input units, for
      the dead-unit counts: ``"in_out"`` (Flax, Keras: outputs on the last
      axis, inputs on the second to last, e.g. ``(in, out)`` or HWIO convs),
      ``"out_in"`` (Equinox, PyTorch: outputs on axis 0, inputs on axis 1,
      e.g. ``(out, in)`` or OIHW convs), or a callable ``(path, leaf)``
      returning one of those for each prunable leaf.

  Returns:
    A :class:`Summary`; ``str()`` of it is a table.

  Raises:
    TypeError, ValueError: ``kernel_layout`` (or what its callable returns) is
      not one of the layouts.

  Example:
    >>> import jax.numpy as jnp
    >>> import flipout_jax as flipout
    >>> weight = jnp.array([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])  # (out=3, in=2)
    >>> layer = flipout.summary({"w": weight}, kernel_layout="out_in").layers[0]
    >>> layer.dead_outputs, layer.outputs, layer.dead_inputs, layer.inputs
    (1, 3, 0, 2)
  """
  prunable_lib.check_where(where)
  layout_lib.check_argument(kernel_layout)
  prunable = prunable_lib.prunable_tree(params, where)
  selected = prunable_lib.prunable_only(params, prunable)
  layers = tuple(
      _layer_report(path, leaf, layout_lib.layout_of(kernel_layout, path, leaf))
      for path, leaf in jax.tree_util.tree_leaves_with_path(selected)
  )
  return Summary(
      layers=layers,
      size=sum(layer.size for layer in layers),
      live=sum(layer.live for layer in layers),
      non_finite=sum(layer.non_finite for layer in layers),
  )


def sparsity(params: Any, where: Any = None) -> float:
  """Fraction of prunable weights that are exactly zero.

  0.0 when the prunable leaves have no entry. NaN (it does not raise) when a
  prunable weight is NaN or infinite: a stopped or diverged run's params do
  not say which weights are pruned, and a training loop that logs sparsity
  every epoch keeps running and logs ``NaN``. ``summary(params)`` says how
  many weights are not finite, and where.
  """
  return summary(params, where).sparsity
