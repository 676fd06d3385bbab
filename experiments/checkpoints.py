"""Orbax checkpoints of a run: save, restore, resumability checks, and :func:`load_run`.

State and run metadata are saved after every ``checkpoint_every_epochs`` epochs and at the end,
keeping the newest ``keep_checkpoints``. Orbax writes into a temporary directory and renames it
when complete, so a write cut short never replaces the previous checkpoint; pending
asynchronous writes are waited on before a run returns.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flipout_jax as flipout
from experiments import config as config_lib
from experiments import devices, optimizers, run_state

CHECKPOINT_DIR = "checkpoints"


# Fields that may differ between a run and its resumption: they do not change what is computed.
_RESUMABLE_FIELDS = (
    "workdir",
    "coordinator_address",
    "num_processes",
    "process_id",
    "resume",
    "progress",
    "tensorboard",
    "data_dir",
    "eval_batch_size",
    "checkpoint_every_epochs",
    "keep_checkpoints",
    "on_nonfinite",
)


def open_manager(workdir: Path, config: config_lib.Config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager((workdir / CHECKPOINT_DIR).absolute(), options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state, metadata: dict) -> None:
  """Saves after ``epoch`` completed epochs (orbax step = epochs done), asynchronously."""
  manager.save(
      epoch,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
      ),
  )


def restore_metadata(manager: ocp.CheckpointManager, epoch: int) -> dict[str, Any]:
  """The run metadata saved with ``epoch`` (config, shapes), without reading the state."""
  return manager.restore(epoch, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
      "metadata"
  ]


def restore(manager: ocp.CheckpointManager, epoch: int, target_state):
  """Restores state (shaped and sharded like ``target_state``) and metadata of ``epoch``.

  Integer leaves narrower than 32 bits (uint16 flip counters) are read as int32 and saturated
  into their dtype: a checkpoint written with int32 counters may hold counts above 65535,
  which orbax's cast would wrap (70,000 would come back as 4,464).
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  restored = manager.restore(
      epoch,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(jax.tree.map(_read_as_int32, abstract)),
          metadata=ocp.args.JsonRestore(),
      ),
  )
  return _saturate_into(restored["state"], abstract), restored["metadata"]


def _read_as_int32(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  narrow = jnp.issubdtype(leaf.dtype, jnp.integer) and jnp.dtype(leaf.dtype).itemsize < 4
  if not narrow:
    return leaf
  return jax.ShapeDtypeStruct(leaf.shape, jnp.int32, sharding=leaf.sharding)


def _saturate_into(state, abstract):
  """``state`` with each leaf read wider than its ``abstract`` dtype clipped into that dtype.

  One compiled function for all such leaves, placed as ``abstract`` says; other leaves are
  returned as they are (no copy).
  """
  leaves, treedef = jax.tree.flatten(state)
  targets = treedef.flatten_up_to(abstract)
  wide = [i for i, (leaf, target) in enumerate(zip(leaves, targets)) if leaf.dtype != target.dtype]
  if not wide:
    return state

  def saturate(values):
    narrowed = []
    for i, value in zip(wide, values):
      limits = jnp.iinfo(targets[i].dtype)
      narrowed.append(jnp.clip(value, limits.min, limits.max).astype(targets[i].dtype))
    return narrowed

  narrowed = jax.jit(saturate, out_shardings=[targets[i].sharding for i in wide])(
      [leaves[i] for i in wide]
  )
  for i, value in zip(wide, narrowed):
    leaves[i] = value
  return treedef.unflatten(leaves)


def check_resumable(saved: config_lib.Config, config: config_lib.Config) -> None:
  """A checkpoint only continues the run that wrote it."""
  differing = [
      field.name
      for field in dataclasses.fields(config_lib.Config)
      if field.name not in _RESUMABLE_FIELDS
      and getattr(saved, field.name) != getattr(config, field.name)
  ]
  if differing:
    changes = ", ".join(
        f"--{name} {getattr(saved, name)!r} -> {getattr(config, name)!r}" for name in differing
    )
    raise config_lib.ConfigError(
        f"the checkpoint in --workdir={config.workdir} is from another run ({changes}); "
        "use the same flags to resume or another --workdir"
    )


def latest_to_resume(manager: ocp.CheckpointManager, config: config_lib.Config) -> int | None:
  """The newest complete checkpoint to resume from, once it is known to be this run's.

  Refuses to overwrite a run silently (no ``--resume``) and to continue another run's
  checkpoint: the saved config is compared before any state is built or restored, so the
  answer is one line and the old run's files are left as they are.
  """
  latest = manager.latest_step()
  if latest is not None and not config.resume:
    raise config_lib.ConfigError(
        f"--workdir={config.workdir} already holds checkpoints; pass --resume to continue "
        "that run or choose another --workdir"
    )
  if latest is not None:
    saved = restore_metadata(manager, latest)["config"]
    check_resumable(config_lib.config_from_json(saved), config)
  return latest


class RestoredRun(NamedTuple):
  """A checkpoint read back: its config, the model in eval mode with the trained weights, and
  the pruning masks and flip counts (None for ``dense``)."""

  config: config_lib.Config
  model: nnx.Module
  masks: Any
  flip_counts: Any
  epoch: int


def load_run(workdir: str | os.PathLike, epoch: int | None = None) -> RestoredRun:
  """Restores the newest (or the ``epoch``) checkpoint of a run written by :func:`train`.

  Needs no data set: shapes come from the checkpoint's metadata.

  Raises:
    config_lib.ConfigError: no checkpoint in ``workdir``.
  """
  directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
  if not directory.is_dir():
    raise config_lib.ConfigError(
        f"{workdir} has no {CHECKPOINT_DIR}/ folder; train a run there first"
    )
  with ocp.CheckpointManager(directory) as manager:
    epoch = manager.latest_step() if epoch is None else epoch
    if epoch is None:
      raise config_lib.ConfigError(f"{directory} holds no complete checkpoint")
    metadata = restore_metadata(manager, epoch)
    config = config_lib.config_from_json(metadata["config"])
    setup = run_state.build_setup(
        config, tuple(metadata["input_shape"]), metadata["num_classes"], metadata["steps_per_epoch"]
    )
    # Replicated over this process's devices, whatever device count wrote it.
    target = devices.place_tree(setup.state, NamedSharding(devices.make_mesh(), P()))
    state, _ = restore(manager, epoch, target)
  model = nnx.merge(setup.graphdef_eval, state["params"], state["batch_stats"])
  has_masks = optimizers.has_pruning_state(config)
  return RestoredRun(
      config=config,
      model=model,
      masks=flipout.masks(state["opt_state"]) if has_masks else None,
      flip_counts=flipout.flip_counts(state["opt_state"]) if has_masks else None,
      epoch=int(epoch),
  )
