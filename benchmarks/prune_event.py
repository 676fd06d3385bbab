r"""Cost of one pruning event, in dense training steps, and how it grows with the weight count.

``python -m benchmarks.prune_event`` builds synthetic prunable weights (``--sizes``, default
1M, 20M and 100M, split over ``--leaves`` 2-D leaves) and times ``flipout.prune``'s jitted
``update`` twice per size, side by side with a dense training step of the reference model
(VGG19, batch 32, on the same machine, in the same process):

* at an event step (the state's counter is one before the event: every call is an event);
* at a step without an event (the steady cost: masking and flip counting).

The event's cost is their difference, :math:`t_{event} - t_{steady}`, expressed in reference
steps as the median over interleaved repetitions of
:math:`(t_{event} - t_{steady}) / t_{reference}`. Linear growth means a constant time per
weight; the table reports it (ns/weight) for each size. The event ranks the FlipOut scores
with a 13-pass search over uint32 keys (5 thresholds counted per pass over the weights); for
comparison, a full ``jnp.argsort`` of the same number of scores is timed up to
``--argsort_max`` weights.

Before timing, every event is checked to prune exactly ``round(0.5 N)`` weights and every
steady update none, so the timed branches are the intended ones.
"""

from __future__ import annotations

import functools
import statistics
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flipout_jax as flipout
from benchmarks import _common
from experiments import cli
from benchmarks._common import Case

REFERENCE = Case("vgg19", 32, _common.CIFAR_SHAPE)
TINY_REFERENCE = _common.TINY_CASES[0]
# One event, at step event_steps(0.5, 3)[0] == 2, pruning round(0.5 N) weights.
_TARGET, _TOTAL_STEPS = 0.5, 3
_COLUMNS = 256  # default width of the synthetic 2-D leaves
GOAL_AT_20M = 0.25  # issue 5: an event costs <= 0.25 of a VGG19 step at 20M weights
# What step_overhead --structures compares one event of (prune's `structure`).
STRUCTURES = ("weight", "unit", "2:4")


class EventProblem(NamedTuple):
  """Synthetic weights with their gradients and the states before an event / a plain step."""

  params: dict[str, jax.Array]
  grads: dict[str, jax.Array]
  event_state: flipout.PruneState
  steady_state: flipout.PruneState
  size: int


def parse_size(text: str) -> int:
  """``"20M"`` -> 20_000_000, ``"500K"`` -> 500_000, ``"1000"`` -> 1000.

  Raises:
    ValueError: not a positive count.
  """
  multiplier = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
  digits = text[:-1] if multiplier > 1 else text
  try:
    value = round(float(digits) * multiplier)
  except (ValueError, OverflowError):
    value = 0
  if value < 1:
    raise ValueError(f"sizes must be positive weight counts like 1M or 500K; got {text!r}")
  return value


def make_problem(size: int, leaves: int, seed: int = 0, columns: int = _COLUMNS) -> EventProblem:
  """``leaves`` float32 leaves of shape ``(rows, columns)`` holding about ``size`` weights.

  Weights are standard normal, gradients 0.01x standard normal, flip counts uniform in 0..7
  (so FlipOut scores differ), everything drawn by NumPy.
  """
  rows = max(1, round(size / leaves / columns))
  rng = np.random.default_rng(seed)
  names = [f"layer{index}" for index in range(leaves)]
  draw = lambda scale: {
      n: jnp.asarray(scale * rng.standard_normal((rows, columns), np.float32)) for n in names
  }
  params, grads = draw(np.float32(1.0)), draw(np.float32(0.01))
  masks = {n: jnp.ones((rows, columns), bool) for n in names}
  return _problem(params, grads, masks, rng)


def _problem(params, grads, masks, rng: np.random.Generator) -> EventProblem:
  """The states before the event and before a plain step, all live, with int32 flip counts
  uniform in 0..7 (the widest counters; differing counts make FlipOut's scores differ)."""
  flips = jax.tree.map(lambda m: jnp.asarray(rng.integers(0, 8, m.shape, np.int32)), masks)
  event_step = flipout.event_steps(_TARGET, _TOTAL_STEPS)[0]
  state = lambda count: flipout.PruneState(jnp.asarray(count, jnp.int32), masks, flips)
  size = sum(int(np.size(m)) for m in jax.tree.leaves(masks))
  return EventProblem(params, grads, state(event_step - 1), state(0), size)


