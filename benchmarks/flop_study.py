"""Pruning by units to FLOP targets on Fashion-MNIST: accuracy against dense, and speed.

``python -m benchmarks.flop_study`` trains, with the experiments' trainer
(``experiments.mnist --dataset=fashion_mnist``, PyTorch's initialisation, lr 0.01 for every
model and variant, chosen before any result: at the entry point's 0.1 FlipOut's noise broke
LeNet5, BENCHMARKS section 7), on paired seeds (same initialisation and data order):

* the models of :data:`MODELS`: a small CNN (conv 32, conv 64, dense 128), LeNet5 and a
  VGG-style net (two BatchNorm stages of two convs, 16 and 32 channels, dense 64);
* dense, and by units (``--structure=unit --unit_cost=flops --unit_normalize=mean
  --unit_round_to=4``: ``flipout.units(groups, cost="flops", normalize="mean",
  round_to=4)``) at the FLOP targets of :data:`TARGETS` with the scores of :data:`SCORES`
  (FlipOut with its noise, the paper's; global magnitude; first-order Taylor).

Each pruned run is compacted and timed against the same model uncompacted
(``experiments.compact``: batch 1000, the median of 21 interleaved calls). The report gives,
per model and variant, the mean of the per-seed differences of test accuracy to dense with a
95% t-interval (``benchmarks.fashion_study.paired_interval``), the FLOPs removed and the
speed-up; ``--plot`` draws accuracy against speed-up. Runs finished are kept in
``results-I.json`` (one per shard) under the work folder; the same command continues a study
cut short, ``--shard I/N`` splits the runs over processes and ``--only`` picks runs by name.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import structured_study
from benchmarks.structured_study import Run

# Per model: epochs and seeds.
MODELS = {
    "small_cnn": {"epochs": 3, "seeds": (0, 1, 2, 3, 4)},
    "lenet5": {"epochs": 3, "seeds": (0, 1, 2, 3, 4)},
    "vgg_small": {"epochs": 3, "seeds": (0, 1, 2, 3, 4)},
}
TARGETS = (0.5, 0.7, 0.85)
SCORES = ("flipout", "global_magnitude", "taylor")
DEFAULT_WORKDIR = "benchmarks/results/flop_study"  # tracked: results of a study cut short
RUNS_DIR = Path("runs/flop_study")  # not tracked: the checkpoints compaction reads

VARIANTS: dict[str, dict[str, Any]] = {"dense": {"method": "dense", "sparsity": 0.0}}
VARIANTS.update(
    {
        f"{score}@{target}": {
            "method": score,
            "sparsity": target,
            "structure": "unit",
            "unit_cost": "flops",
            "unit_normalize": "mean",
            "unit_round_to": 4,
        }
        for score in SCORES
        for target in TARGETS
    }
)
# Seed-major, so that a study cut short has whole seeds of every variant of a model.
STUDY = tuple(
    Run(model, variant, seed)
    for model, settings in MODELS.items()
    for seed in settings["seeds"]
    for variant in VARIANTS
)


def flags(run: Run, epochs: int | None = None) -> list[str]:
  """The ``experiments.mnist`` command line of one run (``epochs``: the model's if None)."""
  epochs = epochs or MODELS[run.model]["epochs"]
  return structured_study.fashion_mnist_flags(
      run, epochs, RUNS_DIR, lr=0.01, **VARIANTS[run.variant]
  )


def train_and_measure(run: Run, epochs: int | None = None) -> dict[str, Any]:
  """Trains one run with the experiments' command line; compacts and times a pruned one."""
  from experiments import compact

  run_dir = RUNS_DIR / run.name
  summary = structured_study.train(run, flags(run, epochs), run_dir)
  record = {"test_accuracy": summary["test_accuracy"]}
  if run.variant != "dense":
    report = compact.compact_run(run_dir)
    keys = ("speedup", "dense_flops", "compact_flops", "widths", "compact_parameters")
    record.update({key: report[key] for key in keys})
  return record


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Per model and pruned variant: accuracy to dense over the seeds where both finished."""
  rows = []
  for model, settings in MODELS.items():
    for variant in [v for v in VARIANTS if v != "dense"]:
      pairs = [
          (
              results["runs"].get(Run(model, variant, s).name),
              results["runs"].get(Run(model, "dense", s).name),
          )
          for s in settings["seeds"]
      ]
      pairs = [(a, b) for a, b in pairs if a and b]
      if not pairs:
        continue
      rows.append(
          {
              "model": model,
              "variant": variant,
              **structured_study.paired_accuracy(pairs),
              "flops_removed": statistics.mean(
                  1 - a["compact_flops"] / a["dense_flops"] for a, _ in pairs
              ),
              "speedup": statistics.median(a["speedup"] for a, _ in pairs),
          }
      )
  return rows


def report(results: dict[str, Any]) -> str:
  """A markdown table of :func:`comparisons`."""
  header = ("model", "variant", "seeds", "accuracy", "dense", "difference (95% CI)")
  header += ("FLOPs removed", "speed-up (median)")
  cells = [
      (
          row["model"],
          row["variant"],
          *structured_study.accuracy_cells(row),
          f"{100 * row['flops_removed']:.1f}%",
          f"{row['speedup']:.2f}x",
      )
      for row in comparisons(results)
  ]
  return "\n".join(structured_study.markdown_table(header, cells))


def plot(results: dict[str, Any], path: Path) -> None:
  """Accuracy difference to dense (95% interval) against the compacted speed-up, per model."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  rows = comparisons(results)
  models = [m for m in MODELS if any(r["model"] == m for r in rows)]
  figure, axes = plt.subplots(1, max(len(models), 1), figsize=(5 * max(len(models), 1), 4))
  for axis, model in zip(axes if len(models) > 1 else [axes], models):
    for score, marker in zip(SCORES, "o^s"):
      mine = [r for r in rows if r["model"] == model and r["variant"].startswith(score + "@")]
      if not mine:
        continue
      errors = [
          [r["difference"] - r["interval"][0] for r in mine],
          [r["interval"][1] - r["difference"] for r in mine],
      ]
      axis.errorbar(
          [r["speedup"] for r in mine],
          [r["difference"] for r in mine],
          yerr=errors,
          fmt=marker + "-",
          capsize=3,
          label=score,
      )
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set(title=model, xlabel="speed-up, CPU batch 1000", ylabel="accuracy - dense (points)")
    axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: trains the runs not yet in the results, prints the report."""
  plot_flag = dict(default=None, help="also draw the plot into this PNG file")
  parsed = structured_study.parse_study_args(
      "python -m benchmarks.flop_study", DEFAULT_WORKDIR, argv, plot=plot_flag
  )
  if parsed is None:
    return 2
  args, shard = parsed
  workdir = Path(args.workdir)
  if not args.table_only:
    measure = lambda run: train_and_measure(run, args.epochs)
    structured_study.run_pending(STUDY, workdir, args.only, shard, measure)
  results = structured_study.results_of(workdir)
  print(report(results))
  if args.plot:
    plot(results, Path(args.plot))
  return 0


if __name__ == "__main__":
  sys.exit(main())
