"""Orbax checkpoints of a run: save, verify, restore with fallback, and :func:`load_run`.

State and run metadata are saved after every ``checkpoint_every_epochs`` epochs and at the end,
keeping the newest ``keep_checkpoints`` (orbax step = epochs done, in ``checkpoints/``). A
preempted run saves its mid-epoch state and epoch totals in ``preempted_checkpoint/`` (orbax
step = steps done, the newest only). Orbax writes into a temporary directory and renames it
when complete, so a write cut short never replaces the previous checkpoint; pending
asynchronous writes are waited on before a run returns, and a write that fails is one
:class:`CheckpointSaveError`.

Each checkpoint's metadata holds a CRC-32 of its state and metadata. On ``--resume`` the
newest checkpoint that restores and matches its checksum is used; a damaged one (truncated,
bit-flipped, unreadable) is named in a warning and moved, never deleted, to
``damaged_checkpoints/`` so that the run can write that step again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import re
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flipout_jax as flipout
from experiments import config as config_lib
from experiments import devices, optimizers, run_state

CHECKPOINT_DIR = "checkpoints"
PREEMPTED_DIR = "preempted_checkpoint"
DAMAGED_DIR = "damaged_checkpoints"
_CHECKSUM_KEY = "crc32"


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


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (a full disk, a write error); one-line message."""


class DamagedCheckpoint(config_lib.ConfigError):
  """A checkpoint's files do not restore, or do not match the checksum saved with them."""


class Store(NamedTuple):
  """A run's checkpoint managers: one per epoch checkpoint, one for a preempted run's state."""

  workdir: Path
  epochs: ocp.CheckpointManager
  preempted: ocp.CheckpointManager


class _Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager that leaves JAX's preemption sync point to the training loop.

  orbax's ``save`` asks ``multihost_utils.reached_preemption_sync_point(step)`` with its own
  step numbers (here epochs), and JAX agrees on one sync point per preemption notice, in the
  numbering of whoever asks first after it. A SIGTERM landing during an epoch checkpoint's
  save then fixed the sync point in epochs, the loop (which asks with steps done) never
  reached it, and a two-process job ran on to the end, exit 0. The loop saves a preempted
  run's state itself (``train._save_preempted``), so orbax never needs to ask.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def open_store(workdir: Path, config: config_lib.Config) -> Store:
  """Opens (creating) ``checkpoints/`` and ``preempted_checkpoint/`` of ``workdir``."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True
  )
  # The preempted state is written while the job is being stopped: synchronously.
  preempted_options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=False
  )
  return Store(
      workdir,
      _Manager((workdir / CHECKPOINT_DIR).absolute(), options=options),
      _Manager((workdir / PREEMPTED_DIR).absolute(), options=preempted_options),
  )


def finish_saving(store: Store) -> None:
  """Waits for the pending asynchronous write.

  Raises:
    CheckpointSaveError: that write failed.
  """
  try:
    store.epochs.wait_until_finished()
  except Exception as error:  # orbax re-raises whatever the write thread met
    raise _save_error(store, error) from error


def close_store(store: Store) -> None:
  """Closes both managers (waiting for pending writes; see :func:`finish_saving`)."""
  try:
    finish_saving(store)
  finally:
    store.epochs.close()
    store.preempted.close()


class _HeldOrbaxErrors(logging.Filter):
  """Holds back the error records orbax's write threads log (each with a traceback)."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      self.held.append(record)
      return False
    return True


def _drop_closed_loop_callbacks(unraisablehook, unraisable) -> None:
  """tensorstore reports (as unraisable) each write that completes after orbax's failed save
  closed its event loop; the save's own error is raised, and reported once."""
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    unraisablehook(unraisable)


