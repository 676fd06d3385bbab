"""Test-set evaluation of a run's state, on the data kept on the devices."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import devices, input_pipeline, optimizers


@functools.partial(jax.jit, static_argnames=("graphdef_eval", "batch_sharding"))
def _batch_sums(
    params,
    batch_stats,
    data: devices.DeviceData,
    indices,
    weights,
    *,
    graphdef_eval,
    batch_sharding,
):
  """Summed test loss and correct predictions of one test batch (padding has weight 0).

  Module-level and keyed by the graph definition, so runs of the same model in one process
  (the digits demo) compile it once.
  """
  indices = jax.lax.with_sharding_constraint(indices, batch_sharding)
  inputs = input_pipeline.normalize(data.test_images[indices], data.mean, data.std)
  logits = nnx.merge(graphdef_eval, params, batch_stats)(inputs)
  batch_labels = data.test_labels[indices]
  loss = jnp.sum(optimizers.cross_entropy(logits, batch_labels) * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch_labels) * weights)
  return loss, correct


def test_batches(
    num_examples: int, batch_size: int, mesh: Mesh
) -> tuple[list[jax.Array], list[jax.Array]]:
  """Test indices and weights in batches, the last one padded with weight 0, on device."""
  num_batches = math.ceil(num_examples / batch_size)
  padded = np.zeros(num_batches * batch_size, np.int32)
  padded[:num_examples] = np.arange(num_examples)
  weights = np.zeros(num_batches * batch_size, np.float32)
  weights[:num_examples] = 1.0
  sharding = NamedSharding(mesh, P(devices.DATA_AXIS))
  return (
      [devices.place(row, sharding) for row in padded.reshape(num_batches, batch_size)],
      [devices.place(row, sharding) for row in weights.reshape(num_batches, batch_size)],
  )


def evaluate(
    graphdef_eval, mesh: Mesh, state, data: devices.DeviceData, eval_batches
) -> tuple[float, float]:
  """Mean test loss and accuracy over the whole test set."""
  batch_sharding = NamedSharding(mesh, P(devices.DATA_AXIS))
  sums = [
      _batch_sums(
          state["params"],
          state["batch_stats"],
          data,
          indices,
          weights,
          graphdef_eval=graphdef_eval,
          batch_sharding=batch_sharding,
      )
      for indices, weights in zip(*eval_batches)
  ]
  loss_sum = correct_sum = 0.0
  for loss, correct in devices.to_host(sums):
    loss_sum += float(loss)
    correct_sum += float(correct)
  count = int(data.test_labels.shape[0])
  return loss_sum / count, correct_sum / count
