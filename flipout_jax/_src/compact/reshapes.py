"""Which axes of a reshape's operand become which axes of its result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

ReshapeGroups: TypeAlias = list[tuple[tuple[int, ...], tuple[int, ...]]]


def reshape_groups(source: Sequence[int], target: Sequence[int]) -> ReshapeGroups | None:
  """Pairs (source axes, target axes) whose sizes multiply to the same number, matched from
  the last axis (equal sizes pair first, so a bias ``(n,)`` reshaped to ``(1, n)`` keeps its
  axis); size-1 axes left unpaired are in no group. None when some size is 0."""
  if 0 in source or 0 in target:
    return None
  groups: ReshapeGroups = []
  a, b = len(source) - 1, len(target) - 1
  while a >= 0 and b >= 0:
    if source[a] == target[b]:
      groups.append(((a,), (b,)))
      a, b = a - 1, b - 1
    elif source[a] == 1:
      a -= 1
    elif target[b] == 1:
      b -= 1
    else:
      group_in, group_out = [a], [b]
      left, right = source[a], target[b]
      a, b = a - 1, b - 1
      while left != right:
        if left < right:
          group_in.append(a)
          left, a = left * source[a], a - 1
        else:
          group_out.append(b)
          right, b = right * target[b], b - 1
      groups.append((tuple(reversed(group_in)), tuple(reversed(group_out))))
  return groups