@contextlib.contextmanager
def held_write_errors():
  """While training: orbax's logged write errors wait for the run's end.

  A failed write makes orbax's background threads log the same error several times with long
  tracebacks before :func:`finish_saving` re-raises it. If the run ends in
  :class:`CheckpointSaveError`, whose one line names that error, the held records are dropped
  with the reports of the write's abandoned coroutines and callbacks, now and until the process
  ends; otherwise they are logged when the run ends, so nothing orbax reports is lost.
  """
  logger = logging.getLogger("absl")
  held = _HeldOrbaxErrors()
  logger.addFilter(held)
  unraisablehook = sys.unraisablehook
  sys.unraisablehook = functools.partial(_drop_closed_loop_callbacks, unraisablehook)
  try:
    yield
  except CheckpointSaveError:
    unraisablehook = sys.unraisablehook  # tensorstore's late reports may follow: keep the filter
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    gc.collect()  # the abandoned write tasks report now, quietly, not after the run's line
    held.held.clear()
    raise
  finally:
    sys.unraisablehook = unraisablehook
    logger.removeFilter(held)
    for record in held.held:
      logger.handle(record)


def _save_error(store: Store, error: BaseException) -> CheckpointSaveError:
  store.epochs.reload()
  newest = store.epochs.latest_step()
  if newest is None:
    kept = "no earlier checkpoint is complete"
  else:
    kept = f"the newest complete checkpoint (epoch {newest}) is left as it was"
  return CheckpointSaveError(
      f"could not save a checkpoint in {store.workdir} ({type(error).__name__}: "
      f"{_shortened(error)}); {kept}; free disk space and continue with --resume"
  )


# The operating system's reason in tensorstore's messages: "...: File too large
# [os_error_code='27']", followed at times by a long spec of the store.
_OS_ERROR = re.compile(r"[^:]*: [^:\[\]]*\[os_error_code='?\d+'?\]")


