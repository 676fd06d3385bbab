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
  flips = {n: jnp.asarray(rng.integers(0, 8, (rows, columns), np.int32)) for n in names}
  masks = {n: jnp.ones((rows, columns), bool) for n in names}
  event_step = flipout.event_steps(_TARGET, _TOTAL_STEPS)[0]
  state = lambda count: flipout.PruneState(jnp.asarray(count, jnp.int32), masks, flips)
  return EventProblem(params, grads, state(event_step - 1), state(0), leaves * rows * columns)


@functools.lru_cache(maxsize=1)
def event_update():
  """The jitted ``update`` of ``prune(0.5, total_steps=3)``: one event, at step 2."""
  return jax.jit(flipout.prune(_TARGET, total_steps=_TOTAL_STEPS).update)


def _pruned_count(state: flipout.PruneState) -> int:
  return sum(
      int(np.size(m) - np.count_nonzero(np.asarray(m))) for m in jax.tree.leaves(state.masks)
  )


def check_branches(update, problem: EventProblem) -> None:
  """The event update prunes exactly ``round(0.5 N)`` weights, the steady one none.

  Raises:
    RuntimeError: otherwise (the timings would not measure what they claim).
  """
  _, after_event = update(problem.grads, problem.event_state, problem.params)
  _, after_steady = update(problem.grads, problem.steady_state, problem.params)
  expected = round(_TARGET * problem.size)
  if _pruned_count(after_event) != expected or _pruned_count(after_steady) != 0:
    raise RuntimeError(
        f"prune_event: expected the event to prune {expected} of {problem.size} weights and the "
        f"steady update none; got {_pruned_count(after_event)} and {_pruned_count(after_steady)}"
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
