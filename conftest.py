"""Keeps JAX on the CPU and quiet in tests, whatever accelerators exist."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
