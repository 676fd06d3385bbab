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

from experiments import config as config_lib


def maybe_initialize_distributed(config: config_lib.Config) -> None:
  """Joins a multi-process job when the config, the environment or a cluster describes one.

  The coordinator, process count and index come from the config's flags, else from
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with none of
  them, a SLURM or Open MPI job is detected by ``jax.distributed.initialize()`` itself. On a
  single machine nothing is done. Must run before anything touches a JAX device.

  Raises:
    config_lib.ConfigError: an incomplete or malformed description of the job.
  """
  if jax.distributed.is_initialized():
    return
  address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = config.num_processes
  process_id = config.process_id
  if address is not None and config.coordinator_address is None:
    num_processes = _environment_int("JAX_NUM_PROCESSES", num_processes)
    process_id = _environment_int("JAX_PROCESS_ID", process_id)
  config_lib.validate_processes(address, num_processes, process_id)
  if address is not None:
    jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
  elif any(int(os.environ.get(name, "1")) > 1 for name in _CLUSTER_SIZE_VARIABLES):
    jax.distributed.initialize()


# Variables that say a cluster launcher started several processes (SLURM, Open MPI).
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _environment_int(name: str, value: int | None) -> int | None:
  if value is not None or name not in os.environ:
    return value
  try:
    return int(os.environ[name])
  except ValueError:
    raise config_lib.ConfigError(f"{name} must be an integer, got {os.environ[name]!r}") from None


DATA_AXIS = "data"


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds whole (works multi-host too)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(tree):
  """NumPy copies of a tree of arrays, also of replicated arrays spanning several processes.

  ``jax.device_get`` refuses an array that is not fully addressable (multi-process); a
  replicated one holds the whole value in each local shard, so that shard is read.
  """

  def read(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.sharding.is_fully_replicated:
        raise ValueError(f"cannot read a sharded {leaf.shape} array spanning several processes")
      leaf = leaf.addressable_shards[0].data
    return np.asarray(jax.device_get(leaf))

  return jax.tree.map(read, tree)


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
