"""What a user installs: the wheel ships the library alone, and its declared dependencies are
exactly the third-party packages the library imports."""

import ast
import configparser
import sys
from pathlib import Path

import setuptools

_ROOT = Path(__file__).resolve().parent.parent


def _setup_cfg() -> configparser.ConfigParser:
  parser = configparser.ConfigParser()
  parser.read(_ROOT / "setup.cfg")
  return parser


def _lines(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines() if line.strip()]


def test_the_wheel_ships_flipout_jax_alone():
  include = _lines(_setup_cfg()["options.packages.find"]["include"])
  packages = setuptools.find_packages(where=str(_ROOT), include=include)
  assert "flipout_jax" in packages
  # experiments/ and benchmarks/ would collide with a user's own top-level packages.
  assert all(name.split(".")[0] == "flipout_jax" for name in packages), packages


def _imported_top_level(folder: Path) -> set[str]:
  names = set()
  for path in folder.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names.update(alias.name.split(".")[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names.add(node.module.split(".")[0])
  return names


def test_declared_dependencies_are_the_imported_ones():
  requirements = _lines(_setup_cfg()["options"]["install_requires"])
  declared = {requirement.split(">")[0].split("=")[0].split("<")[0] for requirement in requirements}
  third_party = _imported_top_level(_ROOT / "flipout_jax") - set(sys.stdlib_module_names)
  third_party.discard("flipout_jax")
  assert declared == third_party, (declared, third_party)
