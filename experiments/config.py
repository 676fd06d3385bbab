"""What defines a training run: the :class:`Config`, its validation and its JSON form.

Each entry point (``experiments.cifar``, ``experiments.mnist``, ...) is a :class:`Config` of
defaults; the command line (``experiments.cli``) overrides fields from flags and
:func:`validate_config` refuses bad values with one line before anything is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flipout_jax as flipout

from experiments import divergence, initializers, input_pipeline, models, validation

METHODS: tuple[str, ...] = (
    "flipout",
    "global_magnitude",
    "magnitude",
    "random",
    "taylor",
    "snip",
    "hoyer_square",
    "dense",
)


# Methods that prune on a schedule with flipout.prune, and the criterion each one uses.
SCHEDULED_CRITERIA = {
    "flipout": "flipout",
    "global_magnitude": "global_magnitude",
    "magnitude": "magnitude",
    "random": "random",
    "taylor": "taylor",
}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run. Defaults: the paper's VGG19 / CIFAR-10 run at 99.9%.

  Each field is the command-line flag of its name, and its description below is that flag's
  ``--help`` and its row in ``docs/experiments.md`` (``python -m experiments.cli`` prints the
  table), so it is written here only.

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
    noise_scale: the paper's lambda for the gradient noise, for any scheduled method
      (:data:`SCHEDULED_CRITERIA`); None: the method's default (:func:`noise_scale_of`),
      1 for ``flipout`` and 0 for the baselines, as in the paper.
    p: exponent of ``|w|`` in the FlipOut saliency ``|w|^p / (flips + 1)``.
    prune_rate: fraction of the live weights pruned at each event but the last (``halving``).
    schedule: ``halving`` (the paper's: each event prunes ``prune_rate`` of the live weights,
      the last lands on ``sparsity``) or ``cubic`` (Zhu & Gupta's polynomial ramp from
      ``initial_sparsity`` to ``sparsity``; see ``flipout.prune``); scheduled methods only.
    structure: what a scheduled method prunes together (``flipout.prune``'s ``structure``):
      ``weight`` (the paper's), ``unit`` (whole output units, coupled across layers as
      ``flipout.unit_groups`` reads them from the model, the model's outputs never) or
      ``N:M`` such as ``2:4`` (then ``sparsity`` must be ``1 - N/M``; kernels whose input
      width is not a multiple of M, such as a first conv on 1 or 3 channels, stay dense).
    group_score: ``unit``: a group's score is the ``mean`` or the ``sum`` of its weights'.
    unit_cost: ``unit``: what ``sparsity`` counts, ``weights`` or ``flops`` (the share of the
      model's FLOPs per example removed, as ``flipout.compact`` will cut them).
    unit_normalize: ``unit``: per-layer normaliser of the scores before the global ranking,
      ``none``, ``mean`` or ``max`` (``flipout.units``' ``normalize``).
    unit_round_to: ``unit``: each layer keeps a multiple of this many live units.
    initial_sparsity: sparsity of the first ``cubic`` event, in ``[0, sparsity]``.
    prune_begin_epoch: ``cubic``: the first event after this many epochs; None: at the step
      of the ``halving`` schedule's first event (the same span as the paper's schedule).
    prune_end_epoch: ``cubic``: the last event (landing on ``sparsity``) after this many
      epochs, before the end of the run; None: at the ``halving`` schedule's last event.
    prune_every_steps: ``cubic``: steps between events; None: one epoch.
    hoyer_lambda: weight of the Hoyer-Square regulariser (``hoyer_square`` only).
    hoyer_threshold: fixed magnitude threshold for ``hoyer_square``; None: the threshold
      that reaches ``sparsity`` exactly.
    init: weight initialisation, one of ``initializers.INITS``: ``torch`` (PyTorch's
      defaults, the authors'; see :mod:`experiments.initializers`) or ``flax`` (the models'
      own). Runs saved before the field existed used ``flax``.
    seed: seeds the initialisation, the data order, augmentation and noise.
    data_seed: seeds the train/test split of ``digits`` and ``mnist_t10k`` and the synthetic
      data; None: ``seed``. Fix it to compare seeds on one split.
    workdir: output folder; None: ``runs/<dataset>-<model>-<method>-<sparsity>-seed<seed>``.
    resume: continue from the newest checkpoint in ``workdir``.
    synthetic: random data of the data set's true shapes (smoke tests, speed); marked as
      such in every output.
    synthetic_train: number of synthetic training images.
    synthetic_test: number of synthetic test images.
    data_dir: where the data set lives (tfds data dir, or the mnist_t10k folder, or the
      folder of fashion_mnist's IDX files when tfds has not prepared it, by default
      ``/usr/share/datasets/fashion-mnist``).
    checkpoint_every_epochs: checkpoint period in epochs; 0: only at the end of the run.
    keep_checkpoints: how many checkpoints to keep.
    progress: show a progress bar and print one line per epoch.
    tensorboard: write TensorBoard scalars.
    coordinator_address: ``host:port`` of process 0 of a multi-process job (None: the
      ``JAX_COORDINATOR_ADDRESS`` variable, or a cluster JAX detects itself, or one process).
    num_processes: processes in the job (None: ``JAX_NUM_PROCESSES``).
    process_id: this process's index in ``[0, num_processes)`` (None: ``JAX_PROCESS_ID``).
    on_nonfinite: a non-finite loss or weights: ``stop`` (raise ``TrainingDiverged`` before
      saving, exit status 3, so the newest checkpoint is the last finite state) or
      ``continue`` (warn, train on); see ``divergence``.
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
  noise_scale: float | None = None
  p: float = 2.0
  prune_rate: float = 0.5
  schedule: str = "halving"
  structure: str = "weight"
  group_score: str = "mean"
  unit_cost: str = "weights"
  unit_normalize: str = "none"
  unit_round_to: int = 1
  initial_sparsity: float = 0.0
  prune_begin_epoch: int | None = None
  prune_end_epoch: int | None = None
  prune_every_steps: int | None = None
  hoyer_lambda: float = 1e-6
  hoyer_threshold: float | None = None
  init: str = "torch"
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
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  on_nonfinite: str = "stop"


SCHEDULES: tuple[str, ...] = ("halving", "cubic")
# The gradient noise scale of each method when --noise_scale is not given (the paper's).
DEFAULT_NOISE_SCALE = {"flipout": 1.0}


def noise_scale_of(config: Config) -> float:
  """The gradient noise scale the run uses: ``noise_scale``, or the method's default (1 for
  ``flipout``, 0 for the other methods) when it is None. The one place that resolves it."""
  if config.noise_scale is not None:
    return float(config.noise_scale)
  return DEFAULT_NOISE_SCALE.get(config.method, 0.0)


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
  check_choice("dataset", config.dataset, input_pipeline.DATASET_NAMES)
  check_choice("model", config.model, tuple(allowed_models))
  check_choice("method", config.method, METHODS)
  check_choice("init", config.init, initializers.INITS)
  check_choice("on_nonfinite", config.on_nonfinite, divergence.ON_NONFINITE)
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
    check_int(name, getattr(config, name), minimum=1)
  check_int("checkpoint_every_epochs", config.checkpoint_every_epochs, minimum=0)
  check_int("seed", config.seed, minimum=0)
  if config.data_seed is not None:
    check_int("data_seed", config.data_seed, minimum=0)
  if not config.lr > 0:
    raise ConfigError(f"--lr must be > 0, got {config.lr}")
  if not 0.0 <= config.momentum < 1.0:
    raise ConfigError(f"--momentum must be in [0, 1), got {config.momentum}")
  for name in ("weight_decay", "hoyer_lambda"):
    if not getattr(config, name) >= 0:
      raise ConfigError(f"--{name} must be >= 0, got {getattr(config, name)}")
  _validate_noise_and_schedule(config)
  if not config.p > 0:
    raise ConfigError(f"--p must be > 0, got {config.p}")
  if not 0.0 < config.prune_rate < 1.0:
    raise ConfigError(f"--prune_rate must be in (0, 1), got {config.prune_rate}")
  if config.hoyer_threshold is not None and not config.hoyer_threshold >= 0:
    raise ConfigError(f"--hoyer_threshold must be >= 0, got {config.hoyer_threshold}")
  validate_processes(config.coordinator_address, config.num_processes, config.process_id)
  milestones = tuple(config.milestones)
  if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) or any(
      later <= earlier for earlier, later in zip(milestones, milestones[1:])
  ):
    raise ConfigError(
        "--milestones must be strictly increasing positive epochs like 150,250; "
        f"got {milestones}"
    )


def _validate_structure(config: Config) -> None:
  """``--structure`` and ``--group_score``: flipout.prune's values, for scheduled methods."""
  check_choice("group_score", config.group_score, ("mean", "sum"))
  check_choice("unit_cost", config.unit_cost, ("weights", "flops"))
  check_choice("unit_normalize", config.unit_normalize, ("none", "mean", "max"))
  check_int("unit_round_to", config.unit_round_to, minimum=1)
  unit_flags = (config.unit_cost, config.unit_normalize, config.unit_round_to)
  if config.structure != "unit" and unit_flags != ("weights", "none", 1):
    raise ConfigError(
        f"--unit_cost, --unit_normalize and --unit_round_to apply to --structure=unit, got "
        f"--structure={config.structure}"
    )
  try:  # the library's own checks, with its messages
    flipout.prune(
        None if ":" in config.structure else 0.5,
        total_steps=2,
        structure=(
            flipout.units(score=config.group_score)
            if config.structure == "unit"
            else config.structure
        ),
    )
  except (TypeError, ValueError) as error:
    raise ConfigError(f"--{one_line(error)}") from None
  if config.structure != "weight" and config.method not in SCHEDULED_CRITERIA:
    raise ConfigError(
        f"--structure={config.structure} applies to the scheduled methods "
        f"({', '.join(SCHEDULED_CRITERIA)}); got --method={config.method}"
    )
  if ":" in config.structure:
    n, m = (int(x) for x in config.structure.split(":"))
    if abs(config.sparsity - (1 - n / m)) > 1e-9:
      raise ConfigError(
          f"--structure={config.structure} reaches sparsity 1 - {n}/{m} = {1 - n / m:g}; "
          f"give --sparsity={1 - n / m:g}, got {config.sparsity}"
      )


