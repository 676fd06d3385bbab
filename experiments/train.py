"""The one training loop shared by every experiment (CIFAR-10, MNIST, Imagenette, digits).

Each entry point (``experiments.cifar``, ``experiments.mnist``, ...) is a :class:`Config` of
defaults handed to :func:`main`; everything else lives here, as in the Flax ImageNet example.

How a run works:

* The data set is loaded whole (uint8) and kept on the accelerators, replicated. The order of
  epoch ``e`` is ``input_pipeline.batch_indices(seed, e, ...)``; each step gathers its batch by
  index *inside* the compiled step and crops, flips and normalises it there, so the host only
  feeds a step number. The augmentation key of step ``t`` is ``fold_in(key(seed), t)``, the
  gradient noise and the random criterion are seeded in the optimizer state: every random
  choice is a function of ``(seed, epoch, step)``, which is what makes a resumed run end with
  exactly the weights, masks and flip counts of an uninterrupted one.
* The model is Flax NNX; the train step is one pure function of
  ``(state, totals, images, labels, epoch_order, step_in_epoch)``, jitted once, that merges
  the graph definition with the params/batch statistics, takes one optimizer step and returns
  the new state. ``state`` holds ``params``, ``batch_stats``, ``opt_state`` (with the pruning
  masks and flip counts) and ``step``.
* Data parallel over every device (``jax.devices()``, all hosts): a 1-D mesh ``("data",)``,
  the batch sharded along it, params and optimizer state replicated; XLA inserts the gradient
  all-reduce. BatchNorm statistics are computed over the global batch, so the model is the
  same function of the data for any device count.
* Optimizer per method (coupled weight decay, added to the gradient before momentum, as
  PyTorch's SGD and the paper do; the learning rate is ``lr * 0.1^(milestones passed)``)::

    flipout            gradient_noise -> add_decayed_weights -> sgd -> prune(criterion="flipout")
    global_magnitude   add_decayed_weights -> sgd -> prune(criterion="global_magnitude")
    magnitude          add_decayed_weights -> sgd -> prune(criterion="magnitude")   (layer-wise)
    random             add_decayed_weights -> sgd -> prune(criterion="random")
    snip               add_decayed_weights -> sgd -> fixed_masks(snip(loss, params, batch 0))
    hoyer_square       loss + hoyer_lambda * hoyer_square(params) until the prune step, then
                       add_decayed_weights -> sgd -> one-shot magnitude pruning (see below)
    dense              add_decayed_weights -> sgd

  Hoyer-Square prunes once, at step ``round(T / 2)`` of the ``T`` steps, every weight whose
  magnitude is below a threshold, and trains on with the mask fixed and without the
  regulariser. With ``hoyer_threshold`` unset (the default) the threshold is the one that
  reaches ``sparsity`` exactly: the ``round(sparsity * N)``-th smallest ``|w|`` over all
  prunable weights at that step. That is one global-magnitude event, so it is implemented
  as ``prune(sparsity, criterion="global_magnitude")`` with a rate above the target (one event,
  landing exactly on the target). With ``hoyer_threshold`` set, ``prune_below(threshold)``
  is used instead, as the paper's reference code did, and the sparsity is whatever it gives.
* Checkpoints (orbax ``CheckpointManager``): state and run metadata after every
  ``checkpoint_every_epochs`` epochs and at the end, keeping the newest ``keep_checkpoints``.
  Orbax writes into a temporary directory and renames it when complete, so a write cut short
  never replaces the previous checkpoint; pending asynchronous writes are waited on before
  the run returns.
* Logs under ``workdir``: ``metrics.jsonl`` (one line per epoch), TensorBoard scalars in
  ``tensorboard/``, ``summary.json`` at the end (config, final accuracy, per-layer sparsity,
  dense vs live inference FLOPs). Runs on ``--synthetic`` data are marked ``"synthetic": true``
  in both files and in the printed result so they are never mistaken for results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
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
from experiments import input_pipeline, models

METHODS: tuple[str, ...] = (
    "flipout",
    "global_magnitude",
    "magnitude",
    "random",
    "snip",
    "hoyer_square",
    "dense",
)
# Methods that prune on a schedule with flipout.prune, and the criterion each one uses.
_SCHEDULED_CRITERIA = {
    "flipout": "flipout",
    "global_magnitude": "global_magnitude",
    "magnitude": "magnitude",
    "random": "random",
}
_DATA_AXIS = "data"
_CHECKPOINT_DIR = "checkpoints"
_METRICS_FILE = "metrics.jsonl"
_SUMMARY_FILE = "summary.json"
_TENSORBOARD_DIR = "tensorboard"
# Fields that may differ between a run and its resumption: they do not change what is computed.
_RESUMABLE_FIELDS = (
    "workdir",
    "resume",
    "progress",
    "tensorboard",
    "data_dir",
    "eval_batch_size",
    "checkpoint_every_epochs",
    "keep_checkpoints",
)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run. Defaults: the paper's VGG19 / CIFAR-10 run at 99.9%.

  Attributes:
    dataset: one of ``input_pipeline.DATASET_NAMES``.
    model: one of ``models.MODEL_NAMES``.
    method: one of :data:`METHODS`.
    sparsity: target fraction of prunable weights (kernels) pruned at the end, in [0, 1);
      ignored by ``dense``.
    epochs: training epochs (>= 1).
    batch_size: global batch size, divisible by the number of devices.
    eval_batch_size: global batch size of the test-set evaluation.
    lr: initial SGD learning rate.
    milestones: epochs after which the learning rate is multiplied by 0.1.
    momentum: SGD momentum.
    weight_decay: coupled L2 weight decay (added to the gradient before momentum).
    noise_scale: the paper's lambda for the gradient noise (``flipout`` only).
    p: exponent of ``|w|`` in the FlipOut saliency ``|w|^p / (flips + 1)``.
    prune_rate: fraction of the live weights pruned at each event but the last.
    hoyer_lambda: weight of the Hoyer-Square regulariser (``hoyer_square`` only).
    hoyer_threshold: fixed magnitude threshold for ``hoyer_square``; None: the threshold
      that reaches ``sparsity`` exactly.
    seed: seeds the initialisation, the data order, augmentation and noise.
    data_seed: seeds the train/test split of ``digits`` and ``mnist_t10k`` and the synthetic
      data; None: ``seed``. Fix it to compare seeds on one split.
    workdir: output folder; None: ``runs/<dataset>-<model>-<method>-<sparsity>-seed<seed>``.
    resume: continue from the newest checkpoint in ``workdir``.
    synthetic: random data of the data set's true shapes (smoke tests, speed); marked as
      such in every output.
    synthetic_train: number of synthetic training images.
    synthetic_test: number of synthetic test images.
    data_dir: where the data set lives (tfds data dir, or the mnist_t10k folder).
    checkpoint_every_epochs: checkpoint period in epochs; 0: only at the end of the run.
    keep_checkpoints: how many checkpoints to keep.
    progress: show a progress bar and print one line per epoch.
    tensorboard: write TensorBoard scalars.
  """

  dataset: str = "cifar10"
  model: str = "vgg19"
  method: str = "flipout"
  sparsity: float = 0.999
  epochs: int = 350
  batch_size: int = 128
  eval_batch_size: int = 1000
  lr: float = 0.1
  milestones: tuple[int, ...] = (150, 250)
  momentum: float = 0.9
  weight_decay: float = 5e-4
  noise_scale: float = 1.0
  p: float = 2.0
  prune_rate: float = 0.5
  hoyer_lambda: float = 1e-6
  hoyer_threshold: float | None = None
  seed: int = 0
  data_seed: int | None = None
  workdir: str | None = None
  resume: bool = False
  synthetic: bool = False
  synthetic_train: int = 512
  synthetic_test: int = 256
  data_dir: str | None = None
  checkpoint_every_epochs: int = 1
  keep_checkpoints: int = 3
  progress: bool = True
  tensorboard: bool = True


