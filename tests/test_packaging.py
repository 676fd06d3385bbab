"""What a user installs: the wheel ships the library alone, and its declared dependencies are
exactly the third-party packages the library imports."""

import ast
import configparser
import os
import re
import subprocess
import sys
import zipfile
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


# Import names of the distributions whose import name is another.
_IMPORT_NAMES = {"scikit-learn": "sklearn"}


def _extra(name: str) -> set[str]:
  """The import names an extra brings (the extras it names, recursively), and the library's."""
  found = set()
  for requirement in _lines(_setup_cfg()["options.extras_require"][name]):
    distribution = requirement.split(">")[0].split("=")[0].split("<")[0].split("[")[0]
    if distribution == "flipout_jax":
      found |= _extra(requirement.split("[")[1].rstrip("]"))
    else:
      found.add(_IMPORT_NAMES.get(distribution, distribution.replace("-", "_")))
  return found


def test_the_examples_run_on_the_examples_extra():
  base = {
      requirement.split(">")[0]
      for requirement in _lines(_setup_cfg()["options"]["install_requires"])
  }
  third_party = _imported_top_level(_ROOT / "examples") - set(sys.stdlib_module_names)
  third_party -= {"flipout_jax", "examples", "this"}
  assert third_party <= _extra("examples") | base, third_party - _extra("examples")
  # jax.export's serialize needs flatbuffers, which jax does not require.
  uses_export = any("serialize(" in path.read_text() for path in (_ROOT / "examples").glob("*.py"))
  assert uses_export and "flatbuffers" in _extra("examples")
  assert _extra("examples") <= _extra("experiments") <= _extra("test")


# The child interpreter of the wheel test: the wheel's flipout_jax and its declared dependencies
# alone, and a few pruning steps through them.
_CHILD = """
import importlib.util, sys
sys.path[:0] = sys.argv[1:3]
for name in ("flax", "orbax", "tensorflow_datasets", "qwix", "equinox", "experiments", "pytest"):
  assert importlib.util.find_spec(name) is None, name
import jax.numpy as jnp, optax
import flipout_jax as flipout
params = {"w": jnp.arange(1.0, 65.0).reshape(8, 8)}
tx = optax.chain(optax.sgd(0.1), flipout.prune(0.5, total_steps=4))
state = tx.init(params)
for _ in range(3):
  updates, state = tx.update(params, state, params)
  params = optax.apply_updates(params, updates)
print(flipout.__file__, flipout.sparsity(params))
"""


def _requirement_closure(requirements: list[str]) -> set[str]:
  """The installed distributions ``requirements`` need, with theirs, recursively."""
  from importlib import metadata

  from packaging.requirements import Requirement

  found: set[str] = set()
  pending = list(requirements)
  while pending:
    requirement = Requirement(pending.pop())
    name = requirement.name.lower().replace("_", "-")
    if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
      continue
    found.add(name)
    pending.extend(metadata.distribution(name).requires or [])
  return found


def _link_distributions(names: set[str], folder: Path) -> None:
  """Links each distribution's top-level packages, modules and metadata into ``folder``."""
  from importlib import metadata

  for name in names:
    distribution = metadata.distribution(name)
    tops = {Path(file).parts[0] for file in distribution.files or []}
    for top in tops - {"..", "__pycache__"}:
      source = Path(distribution.locate_file(top))
      if source.exists() and not (folder / top).exists():
        (folder / top).symlink_to(source)


def test_the_wheel_imports_and_prunes_without_the_experiments_dependencies(tmp_path):
  # A fresh interpreter (-I -S: no site-packages, no PYTHONPATH, no working directory) sees the
  # installed wheel and links to exactly the distributions its install_requires need. The same
  # import resolution as a fresh virtual environment, without downloading or copying jax: the
  # experiments' packages are absent, and the child checks that they cannot be found.
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run(
      [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", _ROOT],
      check=True,
      cwd=tmp_path,
  )
  (wheel,) = (tmp_path / "dist").glob("flipout_jax-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
  assert "flipout_jax/py.typed" in names
  # setuptools >= 70 puts license files under .dist-info/licenses/.
  assert any(re.search(r"\.dist-info/(licenses/)?LICENSE$", name) for name in names), names
  site = tmp_path / "site"
  subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True)
  deps = tmp_path / "deps"
  deps.mkdir()
  _link_distributions(
      _requirement_closure(_lines(_setup_cfg()["options"]["install_requires"])), deps
  )
  child = subprocess.run(
      [sys.executable, "-I", "-S", "-c", _CHILD, str(site), str(deps)],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      env={"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "")},
  )
  assert child.returncode == 0, child.stderr
  location, sparsity = child.stdout.split()
  assert Path(location).is_relative_to(site) and float(sparsity) == 0.5


def test_every_public_function_is_annotated():
  import inspect

  import flipout_jax

  for name in flipout_jax.__all__:
    value = getattr(flipout_jax, name)
    if isinstance(value, type):
      continue
    signature = inspect.signature(value)
    missing = [
        p for p, v in signature.parameters.items() if v.annotation is inspect.Parameter.empty
    ]
    assert not missing, (name, missing)
    assert signature.return_annotation is not inspect.Signature.empty, name


def test_the_api_reference_has_a_page_for_every_public_name():
  import flipout_jax

  listed = set(re.findall(r"^   (\w+)$", (_ROOT / "docs" / "api.rst").read_text(), re.MULTILINE))
  assert listed == set(flipout_jax.__all__), listed ^ set(flipout_jax.__all__)
