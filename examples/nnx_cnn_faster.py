"""A Flax NNX CNN pruned by units to a FLOP target, compacted, and timed against dense.

``python -m examples.nnx_cnn_faster --steps 300 --flops 0.8``

``flipout.unit_groups`` reads from the model which output channels go together and what
each costs in FLOPs; ``flipout.units(groups, cost="flops", normalize="mean", round_to=8)``
makes the target the share of the model's FLOPs removed, with each layer's scores on one
scale so that no layer takes all the pruning, and widths in multiples of 8;
``flipout.compact`` then cuts the dead channels out.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flipout_jax as flipout
from examples import _digits


class CNN(nnx.Module):
  """8x8 digits: conv 32, conv 64, a 2x2 average pool, dense 128, logits."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.hidden = nnx.Linear(4 * 4 * 64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x.reshape(-1, 8, 8, 1)))))
    x = nnx.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
    return self.out(jax.nn.relu(self.hidden(x)))


def train(tx: optax.GradientTransformation, steps: int, seed: int, x, y) -> CNN:
  """``steps`` of ``tx`` on batches of 128 train images, the same batches for every ``tx``."""
  model = CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model: CNN, optimizer: nnx.Optimizer, images, labels) -> None:
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(images), labels).mean()
    optimizer.update(model, nnx.grad(loss_fn)(model))

  batches = np.random.default_rng(seed).integers(0, len(x), size=(steps, 128))
  for batch in batches:
    train_step(model, optimizer, x[batch], y[batch])
  return model


def median_seconds(forwards: dict[str, object], batch: jax.Array, repeats: int = 21):
  """Median seconds per call of each compiled forward on ``batch``, interleaved calls."""
  for forward in forwards.values():
    jax.block_until_ready(forward(batch))  # compiles
  seconds: dict[str, list[float]] = {name: [] for name in forwards}
  for _ in range(repeats):
    for name, forward in forwards.items():
      start = time.perf_counter()
      jax.block_until_ready(forward(batch))
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in seconds.items()}


def main(argv: Sequence[str] | None = None) -> int:
  """Trains dense and pruned, prints accuracy, FLOPs and the compacted model's speed-up."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="training steps (batch 128)")
  parser.add_argument("--flops", type=float, default=0.8, help="share of the FLOPs to remove")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  x, y, x_test, y_test = map(jnp.asarray, _digits.load())
  sgd = optax.sgd(0.05, momentum=0.9)
  dense = train(sgd, args.steps, args.seed, x, y)

  graphdef, params = nnx.split(CNN(nnx.Rngs(args.seed)), nnx.Param)
  apply_fn = lambda params, images: nnx.merge(graphdef, params)(images)
  kernels = lambda path, leaf: leaf.ndim > 1
  groups = flipout.unit_groups(apply_fn, params, x_test, where=kernels)
  # Widths in multiples of 8: XLA's CPU convolutions are slow at odd widths.
  structure = flipout.units(groups, cost="flops", normalize="mean", round_to=8)
  # Prunable: groups.where, the kernels and their units' biases (a pruned channel is zeros).
  prune = flipout.prune(args.flops, total_steps=args.steps, structure=structure)
  pruned = train(optax.chain(sgd, prune), args.steps, args.seed, x, y)  # prune last

  accuracy = lambda model: float(jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test))
  print(f"test accuracy: dense {accuracy(dense):.4f}, pruned {accuracy(pruned):.4f}")
  graphdef, params = nnx.split(pruned, nnx.Param)
  compacted = flipout.compact(apply_fn, params, x_test)
  print(compacted.report)
  dense_flops = flipout.flops(apply_fn, params, x_test)
  compact_flops = flipout.flops(compacted.apply, compacted.params, x_test)
  print(f"FLOPs removed: {1 - compact_flops / dense_flops:.4f} (target {args.flops})")
  _digits.check_and_export(compacted, apply_fn(params, x_test), x_test)

  batch = jnp.tile(x_test, (4, 1))[:1000]  # the speed at batch 1000
  _, dense_params = nnx.split(dense, nnx.Param)
  seconds = median_seconds(
      {
          "dense": jax.jit(lambda images: apply_fn(dense_params, images)),
          "compact": jax.jit(lambda images: compacted.apply(compacted.params, images)),
      },
      batch,
  )
  print(
      f"batch 1000 on {jax.devices()[0].platform}: dense {seconds['dense'] * 1e3:.2f} ms, "
      f"compact {seconds['compact'] * 1e3:.2f} ms, {seconds['dense'] / seconds['compact']:.2f}x "
      "faster (median of 21 interleaved calls)"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