def _validate_noise_and_schedule(config: Config) -> None:
  """The gradient noise and the schedule flags: ranges, and only for scheduled methods."""
  scheduled = ", ".join(SCHEDULED_CRITERIA)
  if config.noise_scale is not None and not config.noise_scale >= 0:
    raise ConfigError(f"--noise_scale must be >= 0, got {config.noise_scale}")
  if noise_scale_of(config) > 0 and config.method not in SCHEDULED_CRITERIA:
    raise ConfigError(
        f"--noise_scale applies to the scheduled methods ({scheduled}); got "
        f"--noise_scale={config.noise_scale} with --method={config.method}"
    )
  check_choice("schedule", config.schedule, SCHEDULES)
  if config.schedule != "halving" and config.method not in SCHEDULED_CRITERIA:
    raise ConfigError(
        f"--schedule={config.schedule} applies to the scheduled methods ({scheduled}); "
        f"got --method={config.method}"
    )
  _validate_structure(config)
  if not 0.0 <= config.initial_sparsity <= config.sparsity:
    raise ConfigError(
        f"--initial_sparsity must be in [0, --sparsity={config.sparsity}], got "
        f"{config.initial_sparsity}"
    )
  for name in ("prune_begin_epoch", "prune_end_epoch"):
    if getattr(config, name) is not None:
      check_int(name, getattr(config, name), minimum=0)
  if config.prune_every_steps is not None:
    check_int("prune_every_steps", config.prune_every_steps, minimum=1)


