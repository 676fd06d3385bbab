"""FlipOut pruning of a Flax Linen model of one's own, trained with a ``TrainState``.

``python -m examples.linen_mlp --steps 1000 --sparsity 0.9``
"""

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

import flipout_jax as flipout
from examples import _digits


class MLP(nn.Module):
  """64 -> 128 -> 10; Linen kernels are stored (in, out), summary()'s default layout."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = nn.relu(nn.Dense(128, name="hidden")(x))
    return nn.Dense(10, name="out")(hidden)


def main(argv: Sequence[str] | None = None) -> int:
  """Trains, prunes to ``--sparsity``, prints ``flipout.summary``, compacts and exports."""
  args = _digits.parse_args(argv, __doc__.splitlines()[0])
  x, y, x_test, y_test = map(jnp.asarray, _digits.load())
  model = MLP()
  tx = optax.chain(
      flipout.gradient_noise(scale=1.0, seed=args.seed),  # the paper's noise, first
      optax.sgd(0.1, momentum=0.9),
      flipout.prune(args.sparsity, total_steps=args.steps),  # last: it sees the final update
  )
  params = model.init(jax.random.key(args.seed), x[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state: train_state.TrainState) -> tuple[train_state.TrainState, jax.Array]:
    def loss_fn(params) -> jax.Array:
      logits = state.apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss  # passes params to tx.update

  for _ in range(args.steps):
    state, loss = train_step(state)
  logits = state.apply_fn({"params": state.params}, x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == y_test))
  print(f"loss {float(loss):.4f}, test accuracy {accuracy:.4f}")
  print(flipout.summary(state.params))  # the pruned weights are exact zeros of the params
  # Compaction: the pruned model as a pure function of its params, rewritten at smaller widths.
  apply_fn = lambda params, x: model.apply({"params": params}, x)
  compacted = flipout.compact(apply_fn, state.params, x_test)
  print(compacted.report)
  _digits.check_and_export(compacted, logits, x_test)
  return 0


if __name__ == "__main__":
  sys.exit(main())
