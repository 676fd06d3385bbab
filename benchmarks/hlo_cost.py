"""Memory traffic, kernels and copies of a compiled XLA program, read from its optimized HLO.

XLA's own ``compiled.cost_analysis()`` counts a ``conditional`` at its most expensive branch,
so in a training step with ``prune`` last it counts the pruning event, which runs at a few
steps of a run, as if it ran at every one. This module walks the optimized HLO text with the
same rules (a fusion reads each operand once, or only what a slice of it takes, and
writes its outputs; a ``while`` counts its body once) and reports the step as it runs between
events, each conditional at its cheapest branch, beside XLA's figure:

* ``steady_bytes``: bytes accessed with every conditional at its cheapest branch;
* ``bytes``: bytes accessed with every conditional at its dearest branch (what
  ``cost_analysis`` reports; the tests check that the two walks agree on programs without
  conditionals);
* ``kernels``: top-level instructions of the entry computation that run a kernel (everything
  but parameters, constants, tuples, ``get-tuple-element`` and bitcasts);
* ``kernel_outputs``: the byte size of each of those kernels' results, in program order (so
  that a caller can tell the kernels that write a buffer per weight from scalar ones);
* ``copies``: the ``copy`` instructions of the entry computation, with their byte sizes.

Deterministic for one jax version: the figures may be asserted as ceilings in tests.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_ITEMSIZE = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_POINTER_BYTES = 8
_FREE = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all"})
# Instructions of a fused computation that read only part of an operand, when they read a fused
# parameter directly (as XLA's HloCostAnalysis: a slice of a bitcast of it reads it all).
_PARTIAL_READS = frozenset({"slice", "dynamic-slice"})


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: an array (``f32[3,4]{1,0}``) or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _ITEMSIZE:
      continue
    size = 1
    for dim in filter(None, dims.split(",")):
      size *= int(dim)
    total += size * _ITEMSIZE[dtype]
  return total


class Instruction(NamedTuple):
  """One HLO instruction: its name, result shape, opcode, operand names and attributes."""

  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attributes: str
  arguments: str = ""


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at ``text[start]``."""
  depth = 0
  for index in range(start, len(text)):
    if text[index] == "(":
      depth += 1
    elif text[index] == ")":
      depth -= 1
      if depth == 0:
        return index
  raise ValueError(f"unbalanced parentheses in HLO line: {text[:120]}")


def _parse_instruction(line: str) -> Instruction | None:
  match = re.match(r"\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*", line)
  if not match:
    return None
  rest = line[match.end() :]
  if rest.startswith("("):
    end = _closing(rest, 0)
    shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  opcode_match = re.match(r"([\w\-]+)\(", rest)
  if not opcode_match:
    return None
  open_at = opcode_match.end() - 1
  close_at = _closing(rest, open_at)
  operands = tuple(re.findall(r"%([^\s,()]+)", rest[open_at:close_at]))
  arguments = rest[open_at + 1 : close_at]
  return Instruction(
      match.group(1), shape, opcode_match.group(1), operands, rest[close_at + 1 :], arguments
  )


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """The computations of an HLO module's text by name, and the entry computation's name."""
  computations: dict[str, list[Instruction]] = {}
  entry = ""
  current: list[Instruction] | None = None
  for line in text.splitlines():
    header = re.match(r"(ENTRY\s+)?%([^\s(]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = computations.setdefault(header.group(2), [])
      if header.group(1):
        entry = header.group(2)
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      instruction = _parse_instruction(line)
      if instruction is not None:
        current.append(instruction)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _called(attributes: str, key: str) -> list[str]:
  """The computations an attribute names: ``calls=%f`` or ``branch_computations={%a, %b}``."""
  match = re.search(key + r"=(\{[^}]*\}|%?[\w.\-]+)", attributes)
  return re.findall(r"%?([\w.\-]+)", match.group(1)) if match else []


class _Walk:
  """Bytes accessed by computations of one module, conditionals at their min or max branch."""

  def __init__(self, computations: dict[str, list[Instruction]], pick):
    self.computations = computations
    self.pick = pick
    self.shapes = {
        instruction.name: instruction.shape
        for body in computations.values()
        for instruction in body
    }

  def computation(self, name: str) -> int:
    return sum(self.instruction(instruction) for instruction in self.computations[name])

  def _fusion_reads(self, instruction: Instruction) -> int:
    fused = self.computations[_called(instruction.attributes, "calls")[0]]
    number = {inner.name: int(inner.arguments) for inner in fused if inner.opcode == "parameter"}
    reads = 0
    for parameter, index in number.items():
      full = shape_bytes(self.shapes.get(instruction.operands[index], ""))
      users = [inner for inner in fused if parameter in inner.operands]
      if users and all(user.opcode in _PARTIAL_READS for user in users):
        reads += min(full, sum(shape_bytes(user.shape) for user in users))
      else:
        reads += full
    return reads

  def instruction(self, instruction: Instruction) -> int:
    opcode = instruction.opcode
    if opcode == "tuple":
      # XLA counts a tuple's index table, a pointer per element (not a pass over data).
      return _POINTER_BYTES * len(instruction.operands)
    if opcode in _FREE:
      return 0
    if opcode == "fusion":
      return self._fusion_reads(instruction) + shape_bytes(instruction.shape)
    if opcode == "conditional":
      branches = _called(instruction.attributes, "branch_computations") or (
          _called(instruction.attributes, "true_computation")
          + _called(instruction.attributes, "false_computation")
      )
      return self.pick(self.computation(branch) for branch in branches)
    if opcode == "while":
      return self.computation(_called(instruction.attributes, "body")[0]) + self.computation(
          _called(instruction.attributes, "condition")[0]
      )
    if opcode == "call":
      return self.computation(_called(instruction.attributes, "to_apply")[0])
    operands = sum(shape_bytes(self.shapes.get(name, "")) for name in instruction.operands)
    return operands + shape_bytes(instruction.shape)


class ProgramCost(NamedTuple):
  """What :func:`program_cost` reads off one compiled program."""

  bytes: int
  steady_bytes: int
  kernels: int
  kernel_outputs: tuple[int, ...]
  copies: tuple[int, ...]


def program_cost(hlo_text: str) -> ProgramCost:
  """Bytes accessed (dearest and cheapest conditional branches), kernels and copies of the
  entry computation of an optimized HLO module's text (``compiled.as_text()``)."""
  computations, entry = parse_module(hlo_text)
  body = computations[entry]
  kernels = [instruction for instruction in body if instruction.opcode not in _FREE]
  return ProgramCost(
      bytes=_Walk(computations, max).computation(entry),
      steady_bytes=_Walk(computations, min).computation(entry),
      kernels=len(kernels),
      kernel_outputs=tuple(shape_bytes(instruction.shape) for instruction in kernels),
      copies=tuple(shape_bytes(i.shape) for i in body if i.opcode == "copy"),
  )
