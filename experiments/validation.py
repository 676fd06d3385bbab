"""The one integer check every experiments module uses for its arguments."""

from __future__ import annotations

import numpy as np


def is_int(value) -> bool:
  """Whether ``value`` is a Python or NumPy integer (``bool`` is not)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: int, error: type[Exception] = ValueError) -> None:
  """Raises ``error`` naming ``name`` unless ``value`` is an integer ``>= minimum``."""
  if not is_int(value) or value < minimum:
    raise error(f"{name} must be an integer >= {minimum}, got {value!r}")
