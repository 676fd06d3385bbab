"""Compact a pruned run into a smaller dense network and measure what it saves.

    python -m experiments.compact --workdir RUN [--json FILE] [--repeats 21]

Loads the newest checkpoint of ``RUN`` (written by any experiment entry point with a pruning
method), removes every unit that cannot change the logits (``experiments/compaction.py``),
runs the pruned network (full width, zeros in its kernels) and the compact one on the run's
test set, and times their inference at the run's evaluation batch size side by side in this
process: both jit-compiled and warmed up, then interleaved repetitions (the order alternates),
the speedup being the median of the per-repetition time ratios. Prints a table; ``--json``
also writes the numbers.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import flipout_jax as flipout
from experiments import checkpoints, cli, compaction, input_pipeline, models, train
from experiments import config as config_lib

_PROG = "python -m experiments.compact"


def _forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
  """``images -> logits`` of ``model``, compiled once per batch shape."""
  graphdef, state = nnx.split(model)
  apply = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
  return lambda images: apply(state, images)


def _progress(iterable, description: str, show: bool):
  """``iterable`` behind a tqdm bar on stderr when ``show`` and stderr is a terminal."""
  from tqdm.auto import tqdm

  return tqdm(iterable, desc=description, leave=False, disable=None if show else True)


def batched_logits(forward, images, batch_size: int, *, show: bool = False) -> np.ndarray:
  """Logits of all ``images``, ``batch_size`` at a time."""
  starts = range(0, len(images), batch_size)
  return np.concatenate(
      [np.asarray(forward(images[s : s + batch_size])) for s in _progress(starts, "eval", show)]
  )


def time_side_by_side(forwards, batch, repeats: int, *, show: bool = False) -> list[list[float]]:
  """Seconds per call of each forward function on ``batch``, ``repeats`` times each.

  Each is compiled and run once first. Repetitions interleave the functions, alternating
  their order, so that drift in the machine's load affects all of them alike.

  Returns:
    ``times[i]``: the ``repeats`` timings of ``forwards[i]``.
  """
  for forward in forwards:
    jax.block_until_ready(forward(batch))
  times = [[] for _ in forwards]
  for repeat in _progress(range(repeats), "timing", show):
    order = range(len(forwards)) if repeat % 2 == 0 else reversed(range(len(forwards)))
    for index in order:
      start = time.perf_counter()
      jax.block_until_ready(forwards[index](batch))
      times[index].append(time.perf_counter() - start)
  return times


def kernel_usage(model: nnx.Module) -> dict[str, int]:
  """How full the kernels of ``model``'s convolution and Linear layers are.

  Returns:
    ``kernel_entries`` (all kernel weights), ``live_weights`` (the nonzero ones),
    ``units`` (output units and channels) and ``single_input_units`` (units with exactly one
    live incoming weight: compaction keeps them, as they carry a varying value, yet each
    costs a whole row of the dense kernel that reads it).
  """
  usage = dict(kernel_entries=0, live_weights=0, units=0, single_input_units=0)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (nnx.Conv, nnx.Linear)):
      kernel = np.asarray(module.kernel[...])
      live_in = np.count_nonzero(kernel.reshape(-1, kernel.shape[-1]), axis=0)
      usage["kernel_entries"] += kernel.size
      usage["live_weights"] += int(live_in.sum())
      usage["units"] += kernel.shape[-1]
      usage["single_input_units"] += int(np.sum(live_in == 1))
  return usage


def _accuracy(logits: np.ndarray, labels) -> float:
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def _program_forward(model: nnx.Module, batch) -> tuple[Callable, int]:
  """``images -> logits`` of ``flipout.compact(..., constants="program")`` of ``model`` (the
  removed units' constants go into the compact program, so channels read through zero
  padding go too), and its parameter count."""
  graphdef, state = nnx.split(model)
  compacted = flipout.compact(lambda s, images: nnx.merge(graphdef, s)(images), state, batch)
  apply = jax.jit(compacted.apply)
  size = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(compacted.params))
  return (lambda images: apply(compacted.params, images)), size


def compact_run(
    workdir,
    *,
    repeats: int = 21,
    epoch: int | None = None,
    show: bool = False,
    program: bool = False,
) -> dict[str, Any]:
  """Compacts the run in ``workdir``; returns the report (see the module docstring).

  ``program``: also time ``flipout.compact`` with ``constants="program"`` (report keys
  ``program_*``), whose result is a function rather than a model of the family.

  Raises:
    config_lib.ConfigError: no checkpoint in ``workdir``, or a run without pruning.
    input_pipeline.DatasetUnavailableError: the run's data set cannot be loaded.
  """
  run = checkpoints.load_run(workdir, epoch)
  if run.masks is None:
    raise config_lib.ConfigError(
        f"{workdir} holds a run trained without pruning (--method={run.config.method}): "
        "nothing to compact; give the folder of a pruned run"
    )
  dataset = train.load_dataset(run.config)
  images = input_pipeline.normalize(dataset.test_images, dataset.mean, dataset.std)
  input_shape = tuple(int(size) for size in dataset.test_images.shape[1:])
  if show and sys.stderr.isatty():
    print("compacting...", file=sys.stderr, flush=True)
  result = compaction.compact(run.model, input_shape)
  batch_size = min(run.config.eval_batch_size, len(images))
  forwards = _forward(run.model), _forward(result.model)
  dense_logits, compact_logits = (
      batched_logits(f, images, batch_size, show=show) for f in forwards
  )
  program_size = None
  if program:
    program_forward, program_size = _program_forward(run.model, images[:batch_size])
    forwards = (*forwards, program_forward)
  times = time_side_by_side(forwards, images[:batch_size], repeats, show=show)
  dense_times, compact_times = times[0], times[1]
  dense_flops, live_flops = models.inference_flops(run.model, input_shape)
  params = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
  return {
      "workdir": str(workdir),
      "model": run.config.model,
      "method": run.config.method,
      "epoch": run.epoch,
      "synthetic": run.config.synthetic,
      "sparsity": flipout.sparsity(params),
      "widths": _json_widths(result.widths),
      "rounds": result.rounds,
      "dense_parameters": compaction.parameter_count(run.model),
      "compact_parameters": compaction.parameter_count(result.model),
      "dense_flops": dense_flops,
      "live_flops": live_flops,
      "compact_flops": models.inference_flops(result.model, input_shape)[0],
      "max_abs_logit_difference": float(np.abs(dense_logits - compact_logits).max()),
      "test_accuracy_dense": _accuracy(dense_logits, dataset.test_labels),
      "test_accuracy_compact": _accuracy(compact_logits, dataset.test_labels),
      "batch_size": batch_size,
      "repeats": repeats,
      "dense_ms_per_batch": 1e3 * statistics.median(dense_times),
      "compact_ms_per_batch": 1e3 * statistics.median(compact_times),
      "speedup": statistics.median(d / c for d, c in zip(dense_times, compact_times)),
      "compact_kernels": kernel_usage(result.model),
      **(
          {}
          if program_size is None
          else {
              "program_parameters": program_size,
              "program_speedup": statistics.median(d / c for d, c in zip(dense_times, times[2])),
          }
      ),
  }


def _json_widths(widths) -> dict[str, Any]:
  return {
      name: list(value) if isinstance(value, tuple) else value
      for name, value in widths._asdict().items()
  }


def format_report(report: dict[str, Any]) -> str:
  """The report as a heading, a table and two lines."""
  synthetic = "  [SYNTHETIC DATA: not a result]" if report["synthetic"] else ""
  usage = report["compact_kernels"]
  rows = [
      ("parameters", f"{report['dense_parameters']:,}", f"{report['compact_parameters']:,}"),
      ("FLOPs per image", f"{report['dense_flops']:,}", f"{report['compact_flops']:,}"),
      (
          "test accuracy",
          f"{report['test_accuracy_dense']:.2%}",
          f"{report['test_accuracy_compact']:.2%}",
      ),
      (
          f"ms per batch of {report['batch_size']}",
          f"{report['dense_ms_per_batch']:.3f}",
          f"{report['compact_ms_per_batch']:.3f}",
      ),
  ]
  widths = ", ".join(
      f"{len(value)} input features" if name == "input_features" else f"{name} {value}"
      for name, value in report["widths"].items()
      if value  # None (every input read) or no layers of that kind
  )
  program = (
      [
          f"flipout.compact(constants='program'): {report['program_parameters']:,} parameters, "
          f"speedup {report['program_speedup']:.2f}x"
      ]
      if "program_speedup" in report
      else []
  )
  return "\n".join(
      [
          f"{report['model']} / {report['method']} (epoch {report['epoch']}, sparsity "
          f"{report['sparsity']:.4%}){synthetic}",
          cli.format_table(("", "pruned (dense layers)", "compact"), rows),
          f"speedup {report['speedup']:.2f}x (median of {report['repeats']} interleaved "
          f"repetitions); max |logit difference| {report['max_abs_logit_difference']:.3g}",
          f"compact widths: {widths}",
          f"compact kernels: {usage['live_weights']:,} live of {usage['kernel_entries']:,} "
          f"({usage['live_weights'] / max(usage['kernel_entries'], 1):.2%}); "
          f"{usage['single_input_units']:,} of {usage['units']:,} units read one live weight",
          *program,
      ]
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: bad input prints one line on stderr and returns 2."""
  parser = cli.OneLineParser(prog=_PROG, description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a pruned run's folder")
  parser.add_argument("--json", default=None, help="also write the report to this file")
  parser.add_argument(
      "--repeats", type=cli.positive_int, default=21, help="timed repetitions of each model"
  )
  parser.add_argument("--epoch", type=int, default=None, help="checkpoint (default: newest)")
  parser.add_argument(
      "--program",
      action="store_true",
      help="also time flipout.compact(constants='program'): constants folded into the program",
  )
  try:
    args = parser.parse_args(argv)
  except SystemExit as exit_request:
    return int(exit_request.code or 0)
  # Checked now rather than after minutes of work.
  if args.json is not None and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):
    return cli.fail(_PROG, f"--json={args.json} is a folder or in a folder that does not exist")
  try:
    report = compact_run(
        args.workdir, repeats=args.repeats, epoch=args.epoch, show=True, program=args.program
    )
    if args.json is not None:
      Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
  except (ValueError, OSError) as error:  # ConfigError, DatasetUnavailableError too
    return cli.fail(_PROG, error)
  print(format_report(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