def _shortened(error: BaseException, limit: int = 400) -> str:
  """The error's message on one line; the middle of a long one (paths) cut, never the
  operating system's reason when it names one, else not the end."""
  text = config_lib.one_line(error)
  if len(text) > limit:
    reason = _OS_ERROR.search(text)
    tail = reason.group(0).strip() if reason else text[-2 * limit // 3 :]
    text = f"{text[: limit // 3]} ... {tail}"
  # tensorstore's message does not always keep the reason's words beside its code (CI once
  # printed only "os_error_code='27'"): name it from the code.
  code = re.search(r"os_error_code='?(\d+)'?", text)
  if code and os.strerror(int(code.group(1))) not in text:
    text += f" ({os.strerror(int(code.group(1)))})"
  return text


def checksum(state, metadata: dict, totals=None) -> int:
  """CRC-32 of the state's (and totals') leaves, dtypes and shapes, and of ``metadata``.

  Integers narrower than 32 bits count as int32, as :func:`restore` reads them: the sum of a
  checkpoint is the same whichever counter width restores it.
  """
  crc = 0
  for leaf in jax.tree.leaves(devices.to_host({"state": state, "totals": totals})):
    array = np.ascontiguousarray(leaf)
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize < 4:
      array = array.astype(np.int32)
    crc = zlib.crc32(f"{array.dtype.str}{array.shape}".encode(), crc)
    crc = zlib.crc32(array.reshape(-1).view(np.uint8), crc)
  fields = {key: value for key, value in metadata.items() if key != _CHECKSUM_KEY}
  return zlib.crc32(json.dumps(fields, sort_keys=True).encode(), crc)


def save(
    manager: ocp.CheckpointManager, orbax_step: int, state, metadata: dict, totals=None
) -> None:
  """Saves ``state`` (and a preempted epoch's ``totals``) with ``metadata`` and its checksum.

  ``orbax_step`` is the epochs done (``Store.epochs``, asynchronous) or the steps done
  (``Store.preempted``). A failure of the previous asynchronous write surfaces here.
  """
  metadata = {**metadata, _CHECKSUM_KEY: checksum(state, metadata, totals)}
  items = {"state": ocp.args.StandardSave(state), "metadata": ocp.args.JsonSave(metadata)}
  if totals is not None:
    items["totals"] = ocp.args.StandardSave(totals)
  manager.save(orbax_step, args=ocp.args.Composite(**items))


def save_to_store(
    store: Store, orbax_step: int, state, metadata: dict, *, preempted_totals=None
) -> None:
  """:func:`save` into ``store``: an epoch's checkpoint, or a preempted run's (with the
  epoch's totals so far, written before this returns).

  Raises:
    CheckpointSaveError: this write, or the previous asynchronous one, failed.
  """
  manager = store.epochs if preempted_totals is None else store.preempted
  try:
    save(manager, orbax_step, state, metadata, preempted_totals)
    if preempted_totals is not None:
      manager.wait_until_finished()
  except Exception as error:  # orbax raises what the filesystem and tensorstore raise
    raise _save_error(store, error) from error


def restore_metadata(manager: ocp.CheckpointManager, epoch: int) -> dict[str, Any]:
  """The run metadata saved with ``epoch`` (config, shapes), without reading the state."""
  return manager.restore(epoch, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
      "metadata"
  ]


def restore(manager: ocp.CheckpointManager, orbax_step: int, target_state, target_totals=None):
  """Restores state (shaped and sharded like ``target_state``) and metadata of ``orbax_step``.

  Integer leaves narrower than 32 bits (uint16 flip counters) are read as int32 and saturated
  into their dtype: a checkpoint written with int32 counters may hold counts above 65535,
  which orbax's cast would wrap (70,000 would come back as 4,464).

  Returns:
    ``(state, metadata)``, or ``(state, metadata, totals)`` when ``target_totals`` is given
    (a preempted run's checkpoint).

  Raises:
    DamagedCheckpoint: the restored state or metadata do not match the checksum saved with
      them (checkpoints written before checksums existed are not checked).
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)

  def read(target):
    items = {
        "state": ocp.args.StandardRestore(jax.tree.map(_read_as_int32, target)),
        "metadata": ocp.args.JsonRestore(),
    }
    if target_totals is not None:
      totals_abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_totals)
      items["totals"] = ocp.args.StandardRestore(totals_abstract)
    return manager.restore(orbax_step, args=ocp.args.Composite(**items))

  try:
    restored = read(abstract)
    state = restored["state"]
  except ValueError as error:
    # A checkpoint written before PruneState held its update sample: read it without, and
    # take the target's sample, which checks nothing at the first update.
    try:
      restored = read(_map_prune_states(abstract, lambda s: _PruneStateWithoutSample(*s[:3])))
    except ValueError:
      raise error from None
    samples = iter(_prune_states(target_state))
    state = _map_prune_states(
        restored["state"],
        lambda s: flipout.PruneState(*s, last_update=next(samples).last_update),
        is_leaf=lambda node: isinstance(node, _PruneStateWithoutSample),
    )
  metadata = restored["metadata"]
  totals = restored["totals"] if target_totals is not None else None
  saved_checksum = metadata.get(_CHECKSUM_KEY) if isinstance(metadata, dict) else None
  if saved_checksum is not None and checksum(restored["state"], metadata, totals) != saved_checksum:
    raise DamagedCheckpoint(
        f"{Path(manager.directory) / str(orbax_step)} does not match the checksum saved with it"
    )
  state = _saturate_into(state, abstract)
  return (state, metadata) if target_totals is None else (state, metadata, totals)


class _PruneStateWithoutSample(NamedTuple):
  """``flipout.PruneState`` as checkpoints written before its ``last_update`` hold it."""

  count: Any
  masks: Any
  flips: Any


def _is_prune_state(node) -> bool:
  return isinstance(node, flipout.PruneState)


def _prune_states(tree) -> list:
  return [node for node in jax.tree.leaves(tree, is_leaf=_is_prune_state) if _is_prune_state(node)]


def _map_prune_states(tree, change, is_leaf=_is_prune_state):
  return jax.tree.map(lambda node: change(node) if is_leaf(node) else node, tree, is_leaf=is_leaf)


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


class Candidate(NamedTuple):
  """A checkpoint a run may resume from."""

  steps_done: int
  manager: ocp.CheckpointManager
  orbax_step: int
  preempted: bool

  @property
  def folder(self) -> Path:
    return Path(self.manager.directory) / str(self.orbax_step)


def _candidates(store: Store, steps_per_epoch: int) -> list[Candidate]:
  """Every complete checkpoint, newest (most steps done) first; an epoch's before a tie."""
  found = [Candidate(e * steps_per_epoch, store.epochs, e, False) for e in store.epochs.all_steps()]
  found += [Candidate(s, store.preempted, s, True) for s in store.preempted.all_steps()]
  return sorted(found, key=lambda candidate: (-candidate.steps_done, candidate.preempted))


def _set_aside(store: Store, candidate: Candidate, error: BaseException) -> None:
  """Warns naming the damaged ``candidate`` and moves it to ``damaged_checkpoints/``."""
  kind = "preempted" if candidate.preempted else "epoch"
  destination = store.workdir / DAMAGED_DIR / f"{kind}-{candidate.orbax_step}"
  while destination.exists():
    destination = destination.with_name(destination.name + "+")
  warnings.warn(
      f"checkpoint {candidate.folder} is damaged ({type(error).__name__}: "
      f"{_shortened(error)}); moved to {destination} (not deleted), resuming "
      "from an older checkpoint"
  )
  if jax.process_index() == 0:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(candidate.folder, destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set aside {destination.name}")
  candidate.manager.reload()


def resume_candidates(
    store: Store, config: config_lib.Config, steps_per_epoch: int
) -> list[Candidate]:
  """The checkpoints to resume from, newest first, once they are known to be this run's.

  Refuses to overwrite a run silently (no ``--resume``) and to continue another run's
  checkpoint: the saved config is compared before any state is built or restored, so the
  answer is one line and the old run's files are left as they are. A checkpoint whose
  metadata cannot be read is set aside with a warning (see :func:`restore_newest`).

  Raises:
    config_lib.ConfigError: checkpoints without ``--resume``, or of another run.
  """
  candidates = _candidates(store, steps_per_epoch)
  if candidates and not config.resume:
    raise config_lib.ConfigError(
        f"--workdir={config.workdir} already holds checkpoints; pass --resume to continue "
        "that run or choose another --workdir"
    )
  for candidate in candidates:
    try:
      saved = config_lib.config_from_json(
          restore_metadata(candidate.manager, candidate.orbax_step)["config"]
      )
    except Exception as error:  # any damage: unreadable, truncated, not a config
      _set_aside(store, candidate, error)
      continue
    check_resumable(saved, config)
    return candidates[candidates.index(candidate) :]
  return []


# Orbax's message when the saved tree and the one to restore into differ in structure.
_STRUCTURE_MISMATCH = "tree structures do not match"


def restore_newest(store: Store, candidates: list[Candidate], target_state, target_totals):
  """Restores the newest of ``candidates`` that restores and verifies; sets aside the others.

  Returns:
    ``(state, metadata, totals)``, totals None for an epoch checkpoint; None when
    ``candidates`` is empty.

  Raises:
    DamagedCheckpoint: every candidate is damaged (all are set aside, none deleted).
  """
  for candidate in candidates:
    try:
      if candidate.preempted:
        return restore(candidate.manager, candidate.orbax_step, target_state, target_totals)
      return (*restore(candidate.manager, candidate.orbax_step, target_state), None)
    except Exception as error:  # any damage: orbax, tensorstore, JSON or checksum errors
      if _STRUCTURE_MISMATCH in str(error):  # not damage: a state of another shape
        raise config_lib.ConfigError(
            f"the checkpoint {candidate.folder} holds a training state of another structure "
            "than these flags build (written by another version of the code?), so it was "
            "left as it is; resume it with the version that wrote it, or use another --workdir"
        ) from None
      _set_aside(store, candidate, error)
  if candidates:
    raise DamagedCheckpoint(
        f"every checkpoint of {store.workdir} is damaged (moved to {DAMAGED_DIR}/); "
        "remove --resume to start the run anew"
    )
  return None


def saved_config(workdir: str | os.PathLike) -> config_lib.Config | None:
  """The config of the newest complete checkpoint in ``workdir`` whose metadata reads; None
  when there is none.

  Reads only the metadata, and creates nothing (no folder for a workdir without one).
  """
  directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
  if not directory.is_dir():
    return None
  options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  with ocp.CheckpointManager(directory, options=options) as manager:
    # The newest whose metadata reads: a damaged newest one is what resume falls back past.
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return config_lib.config_from_json(restore_metadata(manager, step)["config"])
      except Exception:  # any damage: unreadable, truncated, not a config
        continue
    return None


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