def structure_prune(structure: str, unit_groups=None) -> optax.GradientTransformation:
  """``prune`` with one event, at step 2, pruning half of the prunable weights by ``structure``
  (one of :data:`STRUCTURES`): ``unit`` with ``unit_groups``; ``2:4`` on the kernels whose
  input width is a multiple of 4, as the trainer's ``--structure=2:4``."""
  if structure == "weight":
    return flipout.prune(_TARGET, total_steps=_TOTAL_STEPS)
  if structure == "unit":  # the kernels only, so that every structure prunes the same weights
    units = flipout.units(unit_groups)
    return flipout.prune(
        _TARGET, total_steps=_TOTAL_STEPS, structure=units, where=unit_groups.kernels
    )
  divisible = lambda path, leaf: len(leaf.shape) >= 2 and leaf.shape[-2] % 4 == 0
  return flipout.prune(None, total_steps=_TOTAL_STEPS, structure=structure, where=divisible)


def model_problem(params, tx: optax.GradientTransformation, seed: int = 0) -> EventProblem:
  """A model's ``params`` with 0.01x standard-normal gradients, pruned by ``tx``
  (:func:`structure_prune`) at its prunable leaves."""
  rng = np.random.default_rng(seed)
  grads = jax.tree.map(
      lambda p: jnp.asarray(np.float32(0.01) * rng.standard_normal(p.shape, np.float32)), params
  )
  return _problem(params, grads, tx.init(params).masks, rng)


@functools.lru_cache(maxsize=1)
def event_update():
  """The jitted ``update`` of ``prune(0.5, total_steps=3)``: one event, at step 2."""
  return jax.jit(flipout.prune(_TARGET, total_steps=_TOTAL_STEPS).update)


def _pruned_count(state: flipout.PruneState) -> int:
  return sum(
      int(np.size(m) - np.count_nonzero(np.asarray(m))) for m in jax.tree.leaves(state.masks)
  )


def check_branches(update, problem: EventProblem, *, whole_groups: bool = False) -> None:
  """The event update prunes exactly ``round(0.5 N)`` weights (with ``whole_groups``: at least
  that many, and not all), the steady one none.

  Raises:
    RuntimeError: otherwise (the timings would not measure what they claim).
  """
  _, after_event = update(problem.grads, problem.event_state, problem.params)
  _, after_steady = update(problem.grads, problem.steady_state, problem.params)
  expected = round(_TARGET * problem.size)
  pruned = _pruned_count(after_event)
  right = expected <= pruned < problem.size if whole_groups else pruned == expected
  if not right or _pruned_count(after_steady) != 0:
    expected_text = f"at least {expected}, not all," if whole_groups else str(expected)
    raise RuntimeError(
        f"prune_event: expected the event to prune {expected_text} of {problem.size} weights "
        f"and the steady update none; got {pruned} and {_pruned_count(after_steady)}"
    )


def _update_runner(update, problem: EventProblem, state: flipout.PruneState):
  def run(calls: int) -> None:
    outputs = None
    for _ in range(calls):
      outputs = update(problem.grads, state, problem.params)
    jax.block_until_ready(outputs)

  return run


def _argsort_runner(size: int, seed: int):
  scores = jnp.asarray(np.random.default_rng(seed).random(size, np.float32))
  argsort = jax.jit(jnp.argsort)

  def run(calls: int) -> None:
    outputs = None
    for _ in range(calls):
      outputs = argsort(scores)
    jax.block_until_ready(outputs)

  return run


def _differences(minuend: Sequence[float], subtrahend: Sequence[float]) -> list[float]:
  return [a - b for a, b in zip(minuend, subtrahend, strict=True)]


def measure_size(
    size: int,
    *,
    leaves: int,
    reference: _common.StepRunner,
    repetitions: int,
    window_s: float,
    seed: int = 0,
    columns: int = _COLUMNS,
) -> dict[str, Any]:
  """Times the event and steady updates of ``size`` weights against the reference step."""
  problem = make_problem(size, leaves, seed, columns)
  update = event_update()
  check_branches(update, problem)
  timings = _common.interleaved_timings(
      {
          "reference": reference,
          "event": _update_runner(update, problem, problem.event_state),
          "steady": _update_runner(update, problem, problem.steady_state),
      },
      repetitions=repetitions,
      window_s=window_s,
  )
  seconds = timings.seconds
  event_cost = _differences(seconds["event"], seconds["steady"])
  return {
      "size": problem.size,
      "leaves": leaves,
      "reference_seconds": statistics.median(seconds["reference"]),
      "event_update_seconds": statistics.median(seconds["event"]),
      "steady_update_seconds": statistics.median(seconds["steady"]),
      "event_cost_seconds": statistics.median(event_cost),
      "event_cost_in_steps": _common.median_ratio(event_cost, seconds["reference"]),
      "event_cost_in_steps_p25_p75": _common.ratio_spread(event_cost, seconds["reference"]),
      "ns_per_weight": 1e9 * statistics.median(event_cost) / problem.size,
      "samples": seconds,
  }


