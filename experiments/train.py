"""The training loop shared by every experiment (CIFAR-10, MNIST, Imagenette, digits).

How a run works (the other concerns live in their own modules: ``config``, ``cli``,
``optimizers``, ``run_state``, ``checkpoints``, ``devices``, ``logs``, ``divergence``,
``preemption``):

* The data set is loaded whole (uint8) and kept on the accelerators, replicated. The order of
  epoch ``e`` is ``input_pipeline.batch_indices(seed, e, ...)``; each step gathers its batch by
  index *inside* the compiled step and crops, flips and normalises it there, so the host only
  feeds a step number. The augmentation key of step ``t`` is :func:`augmentation_key`, a stream of
  its own; the gradient noise and the random criterion draw from theirs, seeded in the
  optimizer state: every random
  choice is a function of ``(seed, epoch, step)``, which is what makes a resumed run end with
  exactly the weights, masks and flip counts of an uninterrupted one.
* The model is Flax NNX; the train step is one pure function of
  ``(state, totals, images, labels, epoch_order, step_in_epoch)``, jitted once, that merges
  the graph definition with the params/batch statistics, takes one optimizer step and returns
  the new state. ``state`` holds ``params``, ``batch_stats``, ``opt_state`` (with the pruning
  masks and flip counts) and ``step``.
* Faults: after every step the loop asks whether SIGTERM/SIGINT came (every process
  agreeing on the step); if so it saves that step, with the epoch's totals so far, and raises
  ``preemption.Preempted``. Before any save it checks that the loss stayed finite
  (``divergence``). Resuming picks the newest checkpoint that verifies (``checkpoints``).
* Data parallel over every device (see ``devices``). BatchNorm statistics are computed over
  the global batch, so the model is the same function of the data for any device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flipout_jax as flipout
from experiments import (
    checkpoints,
    devices,
    divergence,
    evaluation,
    input_pipeline,
    logs,
    optimizers,
    preemption,
    run_state,
)
from experiments import config as config_lib


def _live_sign_flips(old_params, new_params, opt_state, has_masks: bool) -> jax.Array:
  """Number of live prunable weights whose sign (with sign(0) = 0) changed in this step.

  Weights pruned at this step land on zero; they are not live afterwards and are not counted.
  """
  if has_masks:
    masks = flipout.masks(opt_state)
  else:
    masks = jax.tree.map(lambda leaf: True if jnp.ndim(leaf) >= 2 else None, old_params)

  def count(live, old, new):
    return None if live is None else jnp.sum((jnp.sign(new) != jnp.sign(old)) & live)

  counts = jax.tree.leaves(
      jax.tree.map(count, masks, old_params, new_params, is_leaf=lambda leaf: leaf is None)
  )
  return sum(counts, jnp.zeros((), jnp.int32)).astype(jnp.float32)


# Each purpose draws from its own stream: fold_in(key(seed), tag) first, then the step. The
# library's gradient noise and random criterion use tags of their own, so no two purposes
# ever share a key.
_AUGMENTATION_TAG = zlib.crc32(b"experiments/augmentation") & 0x7FFFFFFF


def augmentation_key(seed: int, step) -> jax.Array:
  """The key of the crop and flip of training step ``step`` (from 0) of a run seeded ``seed``."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENTATION_TAG), step)


