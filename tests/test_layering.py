"""The library's layering, read from its imports (``ast``, nothing imported).

* No import cycle among the library's modules (imports under ``TYPE_CHECKING`` run only in
  the type checker and are left out).
* No module of ``flipout_jax._src`` imports the public ``flipout_jax`` package above it.
* Compaction is a package with one interface: the rest of the library imports
  ``flipout_jax._src.compact`` itself, never one of its modules; the package imports from
  pruning only the modules it names in its README (``prune``, ``update_check``).
"""

import ast
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_LIBRARY = _ROOT / "flipout_jax"
_COMPACT = "flipout_jax._src.compact"
_COMPACT_MAY_IMPORT = {"flipout_jax._src.prune", "flipout_jax._src.update_check"}


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(_ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
  path = _ROOT.joinpath(*name.split("."))
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _type_checking_lines(tree: ast.AST) -> set[int]:
  lines = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
      for child in node.body:
        lines.update(range(child.lineno, child.end_lineno + 1))
  return lines


def imports_of(path: Path) -> set[str]:
  """The library modules (or packages) that ``path`` imports at run time."""
  tree = ast.parse(path.read_text())
  skipped = _type_checking_lines(tree)
  found = set()
  for node in ast.walk(tree):
    if getattr(node, "lineno", None) in skipped:
      continue
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name.startswith("flipout_jax"))
    elif (
        isinstance(node, ast.ImportFrom)
        and node.level == 0
        and node.module.startswith("flipout_jax")
    ):
      for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        found.add(submodule if _is_module(submodule) else node.module)
  return found


def graph() -> dict[str, set[str]]:
  return {_module_name(path): imports_of(path) for path in _LIBRARY.rglob("*.py")}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for child in sorted(edges.get(node, ())):
      if state.get(child) == 1:
        return path[path.index(child) :] + [child]
      if child not in state and (found := visit(child)):
        return found
    state[node] = 2
    path.pop()
    return None

  for node in sorted(edges):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_library_has_no_import_cycle():
  assert _cycle(graph()) is None, _cycle(graph())


def test_the_cycle_check_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_module_imports_the_public_package():
  for module, imported in graph().items():
    if module.startswith("flipout_jax._src"):
      assert "flipout_jax" not in imported, module


def test_compaction_is_reached_only_through_its_package():
  for module, imported in graph().items():
    inside = module == _COMPACT or module.startswith(_COMPACT + ".")
    for name in imported:
      if inside and not name.startswith(_COMPACT):
        assert name in _COMPACT_MAY_IMPORT, f"{module} imports {name}"
      if not inside and name.startswith(_COMPACT + "."):
        assert False, f"{module} imports {name}: import {_COMPACT} instead"


def test_the_imports_are_read_as_modules():
  imported = imports_of(_LIBRARY / "_src" / "unit_groups.py")
  assert _COMPACT in imported and "flipout_jax._src.layout" in imported


def test_every_library_module_is_under_500_lines():
  # One concern per module: a module past 500 lines is two (experiments/ and benchmarks/
  # still hold a few; issue 36 regroups them).
  long = {
      str(path.relative_to(_ROOT)): n
      for path in _LIBRARY.rglob("*.py")
      if (n := len(path.read_text().splitlines())) > 500
  }
  assert not long, long


def test_every_library_function_is_at_most_80_lines():
  # Docstring included: a function that needs more is two (the long account goes in a
  # module docstring or a README).
  long = []
  for path in _LIBRARY.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 80:
          long.append(f"{path.relative_to(_ROOT)}:{node.lineno} {node.name} ({length})")
  assert not long, long