def measure_structure_events(
    case: Case,
    model: _common.PureModel,
    *,
    reference: _common.StepRunner,
    repetitions: int,
    window_s: float,
    seed: int = 0,
) -> dict[str, Any]:
  """Times one event of each of :data:`STRUCTURES` on ``model``'s params, side by side.

  Each structure's event cost (event update minus steady update, per repetition) is given in
  ``reference`` steps and against the ``weight`` structure's event cost of the same repetition.

  Returns:
    ``{"model", "batch_size", "reference_seconds", "structures": {structure: {"size",
    "event_update_seconds", "steady_update_seconds", "event_cost_seconds",
    "event_cost_in_steps", "event_cost_vs_weight"}}, "samples"}``, the ratios as
    :func:`benchmarks._common.ratio_summary`.
  """
  runners: dict[str, Any] = {"reference": reference}
  sizes = {}
  for structure in STRUCTURES:
    groups = _common.unit_groups_of(case) if structure == "unit" else None
    tx = structure_prune(structure, groups)
    problem = model_problem(model.params, tx, seed)
    update = jax.jit(tx.update)
    check_branches(update, problem, whole_groups=structure == "unit")
    runners[f"{structure} event"] = _update_runner(update, problem, problem.event_state)
    runners[f"{structure} steady"] = _update_runner(update, problem, problem.steady_state)
    sizes[structure] = problem.size
  seconds = _common.interleaved_timings(runners, repetitions=repetitions, window_s=window_s).seconds
  costs = {s: _differences(seconds[f"{s} event"], seconds[f"{s} steady"]) for s in STRUCTURES}
  return {
      "model": case.model,
      "batch_size": case.batch_size,
      "reference_seconds": statistics.median(seconds["reference"]),
      "structures": {
          s: {
              "size": sizes[s],
              "event_update_seconds": statistics.median(seconds[f"{s} event"]),
              "steady_update_seconds": statistics.median(seconds[f"{s} steady"]),
              "event_cost_seconds": statistics.median(costs[s]),
              "event_cost_in_steps": _common.ratio_summary(costs[s], seconds["reference"]),
              "event_cost_vs_weight": _common.ratio_summary(costs[s], costs["weight"]),
          }
          for s in STRUCTURES
      },
      "samples": seconds,
  }


def structure_event_table(results: Sequence[dict[str, Any]]) -> str:
  """One row per (case, structure) of :func:`measure_structure_events`: update times, the
  event's cost and its ratios (median [25th-75th percentile])."""
  headers = [
      "model",
      "batch",
      "structure",
      "prunable weights",
      "event update ms",
      "steady update ms",
      "event cost ms",
      "event / dense step",
      "event / weight event",
  ]
  rows = [
      [
          result["model"],
          result["batch_size"],
          structure,
          f"{row['size']:,}",
          f"{1e3 * row['event_update_seconds']:.2f}",
          f"{1e3 * row['steady_update_seconds']:.2f}",
          f"{1e3 * row['event_cost_seconds']:.2f}",
          _common.format_ratio(row["event_cost_in_steps"]),
          _common.format_ratio(row["event_cost_vs_weight"]),
      ]
      for result in results
      for structure, row in result["structures"].items()
  ]
  return cli.format_table(headers, rows)


def measure_argsort(
    size: int, *, reference: _common.StepRunner, repetitions: int, seed: int = 0
) -> dict[str, Any]:
  """Times ``jnp.argsort`` of ``size`` float32 scores against the reference step."""
  timings = _common.interleaved_timings(
      {"reference": reference, "argsort": _argsort_runner(size, seed)},
      repetitions=repetitions,
      window_s=0.0,
      warmup_calls=1,
  )
  return {
      "size": size,
      "argsort_seconds": statistics.median(timings.seconds["argsort"]),
      "argsort_in_steps": _common.median_ratio(
          timings.seconds["argsort"], timings.seconds["reference"]
      ),
  }


def linearity(results: Sequence[dict[str, Any]]) -> float:
  """Event time per weight at the largest size over that at the smallest (1.0 = linear)."""
  ordered = sorted(results, key=lambda r: r["size"])
  return ordered[-1]["ns_per_weight"] / ordered[0]["ns_per_weight"]


