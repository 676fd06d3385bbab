"""FlipOut pruning of an Equinox model of one's own, trained through ``eqx.partition``.

``python -m examples.equinox_mlp --steps 1000 --sparsity 0.9``
"""

import sys
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import flipout_jax as flipout
from examples import _digits


def main(argv: Sequence[str] | None = None) -> int:
  """Trains, prunes to ``--sparsity``, prints ``flipout.summary``, compacts and exports."""
  args = _digits.parse_args(argv, __doc__.splitlines()[0])
  x, y, x_test, y_test = map(jnp.asarray, _digits.load())
  # 64 -> 128 -> 10. Equinox stores kernels (out, in): summary() is told so below.
  model = eqx.nn.MLP(64, 10, width_size=128, depth=1, key=jax.random.key(args.seed))
  tx = optax.chain(
      flipout.gradient_noise(scale=1.0, seed=args.seed),  # the paper's noise, first
      optax.sgd(0.1, momentum=0.9),
      flipout.prune(args.sparsity, total_steps=args.steps),  # last: it sees the final update
  )
  # Only the floating arrays are trained and pruned; the rest (activations) stays static.
  params, static = eqx.partition(model, eqx.is_inexact_array)
  opt_state = tx.init(params)

  def loss_fn(params, static) -> jax.Array:
    logits = jax.vmap(eqx.combine(params, static))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @eqx.filter_jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, static)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state)
  logits = jax.vmap(eqx.combine(params, static))(x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == y_test))
  print(f"loss {float(loss):.4f}, test accuracy {accuracy:.4f}")
  print(flipout.summary(params, kernel_layout="out_in"))  # pruned weights are exact zeros
  # Compaction: the pruned model as a pure function of its params, rewritten at smaller widths.
  apply_fn = lambda params, x: jax.vmap(eqx.combine(params, static))(x)
  compacted = flipout.compact(apply_fn, params, x_test)
  print(compacted.report)
  _digits.check_and_export(compacted, logits, x_test)
  return 0


if __name__ == "__main__":
  sys.exit(main())