class ConfigError(ValueError):
  """Bad user input for a run; the message is one line saying what is wrong and what to do."""


def default_workdir(config: Config) -> str:
  """``runs/<dataset>-<model>-<method>-<sparsity>-seed<seed>[-synthetic]``."""
  sparsity = "dense" if config.method == "dense" else f"{config.sparsity:g}"
  name = f"{config.dataset}-{config.model}-{config.method}-{sparsity}-seed{config.seed}"
  return str(Path("runs") / (name + ("-synthetic" if config.synthetic else "")))


def validate_config(config: Config, allowed_models: Sequence[str] = models.MODEL_NAMES) -> None:
  """Raises :class:`ConfigError` (one line: what is wrong, what is allowed) for bad input.

  Checks what can be checked without data: names, ranges, the milestones. The data set
  itself, the batch size against the device count and the data size, and whether the
  schedule is long enough for its pruning events are checked by :func:`train`.
  """
  _check_choice("dataset", config.dataset, input_pipeline.DATASET_NAMES)
  _check_choice("model", config.model, tuple(allowed_models))
  _check_choice("method", config.method, METHODS)
  if not 0.0 <= config.sparsity < 1.0:
    raise ConfigError(f"--sparsity must be in [0, 1) (e.g. 0.999), got {config.sparsity}")
  for name in (
      "epochs",
      "batch_size",
      "eval_batch_size",
      "keep_checkpoints",
      "synthetic_train",
      "synthetic_test",
  ):
    _check_int(name, getattr(config, name), minimum=1)
  _check_int("checkpoint_every_epochs", config.checkpoint_every_epochs, minimum=0)
  _check_int("seed", config.seed, minimum=0)
  if config.data_seed is not None:
    _check_int("data_seed", config.data_seed, minimum=0)
  if not config.lr > 0:
    raise ConfigError(f"--lr must be > 0, got {config.lr}")
  if not 0.0 <= config.momentum < 1.0:
    raise ConfigError(f"--momentum must be in [0, 1), got {config.momentum}")
  for name in ("weight_decay", "noise_scale", "hoyer_lambda"):
    if not getattr(config, name) >= 0:
      raise ConfigError(f"--{name} must be >= 0, got {getattr(config, name)}")
  if not config.p > 0:
    raise ConfigError(f"--p must be > 0, got {config.p}")
  if not 0.0 < config.prune_rate < 1.0:
    raise ConfigError(f"--prune_rate must be in (0, 1), got {config.prune_rate}")
  if config.hoyer_threshold is not None and not config.hoyer_threshold >= 0:
    raise ConfigError(f"--hoyer_threshold must be >= 0, got {config.hoyer_threshold}")
  milestones = tuple(config.milestones)
  if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) or any(
      later <= earlier for earlier, later in zip(milestones, milestones[1:])
  ):
    raise ConfigError(
        "--milestones must be strictly increasing positive epochs like 150,250; "
        f"got {milestones}"
    )


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_int(name: str, value, *, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"--{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one stderr line (no usage block) and exit status 2."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_milestones(text: str) -> tuple[int, ...]:
  """``"150,250"`` -> ``(150, 250)``; ``""`` -> no learning-rate decay."""
  try:
    return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"milestones must be comma-separated epochs like 150,250; got {text!r}"
    ) from None


def _optional_float(text: str) -> float | None:
  return None if text.lower() in ("", "none") else float(text)


