"""Which axes of a kernel hold its output and input units (the ``kernel_layout`` argument)."""

from collections.abc import Callable
from typing import Any

import jax

# Axes of (output units, input units) in a kernel of each layout.
KERNEL_LAYOUTS = {"in_out": (-1, -2), "out_in": (0, 1)}
KernelLayout = str | Callable[[Any, Any], str]


def check_layout(kernel_layout: Any, where: str = "kernel_layout") -> None:
  """Refuses anything but a layout name (or, at build time, a callable returning one).

  Raises:
    ValueError: a string that names no layout.
    TypeError: neither a string nor a callable.
  """
  if isinstance(kernel_layout, str) and kernel_layout in KERNEL_LAYOUTS:
    return
  allowed = f"one of {tuple(KERNEL_LAYOUTS)}"
  if isinstance(kernel_layout, str):
    raise ValueError(f"{where} must be {allowed}, got {kernel_layout!r}")
  raise TypeError(
      f"{where} must be {allowed} or a callable (path, leaf) -> one of them, got "
      f"{type(kernel_layout).__name__}"
  )


def check_argument(kernel_layout: Any) -> None:
  """Validates a ``kernel_layout`` argument when a function or transform is built."""
  if not callable(kernel_layout):
    check_layout(kernel_layout)


def layout_of(kernel_layout: KernelLayout, path, leaf) -> str:
  """The layout name of one leaf: the argument itself, or what its callable returns."""
  if isinstance(kernel_layout, str):
    return kernel_layout
  layout = kernel_layout(path, leaf)
  check_layout(layout, f"kernel_layout({jax.tree_util.keystr(path)}, leaf)")
  return layout


def unit_axes(kernel_layout: KernelLayout, path, leaf) -> tuple[int, int]:
  """``(output axis, input axis)`` of one kernel, as non-negative axis numbers."""
  output_axis, input_axis = KERNEL_LAYOUTS[layout_of(kernel_layout, path, leaf)]
  ndim = len(leaf.shape)
  return output_axis % ndim, input_axis % ndim
