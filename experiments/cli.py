"""The command line shared by every entry point: flags from :class:`config.Config`, one-line errors.

Bad input prints one line (``prog: error: ...``) to stderr and exits with status 2, never a
traceback; the benchmarks reuse :class:`OneLineParser` and the argparse types here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from experiments import config as config_lib
from experiments import checkpoints, devices, divergence, initializers, input_pipeline, models, preemption, train

# Exit statuses of a training command (besides 0, done).
EXIT_BAD_INPUT = 2  # bad flags or data, a workdir of another run: one stderr line
EXIT_DIVERGED = 3  # --on_nonfinite=stop: the loss or weights went non-finite
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written; the previous one is kept
EXIT_STATUSES = (
    "exit status: 0 done; "
    f"{EXIT_BAD_INPUT} bad input (one stderr line, nothing of an existing run changed); "
    f"{EXIT_DIVERGED} the loss or weights went non-finite (--on_nonfinite=stop); "
    f"{EXIT_SAVE_FAILED} a checkpoint could not be written (full disk?), the previous one kept; "
    f"{preemption.EXIT_PREEMPTED} preempted by SIGTERM/SIGINT after saving the step reached "
    "(continue with --resume); 130 interrupted before training began"
)


class OneLineParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one stderr line (no usage block) and exit status 2."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, message) -> int:
  """Prints ``prog: error: message`` as one stderr line; returns exit status 2."""
  print(f"{prog}: error: {config_lib.one_line(message)}", file=sys.stderr)
  return 2


def positive_int(text: str) -> int:
  """argparse type: an int >= 1."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
  return value


def comma_separated(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
  """argparse type: a comma-separated list of distinct names among ``allowed``, at least one."""

  def parse(text: str) -> tuple[str, ...]:
    values = tuple(part for part in text.split(",") if part)
    if not values or len(set(values)) != len(values) or set(values) - set(allowed):
      raise argparse.ArgumentTypeError(
          f"must be distinct names among {','.join(allowed)}, comma-separated; got {text!r}"
      )
    return values

  return parse


def positive_float(text: str) -> float:
  """argparse type: a float > 0."""
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
  return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table (pipes), columns padded to their widest cell."""
  cells = [[str(header) for header in headers]] + [[str(cell) for cell in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
  line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
  rule = "| " + " | ".join("-" * width for width in widths) + " |"
  return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


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


def _optional_int(text: str) -> int | None:
  return None if text.lower() in ("", "none") else int(text)


# Flags that set the config_lib.Config field of their name: (name, parser, help).
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
    (
        "noise_scale",
        _optional_float,
        "gradient noise scale lambda, for any scheduled method (None: 1 for flipout, 0 for "
        "the baselines, as the paper)",
    ),
    ("p", float, "exponent of the FlipOut saliency |w|^p / (flips + 1)"),
    ("prune_rate", float, "fraction of live weights pruned per event (halving schedule)"),
    (
        "schedule",
        str,
        "pruning schedule: halving (the paper's) or cubic (Zhu & Gupta's polynomial ramp)",
    ),
    (
        "structure",
        str,
        "what is pruned together: weight (the paper's), unit (whole output units, coupled "
        "across layers as read from the model) or N:M such as 2:4 (--sparsity 1 - N/M)",
    ),
    ("group_score", str, "unit: a group's score is the mean or the sum of its weights'"),
    ("unit_cost", str, "unit: what --sparsity counts, weights or flops (the model's FLOPs)"),
    ("unit_normalize", str, "unit: per-layer score normaliser before ranking: none, mean, max"),
    ("unit_round_to", int, "unit: each layer keeps a multiple of this many live units"),
    ("initial_sparsity", float, "sparsity of the first cubic event"),
    (
        "prune_begin_epoch",
        _optional_int,
        "cubic: first event after this many epochs (None: the halving schedule's first event)",
    ),
    (
        "prune_end_epoch",
        _optional_int,
        "cubic: last event, on --sparsity, after this many epochs (None: halving's last event)",
    ),
    ("prune_every_steps", _optional_int, "cubic: steps between events (None: one epoch)"),
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
    (
        "data_dir",
        str,
        "tfds data dir (or the mnist_t10k folder, or fashion_mnist's IDX folder, default "
        "/usr/share/datasets/fashion-mnist)",
    ),
    ("checkpoint_every_epochs", int, "checkpoint period in epochs (0: only at the end)"),
    ("keep_checkpoints", int, "checkpoints kept"),
    ("coordinator_address", str, "host:port of process 0 of a multi-process job"),
    ("num_processes", int, "processes in a multi-process job"),
    ("process_id", int, "this process's index in a multi-process job"),
    (
        "on_nonfinite",
        str,
        "a non-finite loss or weights: stop (exit status 3, nothing non-finite is saved, so the "
        "newest checkpoint is the last finite state) or continue (warn and train on)",
    ),
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
    defaults: config_lib.Config,
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
      epilog=EXIT_STATUSES,
  )
  add = parser.add_argument
  if allowed_datasets:
    add("--dataset", default=defaults.dataset, choices=tuple(allowed_datasets), help="data set")
  add("--model", default=defaults.model, choices=tuple(allowed_models), help="network")
  add("--method", default=defaults.method, choices=config_lib.METHODS, help="pruning method")
  add(
      "--init",
      default=None,
      choices=initializers.INITS,
      help="weight initialisation: torch (PyTorch's defaults, the authors') or flax (the "
      f"models' own); None: {defaults.init} for a new run, the run's own on --resume",
  )
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


def _unflagged_init(config: config_lib.Config, default: str) -> str:
  """The initialisation of a run without ``--init``: on ``--resume``, the one the checkpoint
  was trained with (a run saved before ``--init`` existed used ``flax``, whatever the entry
  point's default is now); otherwise the entry point's ``default``."""
  if config.resume:
    # Reading the checkpoint touches JAX (orbax asks for the process index): join a
    # multi-process job first, as that must come before anything else does.
    devices.maybe_initialize_distributed(config)
    saved = checkpoints.saved_config(config.workdir or config_lib.default_workdir(config))
    if saved is not None:
      return saved.init
  return default


def main(
    argv: Sequence[str] | None,
    defaults: config_lib.Config,
    allowed_models: Sequence[str] = models.MODEL_NAMES,
    *,
    allowed_datasets: Sequence[str] = (),
    prog: str | None = None,
) -> int:
  """Command-line entry: parse, validate, train. Returns the exit status.

  Bad input (unknown model or method, sparsity outside [0, 1), epochs < 1, bad milestones,
  a data set that cannot be loaded offline, ...) prints one line to stderr and returns 2;
  ``--help`` returns 0. The other statuses are in :data:`EXIT_STATUSES` (and ``--help``).

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
    if config.init is None:
      config = dataclasses.replace(config, init=_unflagged_init(config, defaults.init))
    config_lib.validate_config(config, allowed_models)
    with checkpoints.held_write_errors():
      train.train(config)
  except (config_lib.ConfigError, input_pipeline.DatasetUnavailableError) as error:
    return fail(parser.prog, error)
  except divergence.TrainingDiverged as error:
    fail(parser.prog, error)
    return EXIT_DIVERGED
  except checkpoints.CheckpointSaveError as error:
    fail(parser.prog, error)
    return EXIT_SAVE_FAILED
  except preemption.Preempted as stop:
    print(f"{parser.prog}: {stop}", file=sys.stderr)
    return preemption.EXIT_PREEMPTED
  except KeyboardInterrupt:
    print(f"{parser.prog}: interrupted; continue with --resume", file=sys.stderr)
    return 130
  return 0