def _make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    config: config_lib.Config,
    dataset: input_pipeline.Dataset,
    mesh: Mesh,
    total_steps: int,
):
  """The jitted train step ``(state, totals, images, labels, epoch_order, i) -> (state, totals)``.

  ``epoch_order[i]`` are the indices of this step's batch; the batch is gathered, augmented
  (key :func:`augmentation_key`) and normalised inside the step. ``totals`` accumulates
  the epoch's loss sum, correct predictions, example count and live sign flips on device.
  """
  pad, flip = input_pipeline.AUGMENTATION[config.dataset]
  mean, std = np.asarray(dataset.mean), np.asarray(dataset.std)
  batch_sharding = NamedSharding(mesh, P(devices.DATA_AXIS))
  replicated = NamedSharding(mesh, P())
  has_masks = optimizers.has_pruning_state(config)
  use_hoyer = config.method == "hoyer_square" and config.hoyer_lambda > 0
  hoyer_until = optimizers.hoyer_prune_step(total_steps)

  def loss_fn(params, batch_stats, images, labels, step):
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(images)
    data_loss = jnp.mean(optimizers.cross_entropy(logits, labels))
    loss = data_loss
    if use_hoyer:
      # The regulariser drives weights to zero until the one-shot prune, then stops.
      active = (step < hoyer_until).astype(jnp.float32)
      loss = loss + active * config.hoyer_lambda * flipout.hoyer_square(params)
    new_batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return loss, (data_loss, logits, new_batch_stats)

  def train_step(state, totals, images, labels, epoch_order, step_in_epoch):
    indices = jax.lax.with_sharding_constraint(epoch_order[step_in_epoch], batch_sharding)
    batch_images = jax.lax.with_sharding_constraint(images[indices], batch_sharding)
    batch_labels = jax.lax.with_sharding_constraint(labels[indices], batch_sharding)
    if pad or flip:  # digits and MNIST are not augmented: no key, no random bits
      key = augmentation_key(config.seed, state["step"])
      batch_images = input_pipeline.augment(batch_images, key, pad=pad, flip=flip)
    inputs = input_pipeline.normalize(batch_images, mean, std)
    params = state["params"]
    grads, (data_loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        params, state["batch_stats"], inputs, batch_labels, state["step"]
    )
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    flips = _live_sign_flips(params, new_params, opt_state, has_masks)
    batch_size = batch_labels.shape[0]
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == batch_labels)
    new_state = {
        "params": new_params,
        "batch_stats": batch_stats,
        "opt_state": opt_state,
        "step": state["step"] + 1,
    }
    new_totals = {
        "loss": totals["loss"] + data_loss * batch_size,
        "correct": totals["correct"] + correct,
        "count": totals["count"] + batch_size,
        "flips": totals["flips"] + flips,
        "first_nonfinite_loss": divergence.first_nonfinite_loss_step(
            totals["first_nonfinite_loss"], data_loss, new_state["step"]
        ),
    }
    return (
        jax.lax.with_sharding_constraint(new_state, replicated),
        jax.lax.with_sharding_constraint(new_totals, replicated),
    )

  return jax.jit(train_step, donate_argnums=(1,))


def _zero_totals() -> dict[str, np.ndarray]:
  return {
      "loss": np.float32(0),
      "correct": np.int32(0),
      "count": np.int32(0),
      "flips": np.float32(0),
      "first_nonfinite_loss": np.int32(divergence.NO_STEP),
  }


