"""What the examples share: scikit-learn's 8x8 digits, their command line, and the check and
export of the compact model."""

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import datasets

import flipout_jax as flipout

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


# Compact and pruned logits agree to float32 rounding: compaction drops terms that are exact
# zeros and folds constants, so only the order of the sums changes. Relative to the largest.
TOLERANCE = 1e-5


def check_and_export(
    compacted: flipout.Compacted, pruned_logits: jax.Array, x: jax.Array
) -> bytearray:
  """Checks the compact logits on ``x``, exports the compact model with ``jax.export`` and
  checks the exported one's; returns its serialized bytes.

  The export closes over the compact params, so the serialized bytes are the whole model:
  ``jax.export.deserialize(blob).call(x)`` runs it without the model's code, at any batch size.

  Raises:
    SystemExit: the compact or exported logits differ from ``pruned_logits``.
  """
  limit = TOLERANCE * max(1.0, float(jnp.abs(pruned_logits).max()))

  def check(what: str, logits: jax.Array) -> None:
    diff = float(jnp.abs(logits - pruned_logits).max())
    print(f"{what}: max |logits - pruned logits| {diff:.2e} (tolerance {limit:.2e})")
    if not diff <= limit:  # also refuses NaN
      raise SystemExit(f"{what} logits differ from the pruned model's by {diff}")

  check("compact", compacted.apply(compacted.params, x))
  forward = jax.jit(lambda images: compacted.apply(compacted.params, images))
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"batch, {x.shape[1]}"), x.dtype)
  blob = jax.export.export(forward)(images).serialize()  # a bytearray of StableHLO
  print(f"exported: {len(blob):,} bytes")
  check("exported", jax.export.deserialize(blob).call(x))
  return blob