# Flags that set the Config field of their name: (name, parser, help).
_VALUE_FLAGS = (
    ("sparsity", float, "final fraction of prunable weights pruned, in [0, 1)"),
    ("epochs", int, "training epochs"),
    ("batch_size", int, "global batch size (divisible by the device count)"),
    ("eval_batch_size", int, "global batch size of the test evaluation"),
    ("lr", float, "initial SGD learning rate"),
    (
        "milestones",
        _parse_milestones,
        "comma-separated epochs after which the learning rate is multiplied by 0.1",
    ),
    ("momentum", float, "SGD momentum"),
    ("weight_decay", float, "coupled L2 weight decay (added to the gradient before momentum)"),
    ("noise_scale", float, "gradient noise scale lambda (flipout)"),
    ("p", float, "exponent of the FlipOut saliency |w|^p / (flips + 1)"),
    ("prune_rate", float, "fraction of live weights pruned per event"),
    ("hoyer_lambda", float, "Hoyer-Square regulariser weight (hoyer_square)"),
    (
        "hoyer_threshold",
        _optional_float,
        "fixed Hoyer-Square pruning threshold; none: the one reaching --sparsity",
    ),
    ("seed", int, "seed of everything random"),
    (
        "data_seed",
        int,
        "seed of the digits/mnist_t10k split and of synthetic data " "(None: --seed)",
    ),
    ("workdir", str, "output folder (None: runs/<dataset>-<model>-<method>-<sparsity>-seed<seed>)"),
    ("synthetic_train", int, "synthetic training images"),
    ("synthetic_test", int, "synthetic test images"),
    ("data_dir", str, "tfds data dir (or the mnist_t10k folder)"),
    ("checkpoint_every_epochs", int, "checkpoint period in epochs (0: only at the end)"),
    ("keep_checkpoints", int, "checkpoints kept"),
)
_SWITCHES = (
    ("resume", "continue from the newest checkpoint in --workdir"),
    ("synthetic", "random data of the right shapes, for smoke tests and speed (never a result)"),
)
_ON_OFF_SWITCHES = (
    ("progress", "progress bar and one line per epoch"),
    ("tensorboard", "write TensorBoard scalars"),
)


def build_parser(
    defaults: Config,
    allowed_models: Sequence[str] = models.MODEL_NAMES,
    *,
    allowed_datasets: Sequence[str] = (),
    prog: str | None = None,
) -> argparse.ArgumentParser:
  """The shared command line; every flag defaults to the entry point's :class:`Config`.

  Args:
    defaults: the entry point's configuration (e.g. the paper's VGG19 run for cifar).
    allowed_models: the ``--model`` choices of this entry point.
    allowed_datasets: if given, a ``--dataset`` flag with these choices.
    prog: program name shown in help and errors.
  """
  parser = OneLineParser(
      prog=prog,
      description=f"Train {', '.join(allowed_models)} on {defaults.dataset} with FlipOut or a "
      "baseline pruning method. Defaults reproduce the entry point's paper run.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  add = parser.add_argument
  if allowed_datasets:
    add("--dataset", default=defaults.dataset, choices=tuple(allowed_datasets), help="data set")
  add("--model", default=defaults.model, choices=tuple(allowed_models), help="network")
  add("--method", default=defaults.method, choices=METHODS, help="pruning method")
  for name, parse, help_text in _VALUE_FLAGS:
    add(f"--{name}", type=parse, default=getattr(defaults, name), help=help_text)
  for name, help_text in _SWITCHES:
    add(f"--{name}", action="store_true", default=getattr(defaults, name), help=help_text)
  for name, help_text in _ON_OFF_SWITCHES:
    add(
        f"--{name}",
        action=argparse.BooleanOptionalAction,
        default=getattr(defaults, name),
        help=help_text,
    )
  return parser


def main(
    argv: Sequence[str] | None,
    defaults: Config,
    allowed_models: Sequence[str] = models.MODEL_NAMES,
    *,
    allowed_datasets: Sequence[str] = (),
    prog: str | None = None,
) -> int:
  """Command-line entry: parse, validate, train. Returns the exit status.

  Bad input (unknown model or method, sparsity outside [0, 1), epochs < 1, bad milestones,
  a data set that cannot be loaded offline, ...) prints one line to stderr and returns 2;
  ``--help`` returns 0.

  Args:
    argv: the arguments (None: ``sys.argv[1:]``).
    defaults, allowed_models, allowed_datasets, prog: see :func:`build_parser`.
  """
  parser = build_parser(defaults, allowed_models, allowed_datasets=allowed_datasets, prog=prog)
  try:
    args = parser.parse_args(argv)
  except SystemExit as exit_request:  # --help, or the one-line argparse error
    return int(exit_request.code or 0)
  config = dataclasses.replace(defaults, **vars(args))
  try:
    validate_config(config, allowed_models)
    train(config)
  except (ConfigError, input_pipeline.DatasetUnavailableError) as error:
    print(f"{parser.prog}: error: {_one_line(error)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{parser.prog}: interrupted; continue with --resume", file=sys.stderr)
    return 130
  return 0


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())


# ---------------------------------------------------------------------------------------------
# Devices and data placement.
# ---------------------------------------------------------------------------------------------


def _maybe_initialize_distributed() -> None:
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


def _make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (_DATA_AXIS,))


def _place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds whole (works multi-host too)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _place_tree(tree, sharding: NamedSharding):
  return jax.tree.map(lambda leaf: _place(np.asarray(leaf), sharding), tree)


