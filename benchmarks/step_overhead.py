"""Steady-step overhead of ``flipout.prune`` (with and without ``gradient_noise``).

``python -m benchmarks.step_overhead`` times a plain jitted training step of each model with
three chains side by side in one process (see ``benchmarks/_common.py`` for the method):

* ``dense``:   add_decayed_weights(5e-4) -> sgd(momentum 0.9)
* ``prune``:   the same -> flipout.prune(0.999)
* ``flipout``: gradient_noise(1.0) -> the same -> flipout.prune(0.999)  (the paper's chain)
* ``masks`` (only with ``--variants``): the dense chain -> flipout.fixed_masks(all live), the
  masking and flip counting of ``prune`` without its event (no conditional in the step)
* ``prune_unit`` and ``prune_2:4`` (added by ``--structures``, or named in ``--variants``):
  ``prune`` with ``structure="unit"`` (the model's ``flipout.unit_groups``) and with
  ``structure="2:4"`` (sparsity 0.5, on the kernels whose input width is a multiple of 4)

and prints the median per-repetition ratio ``prune / dense`` and ``flipout / dense`` (and of
each structured variant to ``prune``, when both are timed). ``--structures`` then also times
one pruning event of each structure on the model's params against the weight structure's
(``benchmarks.prune_event.measure_structure_events``). Steps
are taken after the last pruning event of a run of ``--total_steps`` steps (default 10^8: int32
flip counters; 60000: uint16 ones); the run checks afterwards that no weight was pruned.
Cases: LeNet-300-100 at batch 128, ResNet18 and VGG19 at batch 32 on CPU; VGG19 and ResNet18
at batch 128 on a GPU.
Goals (issue 5): <= 1.10x LeNet-300-100 CPU, <= 1.02x VGG19 CPU, <= 1.03x GPU; (issue 21)
a structured variant's overhead at most ``prune``'s.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import _common, prune_event
from experiments import cli
from benchmarks._common import Case

# (device, model) -> the goal for the overhead ratio.
GOALS = {
    ("cpu", "lenet300"): 1.10,
    ("cpu", "vgg19"): 1.02,
    ("gpu", "vgg19"): 1.03,
    ("gpu", "resnet18"): 1.03,
}


def measure_case(
    case: Case,
    *,
    variants: Sequence[str] = _common.DEFAULT_VARIANTS,
    repetitions: int,
    window_s: float,
    total_steps: int = _common.STEADY_TOTAL_STEPS,
    seed: int = 0,
) -> dict[str, Any]:
  """Times one training step of ``case`` with each chain of ``variants``, interleaved.

  The first variant is the baseline of the ratios; the structured variants are also compared
  with ``prune`` when it is timed.

  Returns:
    ``{"model", "batch_size", "seconds_per_step": {variant: median}, "steps_per_window",
    "ratios": {variant: {"median", "p25", "p75"}}, "samples": {variant: [seconds...]}}``,
    and ``"ratios_to_prune"`` (same form) of the structured variants when ``prune`` is timed.

  Raises:
    RuntimeError: a pruning event happened inside the timed steps (``total_steps`` too small).
  """
  model = _common.init_model(case, seed)
  runners = {
      variant: _common.StepRunner(case, variant, total_steps=total_steps, seed=seed, model=model)
      for variant in variants
  }
  timings = _common.interleaved_timings(runners, repetitions=repetitions, window_s=window_s)
  if not all(runner.all_live() for runner in runners.values()):
    raise RuntimeError(
        f"{case.label}: a pruning event fell inside the timed steps, which start after the "
        "run's last event"
    )
  baseline = timings.seconds[variants[0]]
  ratios = {v: _common.ratio_summary(timings.seconds[v], baseline) for v in variants[1:]}
  result = {
      "model": case.model,
      "batch_size": case.batch_size,
      "seconds_per_step": {v: statistics.median(s) for v, s in timings.seconds.items()},
      "steps_per_window": timings.calls,
      "ratios": ratios,
      "samples": timings.seconds,
  }
  structured = structured_against_prune(variants)
  if structured:
    unstructured = timings.seconds[_common.PRUNE]
    result["ratios_to_prune"] = {
        v: _common.ratio_summary(timings.seconds[v], unstructured) for v in structured
    }
  return result


def structured_against_prune(variants: Sequence[str]) -> list[str]:
  """The structured variants among ``variants`` when ``prune`` (their comparison) is too."""
  if _common.PRUNE not in variants:
    return []
  return [v for v in variants if v in _common.STRUCTURED_VARIANTS]


format_ratio = _common.format_ratio


def overhead_table(results: Sequence[dict[str, Any]], device: str, variants: Sequence[str]) -> str:
  """The printed table: ms per step of each variant, ratios to the first, and the goal; then the
  structured variants' ratios to ``prune`` (goal: at most 1)."""
  structured = structured_against_prune(variants)
  headers = (
      ["model", "batch"]
      + [f"{v} ms/step" for v in variants]
      + [f"{v} / {variants[0]}" for v in variants[1:]]
      + ["goal"]
      + [f"{v} / {_common.PRUNE}" for v in structured]
  )
  rows = []
  for result in results:
    goal = GOALS.get((device, result["model"]))
    rows.append(
        [result["model"], result["batch_size"]]
        + [f"{1e3 * result['seconds_per_step'][v]:.2f}" for v in variants]
        + [format_ratio(result["ratios"][v]) for v in variants[1:]]
        + ["-" if goal is None else f"<= {goal:.2f}x"]
        + [format_ratio(result["ratios_to_prune"][v]) for v in structured]
    )
  return cli.format_table(headers, rows)


