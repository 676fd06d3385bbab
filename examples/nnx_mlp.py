"""FlipOut pruning of a Flax NNX model of one's own, trained with ``nnx.Optimizer``.

``python -m examples.nnx_mlp --steps 1000 --sparsity 0.9``
"""

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flipout_jax as flipout
from examples import _digits


class MLP(nnx.Module):
  """64 -> 128 -> 10; Flax kernels are stored (in, out), summary()'s default layout."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.hidden(x)))


def main(argv: Sequence[str] | None = None) -> int:
  """Trains, prunes to ``--sparsity``, prints ``flipout.summary``, compacts and exports."""
  args = _digits.parse_args(argv, __doc__.splitlines()[0])
  x, y, x_test, y_test = map(jnp.asarray, _digits.load())
  model = MLP(nnx.Rngs(args.seed))
  tx = optax.chain(
      flipout.gradient_noise(scale=1.0, seed=args.seed),  # the paper's noise, first
      optax.sgd(0.1, momentum=0.9),
      flipout.prune(args.sparsity, total_steps=args.steps),  # last: it sees the final update
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model: MLP, optimizer: nnx.Optimizer) -> jax.Array:
    def loss_fn(model: MLP) -> jax.Array:
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(args.steps):
    loss = train_step(model, optimizer)
  accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test))
  print(f"loss {float(loss):.4f}, test accuracy {accuracy:.4f}")
  graphdef, params = nnx.split(model)  # the pruned weights are exact zeros of `params`
  print(flipout.summary(params))
  # Compaction: the pruned model as a pure function of its params, rewritten at smaller widths.
  apply_fn = lambda params, x: nnx.merge(graphdef, params)(x)
  compacted = flipout.compact(apply_fn, params, x_test)
  print(compacted.report)
  _digits.check_and_export(compacted, apply_fn(params, x_test), x_test)
  return 0


if __name__ == "__main__":
  sys.exit(main())