class _DeviceData(NamedTuple):
  """The whole data set on the devices (replicated) with its normalisation statistics."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  mean: jax.Array
  std: jax.Array


# ---------------------------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """``lr * 0.1^k`` at step ``t`` (from 0), ``k`` = #milestones ``m`` with
  ``t >= m * steps_per_epoch``."""
  boundaries = {int(m) * steps_per_epoch: 0.1 for m in config.milestones}
  return optax.piecewise_constant_schedule(config.lr, boundaries)


def _learning_rate_at(config: Config, steps_per_epoch: int, step: int) -> float:
  """The schedule's value at ``step``, computed on the host (for logs)."""
  passed = sum(step >= int(m) * steps_per_epoch for m in config.milestones)
  return config.lr * 0.1**passed


def hoyer_prune_step(total_steps: int) -> int:
  """The step at which ``hoyer_square`` prunes once: the middle of the run."""
  return max(1, round(total_steps / 2))


def _pruning_transform(
    config: Config, total_steps: int, snip_masks
) -> optax.GradientTransformation | None:
  """The last link of the chain: how (and whether) the method prunes."""
  method = config.method
  if method == "dense":
    return None
  if method in _SCHEDULED_CRITERIA:
    return flipout.prune(
        config.sparsity,
        total_steps=total_steps,
        rate=config.prune_rate,
        p=config.p,
        criterion=_SCHEDULED_CRITERIA[method],
        seed=config.seed,
    )
  if method == "snip":
    return flipout.fixed_masks(snip_masks)
  if config.hoyer_threshold is not None:
    return flipout.prune_below(config.hoyer_threshold, step=hoyer_prune_step(total_steps))
  # One global-magnitude event at round(T / 2) (a rate above the target means one event),
  # landing exactly on round(sparsity * N): pruning below the target's magnitude quantile.
  return flipout.prune(
      config.sparsity,
      total_steps=total_steps,
      rate=(1.0 + config.sparsity) / 2.0,
      criterion="global_magnitude",
  )


def build_optimizer(
    config: Config, steps_per_epoch: int, snip_masks=None
) -> optax.GradientTransformation:
  """The method's Optax chain (see the module docstring); ``snip_masks`` for ``snip``.

  Raises:
    ConfigError: the schedule is too short for the pruning events the target needs.
  """
  total_steps = config.epochs * steps_per_epoch
  links = []
  if config.method == "flipout":
    links.append(flipout.gradient_noise(config.noise_scale, seed=config.seed))
  links += [
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum),
  ]
  try:
    pruning = _pruning_transform(config, total_steps, snip_masks)
  except ValueError as error:
    raise ConfigError(
        f"{config.epochs} epochs of {steps_per_epoch} steps cannot reach --sparsity="
        f"{config.sparsity} with --prune_rate={config.prune_rate}: {_one_line(error)}; "
        "train for more epochs or lower --sparsity"
    ) from None
  if pruning is not None:
    links.append(pruning)
  return optax.chain(*links)


def _has_pruning_state(config: Config) -> bool:
  return config.method != "dense"


# ---------------------------------------------------------------------------------------------
# Compiled steps.
# ---------------------------------------------------------------------------------------------


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy ``-log softmax(logits)[label]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


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


def _make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    config: Config,
    dataset: input_pipeline.Dataset,
    mesh: Mesh,
    total_steps: int,
):
  """The jitted train step ``(state, totals, images, labels, epoch_order, i) -> (state, totals)``.

  ``epoch_order[i]`` are the indices of this step's batch; the batch is gathered, augmented
  (key ``fold_in(key(seed), step)``) and normalised inside the step. ``totals`` accumulates
  the epoch's loss sum, correct predictions, example count and live sign flips on device.
  """
  pad, flip = input_pipeline.AUGMENTATION[config.dataset]
  mean, std = np.asarray(dataset.mean), np.asarray(dataset.std)
  base_key = jax.random.key(config.seed)
  batch_sharding = NamedSharding(mesh, P(_DATA_AXIS))
  replicated = NamedSharding(mesh, P())
  has_masks = _has_pruning_state(config)
  use_hoyer = config.method == "hoyer_square" and config.hoyer_lambda > 0
  hoyer_until = hoyer_prune_step(total_steps)

  def loss_fn(params, batch_stats, images, labels, step):
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(images)
    data_loss = jnp.mean(_cross_entropy(logits, labels))
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
      key = jax.random.fold_in(base_key, state["step"])
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
  }


@functools.partial(jax.jit, static_argnames=("graphdef_eval", "batch_sharding"))
def _eval_sums(
    params, batch_stats, data: _DeviceData, indices, weights, *, graphdef_eval, batch_sharding
):
  """Summed test loss and correct predictions of one test batch (padding has weight 0).

  Module-level and keyed by the graph definition, so runs of the same model in one process
  (the digits demo) compile it once.
  """
  indices = jax.lax.with_sharding_constraint(indices, batch_sharding)
  inputs = input_pipeline.normalize(data.test_images[indices], data.mean, data.std)
  logits = nnx.merge(graphdef_eval, params, batch_stats)(inputs)
  batch_labels = data.test_labels[indices]
  loss = jnp.sum(_cross_entropy(logits, batch_labels) * weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch_labels) * weights)
  return loss, correct


def _eval_batches(plan: _Plan, mesh: Mesh) -> tuple[list[jax.Array], list[jax.Array]]:
  """Test indices and weights in batches, the last one padded with weight 0, on device."""
  num_examples = plan.num_test
  batch_size = plan.eval_batch_size
  num_batches = math.ceil(num_examples / batch_size)
  padded = np.zeros(num_batches * batch_size, np.int32)
  padded[:num_examples] = np.arange(num_examples)
  weights = np.zeros(num_batches * batch_size, np.float32)
  weights[:num_examples] = 1.0
  sharding = NamedSharding(mesh, P(_DATA_AXIS))
  return (
      [_place(row, sharding) for row in padded.reshape(num_batches, batch_size)],
      [_place(row, sharding) for row in weights.reshape(num_batches, batch_size)],
  )


