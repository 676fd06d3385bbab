"""Accuracy against sparsity per method: ``python -m experiments.plot WORKDIR... [--output F]``.

Reads every ``summary.json`` under the given folders (a run folder, or any folder above many
runs), groups the runs by (dataset, model, method, target sparsity), and

* prints one table: mean +- sample standard deviation (ddof=1; 0 for a single seed) of the
  final test accuracy over the seeds, the number of seeds and the mean live weights;
* draws one panel per (dataset, model), like the paper's figures: test accuracy against
  sparsity, one line per method with error bars over seeds, the dense run as a horizontal
  line. The x axis is ``-log10(1 - sparsity)`` so 90%, 99% and 99.9% are evenly spaced.

Runs on synthetic data are left out (they are not results) unless ``--include_synthetic``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from experiments import cli

SUMMARY_FILE = "summary.json"


class Group(NamedTuple):
  """Runs of one (dataset, model, method, target sparsity) across seeds."""

  dataset: str
  model: str
  method: str
  sparsity: float
  accuracies: tuple[float, ...]
  live_weights: tuple[int, ...]
  synthetic: bool

  @property
  def mean(self) -> float:
    return statistics.fmean(self.accuracies)

  @property
  def std(self) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def find_summaries(folders: Sequence[str | Path]) -> list[Path]:
  """Every summary.json in or under ``folders`` (sorted, without duplicates)."""
  found = set()
  for folder in map(Path, folders):
    if folder.is_file() and folder.name == SUMMARY_FILE:
      found.add(folder.resolve())
    elif folder.is_dir():
      found.update(path.resolve() for path in folder.rglob(SUMMARY_FILE))
  return sorted(found)


def group_runs(summaries: Sequence[dict], include_synthetic: bool = False) -> list[Group]:
  """Groups summary dicts by (dataset, model, method, target sparsity); dense ignores sparsity."""
  runs = defaultdict(list)
  for summary in summaries:
    if summary.get("synthetic") and not include_synthetic:
      continue
    config = summary["config"]
    sparsity = 0.0 if config["method"] == "dense" else float(config["sparsity"])
    key = (
        config["dataset"],
        config["model"],
        config["method"],
        sparsity,
        bool(summary.get("synthetic")),
    )
    runs[key].append(summary)
  return [
      Group(
          dataset,
          model,
          method,
          sparsity,
          tuple(float(run["test_accuracy"]) for run in members),
          tuple(int(run["live_weights"]) for run in members),
          synthetic,
      )
      for (dataset, model, method, sparsity, synthetic), members in sorted(runs.items())
  ]


def format_table(groups: Sequence[Group]) -> str:
  """One row per group: accuracy mean +- std over seeds (in %), seeds, mean live weights."""
  headers = ["dataset", "model", "method", "sparsity", "test accuracy (%)", "seeds", "live weights"]
  rows = [
      [
          group.dataset,
          group.model,
          group.method + (" [SYNTHETIC]" if group.synthetic else ""),
          f"{group.sparsity:.4%}",
          f"{100 * group.mean:.2f} ± {100 * group.std:.2f}",
          len(group.accuracies),
          f"{round(statistics.fmean(group.live_weights)):,}",
      ]
      for group in groups
  ]
  return cli.format_table(headers, rows)


def _sparsity_axis(sparsity: float) -> float:
  """``-log10(1 - s)``: 90% -> 1, 99% -> 2, 99.9% -> 3."""
  return -math.log10(1.0 - sparsity)


def draw(groups: Sequence[Group], output: Path) -> None:
  """One panel per (dataset, model): accuracy vs sparsity per method, dense as a line."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = sorted({(group.dataset, group.model) for group in groups})
  figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for axis, (dataset, model) in zip(axes[0], panels):
    members = [group for group in groups if (group.dataset, group.model) == (dataset, model)]
    pruned = [group for group in members if group.method != "dense"]
    for method in dict.fromkeys(group.method for group in pruned):
      points = sorted(
          (group for group in pruned if group.method == method), key=lambda group: group.sparsity
      )
      axis.errorbar(
          [_sparsity_axis(group.sparsity) for group in points],
          [100 * group.mean for group in points],
          yerr=[100 * group.std for group in points],
          marker="o",
          capsize=3,
          label=method,
      )
    for group in members:
      if group.method == "dense":
        axis.axhline(
            100 * group.mean, color="gray", linestyle="--", label=f"dense ({100 * group.mean:.1f}%)"
        )
    ticks = sorted({group.sparsity for group in pruned})
    axis.set_xticks([_sparsity_axis(sparsity) for sparsity in ticks])
    axis.set_xticklabels(
        [f"{sparsity:.4g}" for sparsity in (100 * sparsity for sparsity in ticks)], rotation=45
    )
    axis.set_xlabel("sparsity (%)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"{model} / {dataset}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  figure.tight_layout()
  output.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(output, dpi=120)
  plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the table and writes the PNG; returns 2 (one stderr line) when nothing is found."""
  parser = cli.OneLineParser(
      prog="python -m experiments.plot", description="Test accuracy against sparsity per method."
  )
  parser.add_argument("workdirs", nargs="+", help="run folders or folders above them")
  parser.add_argument(
      "--output",
      default=None,
      help="PNG to write (default: accuracy_vs_sparsity.png in the first folder)",
  )
  parser.add_argument(
      "--include_synthetic",
      action="store_true",
      help="also show runs on synthetic data (marked [SYNTHETIC])",
  )
  try:
    args = parser.parse_args(argv)
  except SystemExit as exit_request:
    return int(exit_request.code or 0)
  paths = find_summaries(args.workdirs)
  try:
    summaries = [json.loads(path.read_text()) for path in paths]
    groups = group_runs(summaries, args.include_synthetic)
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
    print(
        f"{parser.prog}: error: a summary.json is malformed ({error}); "
        "rerun that run or remove it",
        file=sys.stderr,
    )
    return 2
  if not groups:
    skipped = " (only synthetic runs; add --include_synthetic)" if paths else ""
    print(
        f"{parser.prog}: error: no {SUMMARY_FILE} of a finished run under "
        f"{' '.join(args.workdirs)}{skipped}",
        file=sys.stderr,
    )
    return 2
  output = Path(args.output) if args.output else Path(args.workdirs[0]) / "accuracy_vs_sparsity.png"
  print(format_table(groups))
  draw(groups, output)
  print(f"plot: {output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