def validate_processes(address: str | None, num_processes, process_id) -> None:
  """A multi-process job needs all three of address, process count and process index.

  Raises:
    ConfigError: one of them is missing or malformed.
  """
  given = [value is not None for value in (address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ConfigError(
        "--coordinator_address, --num_processes and --process_id go together (or come from "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); got "
        f"{address!r}, {num_processes!r}, {process_id!r}"
    )
  if address is None:
    return
  host, _, port = str(address).rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(
        f"--coordinator_address must be host:port like 10.0.0.1:1234, got {address!r}"
    )
  check_int("num_processes", num_processes, minimum=1)
  check_int("process_id", process_id, minimum=0)
  if process_id >= num_processes:
    raise ConfigError(
        f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}, "
        f"got {process_id}"
    )


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_int(name: str, value, *, minimum: int) -> None:
  """Raises :class:`ConfigError` naming ``--name`` unless ``value`` is an integer >= minimum."""
  validation.check_int(f"--{name}", value, minimum=minimum, error=ConfigError)


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
  if "schedule" not in fields and "noise_scale" in values:
    # Saved before --noise_scale applied to every scheduled method: it acted on flipout
    # alone, so a baseline's value (or flipout's default 1) is today's None.
    if fields.get("method") != "flipout" or values["noise_scale"] == 1.0:
      values["noise_scale"] = None
  if "milestones" in values:
    values["milestones"] = tuple(values["milestones"])
  # Saved before --init existed: every model had the models' own initialisation.
  values.setdefault("init", "flax")
  return Config(**values)


def one_line(error) -> str:
  return " ".join(str(error).split())
