"""Every code block of README.md and docs/ works as written.

Python blocks run, each in a fresh namespace (so each shows its own imports); shell blocks
name only modules that exist (``python -m ...``) and extras that setup.cfg declares
(``pip install -e '.[...]'``), and never ask to install a distribution by a name the package
registry does not have; the doctest blocks of the pages run in Sphinx's doctest build
(``.ci/run``), and each page that has them imports what they use on the page itself.
"""

import configparser
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
PAGES = [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\{?[\w-]+\}?)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language):
  """``(page, line, code)`` of every block fenced as ``language``."""
  found = []
  for page in PAGES:
    text = page.read_text()
    for match in _FENCE.finditer(text):
      if match.group(1) == language:
        line = text.count("\n", 0, match.start()) + 1
        found.append((page.relative_to(_ROOT).as_posix(), line, match.group(2)))
  return found


def test_the_pages_have_blocks_of_each_kind():
  assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 3 and blocks("{doctest}")


@pytest.mark.parametrize("page, line, code", blocks("python"), ids=lambda v: str(v)[:40])
def test_a_python_block_runs_as_written(page, line, code, monkeypatch):
  monkeypatch.chdir(_ROOT)
  exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__snippet__"})  # noqa: S102


def _extras() -> set[str]:
  parser = configparser.ConfigParser()
  parser.read(_ROOT / "setup.cfg")
  return set(parser["options.extras_require"])


def _commands(code):
  """Each shell command of a block (comments dropped, ``&&`` split)."""
  for line in code.splitlines():
    line = line.split(" #")[0].strip()
    if line and not line.startswith("#"):
      yield from (shlex.split(part) for part in line.split("&&"))


@pytest.mark.parametrize("page, line, code", blocks("bash"), ids=lambda v: str(v)[:40])
def test_a_shell_block_names_modules_and_extras_that_exist(page, line, code):
  for words in _commands(code):
    if words[:2] == ["python", "-m"] or words[:2] == ["python3", "-m"]:
      module = words[2]
      assert importlib.util.find_spec(module) is not None, f"{page}:{line}: no module {module}"
    if "pip" in words and "install" in words:
      targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
      for target in targets:
        match = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target)
        assert match, f"{page}:{line}: installs {target!r}, which is not this checkout"
        for extra in (match.group(1) or "").split(",") if match.group(1) else []:
          assert extra in _extras(), f"{page}:{line}: no extra {extra!r} in setup.cfg"


@pytest.mark.parametrize("page", [p for p in PAGES if "```{doctest}" in p.read_text()])
def test_a_page_with_doctests_shows_their_imports(page):
  doctests = "".join(code for name, _, code in blocks("{doctest}") if name.endswith(page.name))
  first_use = doctests.index("flipout.")
  assert ">>> import flipout_jax as flipout" in doctests[:first_use], page


def _slug(heading):
  """GitHub's anchor of a Markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "BENCHMARKS.md"])
def test_the_links_point_to_files_and_headings_that_exist(page):
  text = (_ROOT / page).read_text()
  links = re.findall(r"\]\(([^)\s#]+)(?:#([^)\s]+))?\)", text)
  assert links
  for target, anchor in links:
    if target.startswith("http"):
      continue
    path = _ROOT / target
    assert path.exists(), target
    if anchor:
      headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
      assert anchor in {_slug(h) for h in headings}, f"{target}#{anchor}"
