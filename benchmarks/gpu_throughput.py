"""Training throughput, dense vs FlipOut, and the projected wall time of the paper's run.

``python -m benchmarks.gpu_throughput`` times VGG19 and ResNet18 training steps at batch 128
on synthetic CIFAR-shaped arrays (always synthetic: it imports neither tensorflow-datasets nor
``experiments.input_pipeline``, which the GPU image lacks) with the chains of
``benchmarks/_common.py`` side by side in one process:

* ``dense``:   add_decayed_weights(5e-4) -> sgd(momentum 0.9)
* ``prune``:   the same -> flipout.prune(0.999)
* ``flipout``: gradient_noise(1.0) -> the same  (the paper's full chain)

(``total_steps`` of the pruning schedule is 10^8 so that no event falls in the timed steps;
the steady step does not depend on it). It prints images/s of each chain, the ratios to dense
(median of interleaved repetitions) and the projected wall time of the paper's 350-epoch
CIFAR-10 run: ``350 * floor(50000 / 128)`` steady steps at the median step time. Not in the
projection: the run's 10 pruning events (``benchmarks.prune_event`` measures one), evaluation,
and the trainer's on-device crop/flip. One command prints the whole table, sized to finish
within 10 minutes on one H100 (``--device`` picks the GPU cases there automatically).

On CPU ``--tiny`` runs a LeNet-300-100 smoke test (not a result).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from experiments import cli
from benchmarks import step_overhead

PAPER_EPOCHS = 350
CIFAR10_TRAIN_IMAGES = 50_000


def steps_per_epoch(batch_size: int) -> int:
  """Steps of one CIFAR-10 epoch (the last partial batch is dropped, as the trainer does)."""
  return CIFAR10_TRAIN_IMAGES // batch_size


def throughput_rows(result: dict[str, Any], variants: Sequence[str]) -> list[list[str]]:
  """Table rows of one case: images/s, ratio to the first variant, projected hours."""
  batch = result["batch_size"]
  total_steps = PAPER_EPOCHS * steps_per_epoch(batch)
  rows = []
  for variant in variants:
    seconds = result["seconds_per_step"][variant]
    ratio = (
        "1 (baseline)"
        if variant == variants[0]
        else step_overhead.format_ratio(result["ratios"][variant])
    )
    rows.append(
        [
            result["model"],
            batch,
            variant,
            f"{1e3 * seconds:.2f}",
            f"{batch / seconds:,.0f}",
            ratio,
            f"{total_steps * seconds / 3600:.2f}",
        ]
    )
  return rows


def throughput_table(
    results: Sequence[dict[str, Any]], device: str, variants: Sequence[str]
) -> str:
  """The printed table, one row per (case, variant); says so when these are not GPU numbers."""
  headers = [
      "model",
      "batch",
      "chain",
      "ms/step",
      "images/s",
      f"step time / {variants[0]}",
      f"{PAPER_EPOCHS}-epoch run, hours",
  ]
  rows = [row for result in results for row in throughput_rows(result, variants)]
  note = "" if device == "gpu" else "(no GPU: these are CPU numbers)\n"
  return note + cli.format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: measures the cases, prints the table, optionally writes ``--json``."""
  return step_overhead.run_command(
      argv,
      benchmark="gpu_throughput",
      description=__doc__.splitlines()[0],
      title="throughput (synthetic data)",
      repetitions=11,
      window_s=1.0,
      table=throughput_table,
  )


if __name__ == "__main__":
  sys.exit(main())
