"""The check every compaction test of a new op makes: the compact model gives the dense
model's outputs and input gradients at other batch sizes than the example's, jitted, and
through ``jax.export`` with a symbolic batch."""

import jax
import jax.numpy as jnp

from tests.test_compact import assert_same_outputs

# Differentiated with respect to the params too (the input's gradient is compared): NNX's scan
# refuses blocks made at another trace level than the carry's.
_GRADIENT = jax.jit(
    jax.grad(lambda x, p, f: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1)), static_argnums=2
)


def check_other_batch_sizes(apply_fn, params, compacted, inputs, counts=(1, 5)):
  """``inputs(count, seed)``: a batch of ``count`` arguments; each of ``counts`` is checked
  jitted, exported with a symbolic batch (traced at ``inputs(2)``'s shape) and under grad."""
  example = inputs(2, seed=0)
  batch = jax.export.symbolic_shape("batch")[0]
  spec = jax.ShapeDtypeStruct((batch, *example.shape[1:]), example.dtype)
  exported = jax.export.export(jax.jit(compacted.apply))(compacted.params, spec)
  for count in counts:
    x = inputs(count, seed=count)
    expected = apply_fn(params, x)
    assert_same_outputs(expected, jax.jit(compacted.apply)(compacted.params, x))
    assert_same_outputs(expected, exported.call(compacted.params, x))
    gradient = _GRADIENT(x, compacted.params, compacted.apply)[0]
    assert_same_outputs(_GRADIENT(x, params, apply_fn)[0], gradient)
