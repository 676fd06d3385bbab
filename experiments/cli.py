"""The command line shared by every entry point: flags from :class:`config.Config`, one-line errors.

Bad input prints one line (``prog: error: ...``) to stderr and exits with status 2, never a
traceback; the benchmarks reuse :class:`OneLineParser` and the argparse types here.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
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


# Flags that set the config_lib.Config field of their name, (name, parser); each one's help
# is the field's description in Config's docstring (the one place it is written).
_VALUE_FLAGS = (
    ("sparsity", float),
    ("epochs", int),
    ("batch_size", int),
    ("eval_batch_size", int),
    ("lr", float),
    ("milestones", _parse_milestones),
    ("momentum", float),
    ("weight_decay", float),
    ("noise_scale", _optional_float),
    ("p", float),
    ("prune_rate", float),
    ("schedule", str),
    ("structure", str),
    ("group_score", str),
    ("unit_cost", str),
    ("unit_normalize", str),
    ("unit_round_to", int),
    ("initial_sparsity", float),
    ("prune_begin_epoch", _optional_int),
    ("prune_end_epoch", _optional_int),
    ("prune_every_steps", _optional_int),
    ("hoyer_lambda", float),
    ("hoyer_threshold", _optional_float),
    ("seed", int),
    ("data_seed", int),
    ("workdir", str),
    ("synthetic_train", int),
    ("synthetic_test", int),
    ("data_dir", str),
    ("checkpoint_every_epochs", int),
    ("keep_checkpoints", int),
    ("coordinator_address", str),
    ("num_processes", int),
    ("process_id", int),
    ("on_nonfinite", str),
)
_SWITCHES = ("resume", "synthetic")  # store_true
_ON_OFF_SWITCHES = ("progress", "tensorboard")  # --x / --no-x

_ROLE = re.compile(r":\w+:`~?([^`]+)`")


def field_help() -> dict[str, str]:
  """Each :class:`config.Config` field's description, from its docstring's ``Attributes``,
  as plain text (reST roles and literals unmarked)."""
  doc = inspect.getdoc(config_lib.Config) or ""
  found: dict[str, list[str]] = {}
  name = None
  for line in doc.split("Attributes:", 1)[1].splitlines():
    field = re.match(r"^  (\w+): (.*)$", line)
    if field:
      name = field.group(1)
      found[name] = [field.group(2)]
    elif line.startswith("    ") and name is not None:
      found[name].append(line.strip())
  plain = lambda text: _ROLE.sub(r"\1", text).replace("``", "")
  return {key: plain(" ".join(words)) for key, words in found.items()}


def flags_table(defaults: config_lib.Config | None = None) -> str:
  """The Markdown table of every Config flag, its default and its description
  (``docs/experiments.md`` holds it; ``python -m experiments.cli`` prints it)."""
  defaults = defaults or config_lib.Config()
  described = field_help()
  rows = []
  for field in dataclasses.fields(config_lib.Config):
    value = getattr(defaults, field.name)
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    text = described[field.name].replace("|", "\\|")  # a pipe would end the cell
    rows.append(f"| `--{field.name}` | `{shown}` | {text} |")
  return "\n".join(["| flag | default (cifar) | what it sets |", "| --- | --- | --- |", *rows])


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
  described = field_help()
  for name, parse in _VALUE_FLAGS:
    add(f"--{name}", type=parse, default=getattr(defaults, name), help=described[name])
  for name in _SWITCHES:
    add(f"--{name}", action="store_true", default=getattr(defaults, name), help=described[name])
  for name in _ON_OFF_SWITCHES:
    add(
        f"--{name}",
        action=argparse.BooleanOptionalAction,
        default=getattr(defaults, name),
        help=described[name],
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


if __name__ == "__main__":  # the flag table of docs/experiments.md
  print(flags_table())