def event_table(
    results: Sequence[dict[str, Any]], argsorts: dict[int, dict[str, Any]], reference_label: str
) -> str:
  """The printed table, one row per size."""
  headers = [
      "prunable weights",
      "event update ms",
      "steady update ms",
      "event cost ms",
      f"event / {reference_label} step [IQR]",
      "ns per weight",
      "argsort ms",
      f"argsort / {reference_label} step",
  ]
  rows = []
  for r in results:
    low, high = r["event_cost_in_steps_p25_p75"]
    argsort = argsorts.get(r["size"])
    rows.append(
        [
            f"{r['size']:,}",
            f"{1e3 * r['event_update_seconds']:.1f}",
            f"{1e3 * r['steady_update_seconds']:.1f}",
            f"{1e3 * r['event_cost_seconds']:.1f}",
            f"{r['event_cost_in_steps']:.3f} [{low:.3f}-{high:.3f}]",
            f"{r['ns_per_weight']:.2f}",
            "-" if argsort is None else f"{1e3 * argsort['argsort_seconds']:.0f}",
            "-" if argsort is None else f"{argsort['argsort_in_steps']:.2f}",
        ]
    )
  return cli.format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: measures each size, prints the table, optionally writes ``--json``."""
  prog = "python -m benchmarks.prune_event"
  parser = cli.OneLineParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument(
      "--sizes",
      default="1M,20M,100M",
      help="comma-separated prunable weight counts (K/M/G suffixes)",
  )
  parser.add_argument(
      "--leaves",
      type=cli.positive_int,
      default=4,
      help="number of 2-D leaves the weights are split over",
  )
  parser.add_argument(
      "--columns",
      type=cli.positive_int,
      default=_COLUMNS,
      help="width of each 2-D leaf (256: leaf sizes are multiples of 32, as in most networks)",
  )
  parser.add_argument(
      "--argsort_max", default="20M", help="time jnp.argsort for sizes up to this count (0: never)"
  )
  parser.add_argument(
      "--argsort_repetitions",
      type=cli.positive_int,
      default=2,
      help="timed argsort calls per size",
  )
  _common.add_timing_arguments(parser, repetitions=7, window_s=1.0)
  args = parser.parse_args(argv)
  try:
    sizes = (
        [4_096, 16_384]
        if args.tiny
        else [parse_size(text) for text in args.sizes.split(",") if text]
    )
    argsort_max = parse_size(args.argsort_max) if args.argsort_max not in ("0", "") else 0
  except ValueError as error:
    return cli.fail(prog, error)
  if not sizes:
    return cli.fail(prog, "--sizes must name at least one size, like 1M,20M")
  repetitions, window_s = _common.timing_budget(args)
  reference_case = TINY_REFERENCE if args.tiny else REFERENCE
  info = _common.machine_info()
  print(
      f"pruning event cost on {_common.describe_machine(info)}; unit: one dense "
      f"{reference_case.label} training step; median of {repetitions} interleaved "
      "repetitions" + (" [TINY: not a result]" if args.tiny else ""),
      flush=True,
  )
  reference = _common.StepRunner(reference_case, _common.DENSE)
  results, argsorts = [], {}
  for size in sizes:
    results.append(
        measure_size(
            size,
            leaves=args.leaves,
            reference=reference,
            repetitions=repetitions,
            window_s=window_s,
            columns=args.columns,
        )
    )
    actual = results[-1]["size"]
    if actual <= argsort_max:
      argsorts[actual] = measure_argsort(
          actual, reference=reference, repetitions=args.argsort_repetitions
      )
    print(f"  measured {actual:,} weights", flush=True)
  reference_ms = 1e3 * statistics.median(r["reference_seconds"] for r in results)
  print(f"{reference_case.label} dense training step: {reference_ms:.1f} ms (median)")
  print(event_table(results, argsorts, reference_case.model))
  growth = linearity(results)
  print(
      f"linearity: time per weight at {max(r['size'] for r in results):,} / at "
      f"{min(r['size'] for r in results):,} = {growth:.2f} (1.00 = linear); "
      f"goal: <= {GOAL_AT_20M} {REFERENCE.label} step at 20M"
  )
  if args.json:
    _common.write_json(
        args.json,
        {
            "benchmark": "prune_event",
            "machine": info,
            "tiny": args.tiny,
            "reference": reference_case._asdict(),
            "repetitions": repetitions,
            "columns": args.columns,
            "results": results,
            "argsort": list(argsorts.values()),
            "linearity": growth,
        },
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
