"""What the examples share: scikit-learn's 8x8 digits and their command line."""

import argparse
from collections.abc import Sequence

import numpy as np
from sklearn import datasets

TRAIN_SIZE = 1500  # of 1797 images; the rest is the test set


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Train images, train labels, test images, test labels: pixels in [0, 1], 64 per image."""
  digits = datasets.load_digits()
  images = (digits.data / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  return images[:TRAIN_SIZE], labels[:TRAIN_SIZE], images[TRAIN_SIZE:], labels[TRAIN_SIZE:]


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
  """``--steps`` (full-batch steps), ``--sparsity`` (the pruning target) and ``--seed``."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--steps", type=int, default=1000, help="training steps (full batch)")
  parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of kernels pruned")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)
