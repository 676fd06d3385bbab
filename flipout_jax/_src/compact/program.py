"""A traced function as one flat program: the form that compaction reads and rewrites.

``jax.make_jaxpr`` gives a jaxpr whose equations may hold nested jaxprs (``jit``, custom
derivatives, ``closed_call``, ``checkpoint``). Compaction follows feature axes across all of
them, so it inlines every call into one flat list of equations over integer value ids, as in
JAX's guide "Writing custom Jaxpr interpreters". Custom derivative rules are dropped on the
way: the compact program differentiates through their primal computation (for ``jax.nn.relu``
that is ``max(x, 0)``, whose derivative at exactly 0 is 0.5 instead of 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias

import jax
import numpy as np
import numpy.typing as npt
from jax.extend import core as jex_core

# Call-like primitives whose body is inlined, and the parameter holding that body.
_CALL_BODIES = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
}


class Literal(NamedTuple):
  """A constant operand written into an equation (a scalar in practice)."""

  value: Any


Atom: TypeAlias = int | Literal  # an operand: a value id, or a literal
Values: TypeAlias = Sequence[npt.ArrayLike | None]  # concrete values by id (None: not computed)


class Aval(Protocol):
  """What compaction reads of an abstract value (``jax.core.ShapedArray``)."""

  @property
  def shape(self) -> tuple[int, ...]:
    ...


def value_id(atom: Atom) -> int:
  """``atom`` as a value id. For operands that cannot be literals: a literal is a scalar, and
  only values with axes are asked for here (an operand's axes, a linear op's operands)."""
  if isinstance(atom, Literal):
    raise TypeError(f"expected a value id, got the literal {atom.value!r}")
  return atom


def concrete(values: Values, atom: Atom) -> np.ndarray:
  """The concrete value of ``atom``: its literal, or the value ``values`` holds for it."""
  value = atom.value if isinstance(atom, Literal) else values[atom]
  if value is None:
    raise ValueError(f"value {atom} was not evaluated")
  return np.asarray(value)


class Eqn(NamedTuple):
  """One primitive application: operands are value ids or literals; outputs are value ids."""

  primitive: jex_core.Primitive
  inputs: tuple[Atom, ...]
  outputs: tuple[int, ...]
  params: dict[str, Any]


class Program(NamedTuple):
  """A flat program over value ids ``0 .. len(avals) - 1``.

  Attributes:
    eqns: the equations in execution order.
    avals: each value's abstract value (shape and dtype).
    inputs: the ids of the program's inputs (the flattened ``(params, *args)``).
    outputs: the ids (or literals) of its flattened outputs.
    consts: values captured by the traced function (a closure's arrays), by id.
    out_tree: the tree structure of the traced function's output.
  """

  eqns: tuple[Eqn, ...]
  avals: tuple[Any, ...]
  inputs: tuple[int, ...]
  outputs: tuple[Atom, ...]
  consts: dict[int, Any]
  out_tree: Any


def _body(eqn: jex_core.JaxprEqn) -> jex_core.ClosedJaxpr | None:
  key = _CALL_BODIES.get(eqn.primitive.name)
  body = eqn.params.get(key) if key else None
  if isinstance(body, jex_core.Jaxpr):
    return jex_core.ClosedJaxpr(body, ())
  return body


def trace(fn: Callable[..., Any], *args: Any) -> Program:
  """Traces ``fn(*args)`` and inlines every nested call into one flat program."""
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  avals: list[Any] = []
  eqns: list[Eqn] = []
  consts: dict[int, Any] = {}

  def new_value(aval: Any) -> int:
    avals.append(aval)
    return len(avals) - 1

  def inline(
      jaxpr: jex_core.Jaxpr, const_values: Sequence[Any], operands: Sequence[Atom]
  ) -> list[Atom]:
    env: dict[jex_core.Var, Atom] = {}
    for var, value in zip(jaxpr.constvars, const_values):
      index = new_value(var.aval)
      env[var], consts[index] = index, value
    env.update(zip(jaxpr.invars, operands))

    def read(atom: jex_core.Var | jex_core.Literal) -> Atom:
      return Literal(atom.val) if isinstance(atom, jex_core.Literal) else env[atom]

    for eqn in jaxpr.eqns:
      operands_here = [read(atom) for atom in eqn.invars]
      body = _body(eqn)
      if body is not None:
        env.update(zip(eqn.outvars, inline(body.jaxpr, body.consts, operands_here)))
        continue
      outputs = tuple(new_value(var.aval) for var in eqn.outvars)
      env.update(zip(eqn.outvars, outputs))
      eqns.append(Eqn(eqn.primitive, tuple(operands_here), outputs, dict(eqn.params)))
    return [read(atom) for atom in jaxpr.outvars]

  inputs = tuple(new_value(var.aval) for var in closed.jaxpr.invars)
  outputs = inline(closed.jaxpr, closed.consts, inputs)
  out_tree = jax.tree.structure(out_shape)
  return Program(tuple(eqns), tuple(avals), inputs, tuple(outputs), consts, out_tree)


def evaluate(program: Program, inputs: Sequence[Any]) -> list[Any]:
  """Every value of ``program`` run on ``inputs`` (``evaluate_compiled`` compiles it)."""
  values: list[Any] = [None] * len(program.avals)
  for index, value in zip(program.inputs, inputs):
    values[index] = value
  for index, value in program.consts.items():
    values[index] = value
  for eqn in program.eqns:
    operands = [x.value if isinstance(x, Literal) else values[x] for x in eqn.inputs]
    outs = eqn.primitive.bind(*operands, **eqn.params)
    for index, value in zip(eqn.outputs, outs if eqn.primitive.multiple_results else [outs]):
      values[index] = value
  return values


# Compiling a whole model with XLA's backend optimisations (LLVM's, on CPU) takes seconds
# (7 of a DenseNet121's 10) to save milliseconds of a run that happens once, so the analysis
# compiles its evaluation without them: values within float32 rounding of an optimised
# compile's (3.6e-7 apart on a DenseNet121), whose zeros are the same. Measured on jax
# 0.10.2's CPU backend only, so only there are they turned off.
_CPU_ANALYSIS_OPTIONS: dict[str, str | bool] = {"xla_backend_optimization_level": "0"}


def _compile(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
  cpu = jax.default_backend() == "cpu"
  return lowered.compile(compiler_options=_CPU_ANALYSIS_OPTIONS if cpu else None)


def evaluate_compiled(
    program: Program, inputs: Sequence[Any], wanted: Iterable[int]
) -> list[np.ndarray | None]:
  """The values ``wanted`` of ``program`` run on concrete ``inputs``, as NumPy arrays.

  One compiled run that returns only ``wanted`` (fewer outputs leave XLA less to compile);
  inputs and captured constants among them are read directly. Other entries are None.
  """
  values: list[np.ndarray | None] = [None] * len(program.avals)
  given = dict(zip(program.inputs, inputs)) | program.consts
  computed = sorted(set(wanted) - given.keys())
  for index in set(wanted) & given.keys():
    values[index] = np.asarray(given[index])
  if computed:

    def run(inputs: list[Any]) -> list[Any]:
      every = evaluate(program, inputs)
      return [every[index] for index in computed]

    compiled = _compile(jax.jit(run).lower(list(inputs)))
    for index, value in zip(computed, compiled(list(inputs))):
      values[index] = np.asarray(value)
  return values


def same_structure(first: Program, second: Program) -> bool:
  """Whether two traces are the same program up to the sizes of their values."""
  if len(first.eqns) != len(second.eqns) or len(first.avals) != len(second.avals):
    return False
  if first.inputs != second.inputs or first.outputs != second.outputs:
    return False
  ranks = lambda program: [len(aval.shape) for aval in program.avals]
  if ranks(first) != ranks(second):
    return False

  def same(x: Atom, y: Atom) -> bool:
    if isinstance(x, Literal) and isinstance(y, Literal):
      return bool(np.array_equal(x.value, y.value))
    return x == y

  return all(
      a.primitive is b.primitive
      and a.outputs == b.outputs
      and len(a.inputs) == len(b.inputs)
      and all(same(x, y) for x, y in zip(a.inputs, b.inputs))
      for a, b in zip(first.eqns, second.eqns)
  )
