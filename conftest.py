"""Keeps JAX on the CPU and quiet in tests, whatever accelerators exist, and shares compiled
programs between the tests of one run.

Many tests compile the same programs (a model's train step, in this process, in pytest-xdist's
other worker and in the subprocesses of the command-line tests): JAX's persistent compilation
cache, in a folder made for this run and inherited by every worker and subprocess through the
environment, compiles each once. A cached executable is the one compiled, so results are
unchanged; the folder is removed when the run ends.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set here by the first process of the run
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flipout-jax-tests-jit-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  # Tiny test programs compile in well under JAX's default threshold of one second.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