@contextlib.contextmanager
def _quiet_absl_warnings():
  """tfds logs absl warnings about half-prepared folders before its error; the error we print
  says it all, and the command line promises one line."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def load_dataset(config: config_lib.Config) -> input_pipeline.Dataset:
  """The data set of ``config`` (split seeded by ``data_seed``, else ``seed``), loaded offline."""
  with _quiet_absl_warnings():
    return input_pipeline.load(
        config.dataset,
        data_dir=config.data_dir,
        synthetic=config.synthetic,
        seed=config.seed if config.data_seed is None else config.data_seed,
        synthetic_train=config.synthetic_train,
        synthetic_test=config.synthetic_test,
    )


def _check_batch_sizes(
    config: config_lib.Config, num_train: int, num_test: int, num_devices: int
) -> int:
  """Validates the batch sizes against data and devices; returns the eval batch size."""
  if config.batch_size % num_devices:
    raise config_lib.ConfigError(
        f"--batch_size={config.batch_size} must be divisible by the {num_devices} devices "
        f"(each gets an equal share); use a multiple of {num_devices}"
    )
  if config.batch_size > num_train:
    raise config_lib.ConfigError(
        f"--batch_size={config.batch_size} is larger than the {num_train} training images"
    )
  # A multiple of the device count (padding is weighted out), no larger than the test set.
  eval_batch_size = min(config.eval_batch_size, num_test)
  return math.ceil(eval_batch_size / num_devices) * num_devices


class Plan(NamedTuple):
  """The shape of a run, fixed by its config, its data and the devices."""

  input_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  steps_per_epoch: int
  total_steps: int
  eval_batch_size: int


def _plan(config: config_lib.Config, dataset: input_pipeline.Dataset, mesh: Mesh) -> Plan:
  num_train = len(dataset.train_labels)
  eval_batch_size = _check_batch_sizes(config, num_train, len(dataset.test_labels), mesh.size)
  steps_per_epoch = num_train // config.batch_size
  return Plan(
      input_shape=tuple(int(size) for size in dataset.train_images.shape[1:]),
      num_train=num_train,
      num_test=len(dataset.test_labels),
      steps_per_epoch=steps_per_epoch,
      total_steps=config.epochs * steps_per_epoch,
      eval_batch_size=eval_batch_size,
  )


def train(config: config_lib.Config) -> dict[str, Any]:
  """Runs (or resumes) one training run and returns its final metrics.

  Returns:
    The content of ``summary.json``: ``config``, ``synthetic``, ``test_accuracy``,
    ``test_loss``, ``train_accuracy``, ``train_loss``, ``sparsity`` (of the prunable
    weights), ``prunable_weights``, ``live_weights``, ``dense_flops``, ``live_flops``,
    ``epochs``, ``steps``, ``devices``, ``seconds`` and ``layers`` (flipout.summary).

  Raises:
    config_lib.ConfigError: bad input found once data and devices are known, or a workdir that holds
      another run (or only damaged checkpoints: ``checkpoints.DamagedCheckpoint``).
    input_pipeline.DatasetUnavailableError: the data set cannot be loaded offline.
    preemption.Preempted: SIGTERM/SIGINT; the step reached was saved (``--resume``).
    divergence.TrainingDiverged: a non-finite loss or state under ``--on_nonfinite=stop``.
    checkpoints.CheckpointSaveError: a checkpoint could not be written.
  """
  config_lib.validate_config(config)
  devices.maybe_initialize_distributed(config)
  started = time.perf_counter()
  if config.workdir is None:
    config = dataclasses.replace(config, workdir=config_lib.default_workdir(config))
  workdir = Path(config.workdir)
  mesh = devices.make_mesh()
  replicated = NamedSharding(mesh, P())
  dataset = load_dataset(config)
  plan = _plan(config, dataset, mesh)
  is_main = jax.process_index() == 0

  store = checkpoints.open_store(workdir, config)
  try:
    candidates = checkpoints.resume_candidates(store, config, plan.steps_per_epoch)
    first_order = input_pipeline.batch_indices(config.seed, 0, plan.num_train, config.batch_size)
    setup = run_state.build_setup(
        config,
        plan.input_shape,
        dataset.num_classes,
        plan.steps_per_epoch,
        snip_batch_source=(dataset, first_order),
    )
    state = devices.place_tree(setup.state, replicated)
    start_step, start_totals = 0, None
    restored = checkpoints.restore_newest(
        store, candidates, state, devices.place_tree(_zero_totals(), replicated)
    )
    if restored is not None:
      state, metadata, start_totals = restored
      start_step = int(metadata["step"])
    start_epoch = start_step // plan.steps_per_epoch
    data = devices.DeviceData(
        *(
            devices.place(array, replicated)
            for array in (
                dataset.train_images,
                dataset.train_labels,
                dataset.test_images,
                dataset.test_labels,
                dataset.mean,
                dataset.std,
            )
        )
    )
    if is_main:
      workdir.mkdir(parents=True, exist_ok=True)
      if config.progress:
        logs.announce(config, plan.steps_per_epoch, mesh.size, start_step)
    state, record = _train_epochs(
        config, plan, setup, mesh, data, store, (state, start_step, start_totals), dataset
    )
  finally:
    checkpoints.close_store(store)

  if record is None:  # resumed a finished run: report its last epoch again
    record = logs.last_record(workdir / logs.METRICS_FILE, start_epoch)
  if record is None:  # ... whose metrics file is gone: evaluate the restored state
    test_loss, test_accuracy = evaluation.evaluate(
        setup.graphdef_eval,
        mesh,
        state,
        data,
        evaluation.test_batches(plan.num_test, plan.eval_batch_size, mesh),
    )
    record = {
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "train_loss": None,
        "train_accuracy": None,
    }
  params = devices.to_host(state["params"])
  model = nnx.merge(setup.graphdef_eval, params, devices.to_host(state["batch_stats"]))
  summary = logs.run_summary(
      config,
      params,
      model,
      record,
      input_shape=plan.input_shape,
      total_steps=plan.total_steps,
      num_devices=mesh.size,
      seconds=time.perf_counter() - started,
  )
  if is_main:
    (workdir / logs.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _train_epochs(
    config: config_lib.Config,
    plan: Plan,
    setup: run_state.Setup,
    mesh: Mesh,
    data: devices.DeviceData,
    store: checkpoints.Store,
    start,
    dataset: input_pipeline.Dataset,
):
  """Trains from ``start`` to ``config.epochs``: train, evaluate, log, checkpoint.

  ``start`` is ``(state, steps done, the epoch's totals so far or None)``; a run preempted
  mid-epoch resumes inside that epoch. Returns the final state and the last epoch's record
  (None when no epoch was left).

  Raises:
    preemption.Preempted: SIGTERM/SIGINT; the checkpoint of the step reached is saved.
    divergence.TrainingDiverged: a non-finite loss or state under ``--on_nonfinite=stop``.
    checkpoints.CheckpointSaveError: a checkpoint could not be written.
  """
  state, start_step, start_totals = start
  start_epoch, start_in_epoch = divmod(start_step, plan.steps_per_epoch)
  replicated = NamedSharding(mesh, P())
  order_sharding = NamedSharding(mesh, P(None, devices.DATA_AXIS))
  train_step = _make_train_step(
      setup.graphdef_train, setup.tx, config, dataset, mesh, plan.total_steps
  )
  eval_batches = evaluation.test_batches(plan.num_test, plan.eval_batch_size, mesh)
  metadata = {
      "config": config_lib.config_to_json(config),
      "input_shape": list(plan.input_shape),
      "num_classes": dataset.num_classes,
      "steps_per_epoch": plan.steps_per_epoch,
      "synthetic": config.synthetic,
  }
  metrics_writer = logs.MetricsWriter(
      Path(config.workdir), config, start_epoch, start_epoch * plan.steps_per_epoch
  )
  show = config.progress and jax.process_index() == 0
  record = None
  with preemption.Watch() as watch:
    try:
      for epoch in range(start_epoch + 1, config.epochs + 1):
        epoch_started = time.perf_counter()
        # The data order is a function of (seed, epoch) alone, so a resumed run replays it.
        order = input_pipeline.batch_indices(
            config.seed, epoch - 1, plan.num_train, config.batch_size
        )
        epoch_order = devices.place(order, order_sharding)
        resumed = epoch == start_epoch + 1 and start_totals is not None
        totals = start_totals if resumed else devices.place_tree(_zero_totals(), replicated)
        first = start_in_epoch if resumed else 0
        preempted = False
        for step_in_epoch in logs.progress(plan.steps_per_epoch, epoch, config, show, first):
          state, totals = train_step(
              state,
              totals,
              data.train_images,
              data.train_labels,
              epoch_order,
              np.int32(step_in_epoch),
          )
          steps_done = (epoch - 1) * plan.steps_per_epoch + step_in_epoch + 1
          # Asked after every step, on every process: they must agree on the step.
          preempted = watch.reached(steps_done)
          if preempted and step_in_epoch + 1 < plan.steps_per_epoch:
            _save_preempted(config, store, state, totals, steps_done, epoch, metadata)
            raise preemption.Preempted(
                steps_done, epoch - 1, step_in_epoch + 1, plan.steps_per_epoch
            )
        step = epoch * plan.steps_per_epoch
        host_totals = devices.to_host(totals)
        _check_finite(config, store, host_totals, state, step, epoch)
        test_loss, test_accuracy = evaluation.evaluate(
            setup.graphdef_eval, mesh, state, data, eval_batches
        )
        record = logs.epoch_record(
            epoch,
            step,
            host_totals,
            test_loss,
            test_accuracy,
            sparsity=flipout.sparsity(devices.to_host(state["params"])),
            lr=optimizers.learning_rate_at(config, plan.steps_per_epoch, step - 1),
            steps=plan.steps_per_epoch,
            seconds=time.perf_counter() - epoch_started,
            synthetic=config.synthetic,
        )
        metrics_writer.write(record, step)
        if show:
          print(logs.format_record(record, config.epochs), flush=True)
        every = config.checkpoint_every_epochs
        if epoch == config.epochs or (every and epoch % every == 0) or preempted:
          checkpoints.save_to_store(
              store,
              epoch,
              state,
              {
                  **metadata,
                  "epoch": epoch,
                  "step": step,
                  "data_order": {"seed": config.seed, "next_epoch": epoch},
              },
          )
        if preempted and epoch < config.epochs:  # on the epoch's last step
          checkpoints.finish_saving(store)
          raise preemption.Preempted(step, epoch, 0, plan.steps_per_epoch)
    finally:
      metrics_writer.close()
  return state, record


def _save_preempted(config, store, state, totals, steps_done: int, epoch: int, metadata) -> None:
  """Saves the state and the epoch's totals after ``steps_done`` steps, inside ``epoch``."""
  host_totals = devices.to_host(totals)
  _check_finite(config, store, host_totals, state, steps_done, epoch)
  checkpoints.save_to_store(
      store,
      steps_done,
      state,
      {
          **metadata,
          "epoch": epoch - 1,
          "step": steps_done,
          "data_order": {"seed": config.seed, "next_epoch": epoch - 1},
      },
      preempted_totals=totals,
  )


def _check_finite(config, store, host_totals, state, step: int, epoch: int) -> None:
  """Stops (``--on_nonfinite=stop``) or warns when the loss or the weights went non-finite.

  Called before the state of ``step`` is saved, so a non-finite state never becomes a
  checkpoint.

  Raises:
    divergence.TrainingDiverged: the one-line reason, under ``--on_nonfinite=stop``.
  """
  weights = devices.to_host({"params": state["params"], "batch_stats": state["batch_stats"]})
  cause = divergence.nonfinite_cause(host_totals["first_nonfinite_loss"], weights, step)
  if cause is None:
    return
  if config.on_nonfinite == "continue":
    warnings.warn(f"{cause} (epoch {epoch}); training on (--on_nonfinite=continue)")
    return
  checkpoints.finish_saving(store)
  newest = store.epochs.latest_step()
  if newest is None:
    kept = "no checkpoint was saved"
  else:
    kept = f"the newest checkpoint (epoch {newest}) is the last finite state"
  raise divergence.TrainingDiverged(
      f"training diverged: {cause} (epoch {epoch}); stopped without saving it, {kept}; "
      "lower --lr, or pass --on_nonfinite=continue to train on"
  )


def lower_train_step(config: config_lib.Config) -> jax.stages.Lowered:
  """Traces and lowers the train step of ``config`` without data, running or compiling.

  Shapes come from the data set's synthetic stand-in (``synthetic_train`` images of the real
  shape); the state is abstract (nothing is initialised). Checks that a configuration builds
  end to end (model, optimizer chain, sharding) without the minutes an XLA compile of a
  large model takes on CPU; ``.compile()`` on the result gives the executable (cost and
  memory analysis).
  """
  config_lib.validate_config(config)
  dataset = load_dataset(dataclasses.replace(config, synthetic=True))
  mesh = devices.make_mesh()
  plan = _plan(config, dataset, mesh)
  setup = run_state.build_setup(
      config, plan.input_shape, dataset.num_classes, plan.steps_per_epoch, abstract=True
  )
  replicated = NamedSharding(mesh, P())

  def abstract(shape, dtype, sharding=replicated):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  state = jax.tree.map(lambda leaf: abstract(leaf.shape, leaf.dtype), setup.state)
  totals = jax.tree.map(lambda leaf: abstract((), leaf.dtype), _zero_totals())
  train_step = _make_train_step(
      setup.graphdef_train, setup.tx, config, dataset, mesh, plan.total_steps
  )
  return train_step.lower(
      state,
      totals,
      abstract(dataset.train_images.shape, jnp.uint8),
      abstract((plan.num_train,), jnp.int32),
      abstract(
          (plan.steps_per_epoch, config.batch_size),
          jnp.int32,
          NamedSharding(mesh, P(None, devices.DATA_AXIS)),
      ),
      abstract((), jnp.int32),
  )