def _evaluate(
    graphdef_eval, mesh: Mesh, state, data: _DeviceData, eval_batches
) -> tuple[float, float]:
  """Mean test loss and accuracy over the whole test set."""
  batch_sharding = NamedSharding(mesh, P(_DATA_AXIS))
  sums = [
      _eval_sums(
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
  for loss, correct in jax.device_get(sums):
    loss_sum += float(loss)
    correct_sum += float(correct)
  count = int(data.test_labels.shape[0])
  return loss_sum / count, correct_sum / count


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------


def config_to_json(config: Config) -> dict[str, Any]:
  """A JSON-friendly dict of ``config`` (tuples become lists)."""
  return {
      key: list(value) if isinstance(value, tuple) else value
      for key, value in dataclasses.asdict(config).items()
  }


def config_from_json(fields: dict[str, Any]) -> Config:
  """Inverse of :func:`config_to_json`; unknown keys are ignored."""
  known = {field.name for field in dataclasses.fields(Config)}
  values = {key: value for key, value in fields.items() if key in known}
  if "milestones" in values:
    values["milestones"] = tuple(values["milestones"])
  return Config(**values)


def _checkpoint_manager(workdir: Path, config: Config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager((workdir / _CHECKPOINT_DIR).absolute(), options=options)


def _save_checkpoint(manager: ocp.CheckpointManager, epoch: int, state, metadata: dict) -> None:
  """Saves after ``epoch`` completed epochs (orbax step = epochs done), asynchronously."""
  manager.save(
      epoch,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
      ),
  )


def _restore_checkpoint(manager: ocp.CheckpointManager, epoch: int, target_state):
  """Restores state (shaped and sharded like ``target_state``) and metadata of ``epoch``."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  restored = manager.restore(
      epoch,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()
      ),
  )
  return restored["state"], restored["metadata"]


def _check_resumable(saved: Config, config: Config) -> None:
  """A checkpoint only continues the run that wrote it."""
  differing = [
      field.name
      for field in dataclasses.fields(Config)
      if field.name not in _RESUMABLE_FIELDS
      and getattr(saved, field.name) != getattr(config, field.name)
  ]
  if differing:
    changes = ", ".join(
        f"--{name} {getattr(saved, name)!r} -> {getattr(config, name)!r}" for name in differing
    )
    raise ConfigError(
        f"the checkpoint in --workdir={config.workdir} is from another run ({changes}); "
        "use the same flags to resume or another --workdir"
    )


# ---------------------------------------------------------------------------------------------
# Logging.
# ---------------------------------------------------------------------------------------------


class _Logs:
  """metrics.jsonl and TensorBoard scalars of the main process (others write nothing)."""

  def __init__(self, workdir: Path, config: Config, resumed_epoch: int, resumed_step: int):
    self.enabled = jax.process_index() == 0
    self.metrics_path = workdir / _METRICS_FILE
    self.writer = None
    if not self.enabled:
      return
    _truncate_metrics(self.metrics_path, resumed_epoch)
    if config.tensorboard:
      from tensorboardX import SummaryWriter

      # purge_step drops the events a killed run wrote after its last checkpoint.
      self.writer = SummaryWriter(
          str(workdir / _TENSORBOARD_DIR), purge_step=resumed_step + 1 if resumed_step else None
      )

  def write(self, record: dict[str, Any], step: int) -> None:
    if not self.enabled:
      return
    with self.metrics_path.open("a") as file:
      file.write(json.dumps(record) + "\n")
    if self.writer is not None:
      for name, value in record.items():
        if name not in ("epoch", "step", "synthetic") and isinstance(value, (int, float)):
          self.writer.add_scalar(name.replace("_", "/", 1), value, step)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _truncate_metrics(path: Path, last_epoch: int) -> None:
  """Keeps the lines of epochs ``<= last_epoch`` (a resumed run rewrites the later ones)."""
  if not path.exists():
    return
  lines = [
      line
      for line in path.read_text().splitlines()
      if line.strip() and json.loads(line)["epoch"] <= last_epoch
  ]
  path.write_text("".join(line + "\n" for line in lines))


def _last_record(path: Path, epoch: int) -> dict[str, Any] | None:
  """The metrics.jsonl line of ``epoch``, if there is one."""
  if not path.exists():
    return None
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return next((record for record in reversed(records) if record["epoch"] == epoch), None)


def _to_host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _json_ready(value):
  """Converts NumPy scalars/arrays, tuples and dataclasses to JSON types."""
  if dataclasses.is_dataclass(value):
    return _json_ready(dataclasses.asdict(value))
  if isinstance(value, dict):
    return {str(key): _json_ready(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(item) for item in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


class _Setup(NamedTuple):
  """What a run needs besides its data: the model pieces, optimizer and initial state."""

  graphdef_train: Any
  graphdef_eval: Any
  tx: optax.GradientTransformation
  state: dict[str, Any]


def _snip_masks(
    graphdef_train,
    params,
    batch_stats,
    dataset: input_pipeline.Dataset,
    first_order: np.ndarray,
    sparsity: float,
):
  """SNIP masks from the first training batch (epoch 0 order, not augmented)."""
  indices = first_order[0]
  batch = (dataset.train_images[indices], dataset.train_labels[indices])

  def loss_fn(candidate_params, images_and_labels):
    images, labels = images_and_labels
    inputs = input_pipeline.normalize(images, dataset.mean, dataset.std)
    logits = nnx.merge(graphdef_train, candidate_params, batch_stats)(inputs)
    return jnp.mean(_cross_entropy(logits, labels))

  # One compiled call: run eagerly, every small op of the selection would compile on its own.
  return _run_once(lambda p, b: flipout.snip(loss_fn, p, b, sparsity), params, batch)


# Functions that run once per run (initialisation, SNIP, optimizer init) are compiled with
# XLA's cheap optimisation level on CPU: optimising them takes seconds to tens of seconds
# there (VGG11's initialisation: 17 s against 3 s), running them unoptimised milliseconds.
_RUN_ONCE_CPU_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _run_once(function, *args):
  """Compiles ``function`` for ``args`` (cheaply on CPU) and calls it once."""
  options = _RUN_ONCE_CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(function).lower(*args).compile(compiler_options=options)(*args)


def _model_initializer(
    model_name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int
):
  """Graph definitions (train and eval mode) and a pure ``() -> (params, batch_stats)``.

  The initializer is meant for :func:`_run_once`: one compiled call, where eager
  initialisation would dispatch (and compile) every initializer op separately.
  """

  def create() -> nnx.Module:
    return models.create_model(
        model_name, input_shape=input_shape, num_classes=num_classes, rngs=nnx.Rngs(seed)
    )

  abstract_model = nnx.eval_shape(create)
  abstract_model.train()
  graphdef_train, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  abstract_model.eval()
  graphdef_eval, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)

  def initial_state():
    _, params, batch_stats = nnx.split(create(), nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)

  return graphdef_train, graphdef_eval, initial_state


def _build_setup(
    config: Config,
    input_shape: tuple[int, int, int],
    num_classes: int,
    steps_per_epoch: int,
    snip_batch_source=None,
    *,
    abstract: bool = False,
) -> _Setup:
  """Creates the model and optimizer and the initial state.

  ``snip_batch_source`` is ``(dataset, epoch-0 order)`` for SNIP; None (restoring a
  checkpoint, or ``abstract``) gives placeholder all-live masks of the right structure.
  ``abstract=True`` computes only shapes and dtypes (``jax.ShapeDtypeStruct`` leaves).
  """
  graphdef_train, graphdef_eval, initial_state = _model_initializer(
      config.model, tuple(input_shape), num_classes, config.seed
  )
  evaluate = jax.eval_shape if abstract else _run_once
  params, batch_stats = evaluate(initial_state)
  snip_masks = None
  if config.method == "snip":
    if snip_batch_source is None or abstract:
      snip_masks = jax.tree.map(
          lambda leaf: np.ones(leaf.shape, bool) if len(leaf.shape) >= 2 else None, params
      )
    else:
      dataset, first_order = snip_batch_source
      snip_masks = _snip_masks(
          graphdef_train, params, batch_stats, dataset, first_order, config.sparsity
      )
      # SNIP prunes at initialisation: the first step already trains the sparse network.
      params = _run_once(flipout.apply_masks, params, snip_masks)
  tx = build_optimizer(config, steps_per_epoch, snip_masks)
  step = jax.ShapeDtypeStruct((), jnp.int32) if abstract else np.zeros((), np.int32)
  state = {
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": evaluate(tx.init, params),
      "step": step,
  }
  return _Setup(graphdef_train, graphdef_eval, tx, state)


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


def load_dataset(config: Config) -> input_pipeline.Dataset:
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


def _check_batch_sizes(config: Config, num_train: int, num_test: int, num_devices: int) -> int:
  """Validates the batch sizes against data and devices; returns the eval batch size."""
  if config.batch_size % num_devices:
    raise ConfigError(
        f"--batch_size={config.batch_size} must be divisible by the {num_devices} devices "
        f"(each gets an equal share); use a multiple of {num_devices}"
    )
  if config.batch_size > num_train:
    raise ConfigError(
        f"--batch_size={config.batch_size} is larger than the {num_train} training images"
    )
  # A multiple of the device count (padding is weighted out), no larger than the test set.
  eval_batch_size = min(config.eval_batch_size, num_test)
  return math.ceil(eval_batch_size / num_devices) * num_devices


def _epoch_record(
    epoch: int,
    step: int,
    totals,
    test_loss: float,
    test_accuracy: float,
    *,
    sparsity: float,
    lr: float,
    steps: int,
    seconds: float,
    synthetic: bool,
):
  """One metrics.jsonl line: epoch means of the train metrics, test metrics, state."""
  count = max(int(totals["count"]), 1)
  return {
      "epoch": epoch,
      "step": step,
      "train_loss": float(totals["loss"]) / count,
      "train_accuracy": float(totals["correct"]) / count,
      "test_loss": test_loss,
      "test_accuracy": test_accuracy,
      "sparsity": sparsity,
      "lr": lr,
      "flips_per_step": float(totals["flips"]) / max(steps, 1),
      "epoch_seconds": seconds,
      "synthetic": synthetic,
  }


class _Plan(NamedTuple):
  """The shape of a run, fixed by its config, its data and the devices."""

  input_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  steps_per_epoch: int
  total_steps: int
  eval_batch_size: int


def _plan(config: Config, dataset: input_pipeline.Dataset, mesh: Mesh) -> _Plan:
  num_train = len(dataset.train_labels)
  eval_batch_size = _check_batch_sizes(config, num_train, len(dataset.test_labels), mesh.size)
  steps_per_epoch = num_train // config.batch_size
  return _Plan(
      input_shape=tuple(int(size) for size in dataset.train_images.shape[1:]),
      num_train=num_train,
      num_test=len(dataset.test_labels),
      steps_per_epoch=steps_per_epoch,
      total_steps=config.epochs * steps_per_epoch,
      eval_batch_size=eval_batch_size,
  )


def _latest_checkpoint(manager: ocp.CheckpointManager, config: Config) -> int | None:
  """The newest complete checkpoint to resume from; refuses to overwrite one silently."""
  latest = manager.latest_step()
  if latest is not None and not config.resume:
    raise ConfigError(
        f"--workdir={config.workdir} already holds checkpoints; pass --resume to continue "
        "that run or choose another --workdir"
    )
  return latest


def _announce(config: Config, plan: _Plan, num_devices: int, start_epoch: int) -> None:
  resumed = f", resuming after epoch {start_epoch}" if start_epoch else ""
  synthetic = " [SYNTHETIC DATA]" if config.synthetic else ""
  print(
      f"{config.dataset}/{config.model}/{config.method} sparsity {config.sparsity} on "
      f"{num_devices} device(s), {plan.steps_per_epoch} steps/epoch -> "
      f"{config.workdir}{resumed}{synthetic}",
      flush=True,
  )


def train(config: Config) -> dict[str, Any]:
  """Runs (or resumes) one training run and returns its final metrics.

  Returns:
    The content of ``summary.json``: ``config``, ``synthetic``, ``test_accuracy``,
    ``test_loss``, ``train_accuracy``, ``train_loss``, ``sparsity`` (of the prunable
    weights), ``prunable_weights``, ``live_weights``, ``dense_flops``, ``live_flops``,
    ``epochs``, ``steps``, ``devices``, ``seconds`` and ``layers`` (flipout.summary).

  Raises:
    ConfigError: bad input found once data and devices are known, or a workdir that holds
      another run.
    input_pipeline.DatasetUnavailableError: the data set cannot be loaded offline.
  """
  validate_config(config)
  _maybe_initialize_distributed()
  started = time.perf_counter()
  if config.workdir is None:
    config = dataclasses.replace(config, workdir=default_workdir(config))
  workdir = Path(config.workdir)
  mesh = _make_mesh()
  replicated = NamedSharding(mesh, P())
  dataset = load_dataset(config)
  plan = _plan(config, dataset, mesh)
  is_main = jax.process_index() == 0

  manager = _checkpoint_manager(workdir, config)
  try:
    latest = _latest_checkpoint(manager, config)
    first_order = input_pipeline.batch_indices(config.seed, 0, plan.num_train, config.batch_size)
    setup = _build_setup(
        config,
        plan.input_shape,
        dataset.num_classes,
        plan.steps_per_epoch,
        snip_batch_source=(dataset, first_order),
    )
    state = _place_tree(setup.state, replicated)
    start_epoch = 0
    if latest is not None:
      state, metadata = _restore_checkpoint(manager, latest, state)
      _check_resumable(config_from_json(metadata["config"]), config)
      start_epoch = int(metadata["epoch"])
    data = _DeviceData(
        *(
            _place(array, replicated)
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
        _announce(config, plan, mesh.size, start_epoch)
    state, record = _train_epochs(
        config, plan, setup, mesh, data, manager, state, start_epoch, dataset
    )
  finally:
    manager.wait_until_finished()
    manager.close()

  if record is None:  # resumed a finished run: report its last epoch again
    record = _last_record(workdir / _METRICS_FILE, start_epoch)
  if record is None:  # ... whose metrics file is gone: evaluate the restored state
    test_loss, test_accuracy = _evaluate(
        setup.graphdef_eval, mesh, state, data, _eval_batches(plan, mesh)
    )
    record = {
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "train_loss": None,
        "train_accuracy": None,
    }
  summary = _summary(config, setup, state, record, plan, mesh.size, time.perf_counter() - started)
  if is_main:
    (workdir / _SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _train_epochs(
    config: Config,
    plan: _Plan,
    setup: _Setup,
    mesh: Mesh,
    data: _DeviceData,
    manager: ocp.CheckpointManager,
    state,
    start_epoch: int,
    dataset: input_pipeline.Dataset,
):
  """Epochs ``start_epoch + 1 .. config.epochs``: train, evaluate, log, checkpoint.

  Returns the final state and the last epoch's record (None when no epoch was left).
  """
  replicated = NamedSharding(mesh, P())
  order_sharding = NamedSharding(mesh, P(None, _DATA_AXIS))
  train_step = _make_train_step(
      setup.graphdef_train, setup.tx, config, dataset, mesh, plan.total_steps
  )
  eval_batches = _eval_batches(plan, mesh)
  metadata = {
      "config": config_to_json(config),
      "input_shape": list(plan.input_shape),
      "num_classes": dataset.num_classes,
      "steps_per_epoch": plan.steps_per_epoch,
      "synthetic": config.synthetic,
  }
  logs = _Logs(Path(config.workdir), config, start_epoch, start_epoch * plan.steps_per_epoch)
  show = config.progress and jax.process_index() == 0
  record = None
  try:
    for epoch in range(start_epoch + 1, config.epochs + 1):
      epoch_started = time.perf_counter()
      # The data order is a function of (seed, epoch) alone, so a resumed run replays it.
      order = input_pipeline.batch_indices(
          config.seed, epoch - 1, plan.num_train, config.batch_size
      )
      epoch_order = _place(order, order_sharding)
      totals = _place_tree(_zero_totals(), replicated)
      for step_in_epoch in _progress(plan.steps_per_epoch, epoch, config, show):
        state, totals = train_step(
            state,
            totals,
            data.train_images,
            data.train_labels,
            epoch_order,
            np.int32(step_in_epoch),
        )
      test_loss, test_accuracy = _evaluate(setup.graphdef_eval, mesh, state, data, eval_batches)
      step = epoch * plan.steps_per_epoch
      record = _epoch_record(
          epoch,
          step,
          _to_host(totals),
          test_loss,
          test_accuracy,
          sparsity=flipout.sparsity(_to_host(state["params"])),
          lr=_learning_rate_at(config, plan.steps_per_epoch, step - 1),
          steps=plan.steps_per_epoch,
          seconds=time.perf_counter() - epoch_started,
          synthetic=config.synthetic,
      )
      logs.write(record, step)
      if show:
        print(_format_record(record, config.epochs), flush=True)
      every = config.checkpoint_every_epochs
      if epoch == config.epochs or (every and epoch % every == 0):
        _save_checkpoint(
            manager,
            epoch,
            state,
            {
                **metadata,
                "epoch": epoch,
                "step": step,
                "data_order": {"seed": config.seed, "next_epoch": epoch},
            },
        )
  finally:
    logs.close()
  return state, record


def lower_train_step(config: Config) -> jax.stages.Lowered:
  """Traces and lowers the train step of ``config`` without data, running or compiling.

  Shapes come from the data set's synthetic stand-in (``synthetic_train`` images of the real
  shape); the state is abstract (nothing is initialised). Checks that a configuration builds
  end to end (model, optimizer chain, sharding) without the minutes an XLA compile of a
  large model takes on CPU; ``.compile()`` on the result gives the executable (cost and
  memory analysis).
  """
  validate_config(config)
  dataset = load_dataset(dataclasses.replace(config, synthetic=True))
  mesh = _make_mesh()
  plan = _plan(config, dataset, mesh)
  setup = _build_setup(
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
          NamedSharding(mesh, P(None, _DATA_AXIS)),
      ),
      abstract((), jnp.int32),
  )


def _progress(steps: int, epoch: int, config: Config, show: bool):
  """The step numbers of one epoch, behind a tqdm bar when ``show``."""
  if not show:
    return range(steps)
  from tqdm.auto import tqdm

  return tqdm(
      range(steps),
      desc=f"epoch {epoch}/{config.epochs}",
      leave=False,
      unit="step",
      dynamic_ncols=True,
  )


def _format_record(record: dict[str, Any], epochs: int) -> str:
  synthetic = " [SYNTHETIC]" if record["synthetic"] else ""
  return (
      f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
      f"acc {record['train_accuracy']:.4f} | test loss {record['test_loss']:.4f} "
      f"acc {record['test_accuracy']:.4f} | sparsity {record['sparsity']:.4%} "
      f"lr {record['lr']:.4g} flips/step {record['flips_per_step']:.1f} "
      f"({record['epoch_seconds']:.1f}s){synthetic}"
  )


def _summary(
    config: Config, setup: _Setup, state, record, plan: _Plan, num_devices: int, seconds: float
) -> dict[str, Any]:
  """The final report (also written to summary.json)."""
  params = _to_host(state["params"])
  report = flipout.summary(params)
  model = nnx.merge(setup.graphdef_eval, params, _to_host(state["batch_stats"]))
  dense_flops, live_flops = models.inference_flops(model, plan.input_shape)
  return _json_ready(
      {
          "synthetic": config.synthetic,
          "config": config_to_json(config),
          "test_accuracy": record["test_accuracy"],
          "test_loss": record["test_loss"],
          "train_accuracy": record["train_accuracy"],
          "train_loss": record["train_loss"],
          "sparsity": report.sparsity,
          "prunable_weights": report.size,
          "live_weights": report.live,
          "dense_flops": dense_flops,
          "live_flops": live_flops,
          "epochs": config.epochs,
          "steps": plan.total_steps,
          "devices": num_devices,
          "seconds": seconds,
          "layers": report.to_dict()["layers"],
      }
  )


# ---------------------------------------------------------------------------------------------
# Reading a finished run back (for quantisation, export, analysis).
# ---------------------------------------------------------------------------------------------


class RestoredRun(NamedTuple):
  """A checkpoint read back: its config, the model in eval mode with the trained weights, and
  the pruning masks and flip counts (None for ``dense``)."""

  config: Config
  model: nnx.Module
  masks: Any
  flip_counts: Any
  epoch: int


def load_run(workdir: str | os.PathLike, epoch: int | None = None) -> RestoredRun:
  """Restores the newest (or the ``epoch``) checkpoint of a run written by :func:`train`.

  Needs no data set: shapes come from the checkpoint's metadata.

  Raises:
    ConfigError: no checkpoint in ``workdir``.
  """
  directory = (Path(workdir) / _CHECKPOINT_DIR).absolute()
  if not directory.is_dir():
    raise ConfigError(f"{workdir} has no {_CHECKPOINT_DIR}/ folder; train a run there first")
  with ocp.CheckpointManager(directory) as manager:
    epoch = manager.latest_step() if epoch is None else epoch
    if epoch is None:
      raise ConfigError(f"{directory} holds no complete checkpoint")
    metadata = manager.restore(epoch, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
        "metadata"
    ]
    config = config_from_json(metadata["config"])
    setup = _build_setup(
        config, tuple(metadata["input_shape"]), metadata["num_classes"], metadata["steps_per_epoch"]
    )
    # Replicated over this process's devices, whatever device count wrote it.
    target = _place_tree(setup.state, NamedSharding(_make_mesh(), P()))
    state, _ = _restore_checkpoint(manager, epoch, target)
  model = nnx.merge(setup.graphdef_eval, state["params"], state["batch_stats"])
  has_masks = _has_pruning_state(config)
  return RestoredRun(
      config=config,
      model=model,
      masks=flipout.masks(state["opt_state"]) if has_masks else None,
      flip_counts=flipout.flip_counts(state["opt_state"]) if has_masks else None,
      epoch=int(epoch),
  )
