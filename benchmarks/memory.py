r"""Memory of FlipOut pruning: state bytes per prunable weight, and a training step's peak.

``python -m benchmarks.memory`` needs no weights in memory: shapes come from ``nnx.eval_shape``
and ``jax.eval_shape(tx.init, params)``, and the train step is compiled for abstract
arguments.

* **State per prunable weight**: the optimizer state of each chain (``dense``, ``prune``,
  ``flipout``; see ``benchmarks/_common.py``) minus the dense chain's, in bytes, divided by
  the number of prunable weights (kernels). FlipOut keeps a bool mask and a flip counter per
  prunable weight: 3 bytes with the uint16 counters of runs whose last event is at step
  65535 or earlier (``--total_steps 60000``), 5 with int32 ones (the default, 10^8 steps).
  The goal (issue 5) is <= 5 bytes.
* **Peak memory of a step**: from XLA's buffer assignment of the compiled step
  (``compiled.memory_analysis()``), with the state donated as in a training loop:

  .. math::
     \mathrm{peak} = \mathrm{arguments} + \mathrm{outputs} - \mathrm{aliased} + \mathrm{temporaries}

  (donated outputs reuse their argument's buffer; XLA holds the temporaries as one block for
  the whole step). The pruning event is a branch of the same program, so its scratch memory
  is included. The ratio to the dense chain's peak is reported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import flipout_jax as flipout
from benchmarks import _common
from experiments import cli
from benchmarks import step_overhead
from benchmarks._common import DENSE, Case

GOAL_BYTES_PER_WEIGHT = 5.0
_MIB = 2**20


def tree_bytes(tree) -> int:
  """Total bytes of the array (or ``ShapeDtypeStruct``) leaves of ``tree``."""
  return sum(
      int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
  )


def prunable_weight_count(opt_state) -> int:
  """Number of prunable weights: entries of the masks in the pruning state."""
  return sum(int(np.prod(mask.shape)) for mask in jax.tree.leaves(flipout.masks(opt_state)))


def step_peak_bytes(stats) -> int:
  """Peak device bytes of a compiled step from its ``memory_analysis()`` (see module docs)."""
  return (
      stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      - stats.alias_size_in_bytes
      + stats.temp_size_in_bytes
  )


def analyse_variant(
    case: Case, variant: str, model: _common.PureModel, total_steps: int
) -> dict[str, Any]:
  """Optimizer-state bytes and the compiled step's memory analysis for one chain."""
  tx, step = _common.model_chain_and_step(model, variant, total_steps, case=case)
  opt_state = jax.eval_shape(tx.init, model.params)
  compiled = step.lower(
      (model.params, model.batch_stats, opt_state), *_common.abstract_batch(case)
  ).compile()
  stats = compiled.memory_analysis()
  return {
      "opt_state_bytes": tree_bytes(opt_state),
      "prunable_weights": None if variant == DENSE else prunable_weight_count(opt_state),
      "argument_bytes": stats.argument_size_in_bytes,
      "output_bytes": stats.output_size_in_bytes,
      "alias_bytes": stats.alias_size_in_bytes,
      "temp_bytes": stats.temp_size_in_bytes,
      "peak_bytes": step_peak_bytes(stats),
  }


def analyse_case(
    case: Case, variants: Sequence[str], total_steps: int = _common.STEADY_TOTAL_STEPS
) -> dict[str, Any]:
  """All variants of one case; bytes per prunable weight and peak ratios against the first."""
  model = _common.abstract_model(case)
  analyses = {variant: analyse_variant(case, variant, model, total_steps) for variant in variants}
  baseline = analyses[variants[0]]
  prunable = next((a["prunable_weights"] for a in analyses.values() if a["prunable_weights"]), None)
  extra_state = {
      v: (a["opt_state_bytes"] - baseline["opt_state_bytes"]) / prunable
      for v, a in analyses.items()
      if prunable and v != variants[0]
  }
  return {
      "model": case.model,
      "batch_size": case.batch_size,
      "total_steps": total_steps,
      "params_bytes": tree_bytes(model.params),
      "prunable_weights": prunable,
      "state_bytes_per_prunable_weight": extra_state,
      "peak_ratio": {
          v: a["peak_bytes"] / baseline["peak_bytes"]
          for v, a in analyses.items()
          if v != variants[0]
      },
      "variants": analyses,
  }


def memory_table(results: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
  """The printed table, one row per case."""
  base = variants[0]
  headers = (
      ["model", "batch", "prunable weights"]
      + [f"{v} state B/weight" for v in variants[1:]]
      + [f"{v} peak MiB" for v in variants]
      + [f"{v} / {base} peak" for v in variants[1:]]
  )
  rows = []
  for r in results:
    rows.append(
        [r["model"], r["batch_size"], f"{r['prunable_weights']:,}"]
        + [f"{r['state_bytes_per_prunable_weight'][v]:.4f}" for v in variants[1:]]
        + [f"{r['variants'][v]['peak_bytes'] / _MIB:.1f}" for v in variants]
        + [f"{r['peak_ratio'][v]:.3f}x" for v in variants[1:]]
    )
  return cli.format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: analyses the cases, prints the table, optionally writes ``--json``."""
  prog = "python -m benchmarks.memory"
  parser = cli.OneLineParser(prog=prog, description=__doc__.splitlines()[0])
  _common.add_case_arguments(parser)
  _common.add_run_length_argument(parser)
  parser.add_argument("--tiny", action="store_true", help="LeNet-300-100 at batch 16 only")
  parser.add_argument("--json", default=None, help="also write the results to this JSON file")
  args = parser.parse_args(argv)
  device = _common.resolve_device(args.device)
  try:
    cases = step_overhead.selected_cases(args, device)
    variants = step_overhead.selected_variants(args)
  except ValueError as error:
    return cli.fail(prog, error)
  if variants[0] != DENSE:
    return cli.fail(
        prog, f"--variants must start with {DENSE} (the baseline); " f"got {args.variants!r}"
    )
  info = _common.machine_info()
  print(
      f"memory on {_common.describe_machine(info)}; peak = arguments + outputs - aliased + "
      "temporaries of the compiled step (state donated)"
      + (" [TINY: not a result]" if args.tiny else ""),
      flush=True,
  )
  results = [analyse_case(case, variants, args.total_steps) for case in cases]
  print(memory_table(results, variants))
  print(f"goal: <= {GOAL_BYTES_PER_WEIGHT:g} bytes of pruning state per prunable weight")
  if args.json:
    _common.write_json(
        args.json,
        {
            "benchmark": "memory",
            "machine": info,
            "device": device,
            "tiny": args.tiny,
            "results": results,
        },
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
