"""Devices: joining a multi-host job, the data-parallel mesh, placing host arrays on it.

Data parallel over every device (``jax.devices()``, all hosts): a 1-D mesh ``("data",)``, the
batch sharded along it, params and optimizer state replicated; XLA inserts the gradient
all-reduce.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding


def maybe_initialize_distributed() -> None:
  """Joins a multi-host job when the environment describes one (coordinator or cluster env).

  ``jax.distributed.initialize()`` reads the coordinator from ``JAX_COORDINATOR_ADDRESS`` or
  auto-detects SLURM / Open MPI; on a single machine nothing is done.
  """
  multi_process = (
      "JAX_COORDINATOR_ADDRESS" in os.environ
      or int(os.environ.get("SLURM_NTASKS", "1")) > 1
      or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )
  if multi_process and not jax.distributed.is_initialized():
    jax.distributed.initialize()


DATA_AXIS = "data"


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds whole (works multi-host too)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place_tree(tree, sharding: NamedSharding):
  return jax.tree.map(lambda leaf: place(np.asarray(leaf), sharding), tree)


class DeviceData(NamedTuple):
  """The whole data set on the devices (replicated) with its normalisation statistics."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  mean: jax.Array
  std: jax.Array
