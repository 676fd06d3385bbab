"""Sphinx configuration of the flipout_jax site (the optax/flax convention).

autodoc reads the Google-style docstrings (napoleon), autosummary writes one page per public
name, MyST reads the Markdown pages (``algorithm.md`` among them), and ``sphinx.ext.doctest``
runs every ``>>>`` example of the pages and docstrings (``sphinx-build -b doctest``).
``.ci/run`` builds the site and runs the doctests with warnings as errors.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the checkout's flipout_jax and examples/

import flipout_jax  # noqa: E402

project = "flipout_jax"
author = "the flipout_jax authors"
copyright = "the flipout_jax authors, Apache-2.0"  # noqa: A001 (Sphinx's name)
release = flipout_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# The doctests import the library as its users do.
doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import optax
import flipout_jax as flipout
"""

html_theme = "alabaster"
html_title = f"flipout_jax {release}"