def build_parser(
    prog: str, description: str, *, repetitions: int, window_s: float
) -> cli.OneLineParser:
  """The command line shared with ``gpu_throughput``: device, models, variants, timing."""
  parser = cli.OneLineParser(prog=prog, description=description)
  _common.add_case_arguments(parser)
  _common.add_run_length_argument(parser)
  _common.add_timing_arguments(parser, repetitions=repetitions, window_s=window_s)
  parser.add_argument(
      "--structures",
      action="store_true",
      help=f"also time {','.join(_common.STRUCTURED_VARIANTS)} (prune by units, by 2:4) and one "
      "pruning event of each structure against the weight structure's",
  )
  return parser


def selected_cases(args, device: str) -> tuple[Case, ...]:
  """The device's cases, filtered by ``--models``.

  Raises:
    ValueError: a model in ``--models`` is not among the device's cases.
  """
  cases = _common.cases_for(device, args.tiny)
  if args.models is None:
    return cases
  wanted = [name for name in args.models.split(",") if name]
  available = [case.model for case in cases]
  unknown = [name for name in wanted if name not in available]
  if unknown or not wanted:
    raise ValueError(
        f"--models must be a comma-separated subset of {','.join(available)}; "
        f"got {args.models!r}"
    )
  return tuple(case for case in cases if case.model in wanted)


def selected_variants(args) -> tuple[str, ...]:
  """``--variants`` as a tuple of at least two known, distinct chains.

  Raises:
    ValueError: unknown, repeated or fewer than two variants.
  """
  variants = tuple(name for name in args.variants.split(",") if name)
  if (
      len(variants) < 2
      or len(set(variants)) != len(variants)
      or any(v not in _common.VARIANTS for v in variants)
  ):
    raise ValueError(
        f"--variants must be two or more distinct names among "
        f"{','.join(_common.VARIANTS)}; got {args.variants!r}"
    )
  return variants


def run_command(
    argv: Sequence[str] | None,
    *,
    benchmark: str,
    description: str,
    title: str,
    repetitions: int,
    window_s: float,
    table: Callable[[Sequence[dict[str, Any]], str, Sequence[str]], str],
) -> int:
  """The command line of the timed-step benchmarks (this one and ``gpu_throughput``).

  Parses ``argv``, measures every selected case with :func:`measure_case`, prints a header
  line starting with ``title``, then ``table(results, device, variants)``; writes ``--json``.
  Returns the exit status (2 with one stderr line for bad input).
  """
  prog = f"python -m benchmarks.{benchmark}"
  args = build_parser(prog, description, repetitions=repetitions, window_s=window_s).parse_args(
      argv
  )
  device = _common.resolve_device(args.device)
  try:
    cases, variants = selected_cases(args, device), selected_variants(args)
  except ValueError as error:
    return cli.fail(prog, error)
  if args.structures:
    variants += tuple(v for v in _common.STRUCTURED_VARIANTS if v not in variants)
  repetitions, window_s = _common.timing_budget(args)
  info = _common.machine_info()
  print(
      f"{title} on {_common.describe_machine(info)}; median of {repetitions} interleaved "
      "repetitions [25th-75th percentile]" + (" [TINY: not a result]" if args.tiny else ""),
      flush=True,
  )
  results, events = [], []
  for case in cases:
    results.append(
        measure_case(
            case,
            variants=variants,
            repetitions=repetitions,
            window_s=window_s,
            total_steps=args.total_steps,
        )
    )
    print(f"  measured {case.label}", flush=True)
    if args.structures:
      events.append(measure_events(case, repetitions=repetitions, window_s=window_s))
      print(f"  measured one event of each structure on {case.label}", flush=True)
  print(table(results, device, variants))
  if args.structures:
    print("one pruning event (half the prunable weights), its cost = event - steady update:")
    print(prune_event.structure_event_table(events))
  if args.json:
    _common.write_json(
        args.json,
        {
            "benchmark": benchmark,
            "machine": info,
            "device": device,
            "tiny": args.tiny,
            "repetitions": repetitions,
            "total_steps": args.total_steps,
            "results": results,
            **({"events": events} if args.structures else {}),
        },
    )
  return 0


def measure_events(case: Case, *, repetitions: int, window_s: float) -> dict[str, Any]:
  """One event of each structure on ``case``'s model, against its dense step (a fresh model
  and runner: the step runners' donated states are gone)."""
  model = _common.init_model(case)
  return prune_event.measure_structure_events(
      case,
      model,
      reference=_common.StepRunner(case, _common.DENSE, model=model),
      repetitions=repetitions,
      window_s=window_s,
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: runs the cases, prints the table, optionally writes ``--json``."""
  return run_command(
      argv,
      benchmark="step_overhead",
      description=__doc__.splitlines()[0],
      title="step overhead",
      repetitions=11,
      window_s=0.5,
      table=overhead_table,
  )


if __name__ == "__main__":
  sys.exit(main())
