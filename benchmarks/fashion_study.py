"""FlipOut against global magnitude on Fashion-MNIST, with paired 95% confidence intervals.

``python -m benchmarks.fashion_study`` trains LeNet-300-100 (and LeNet5) on Fashion-MNIST's
60,000 training images and tests on its 10,000 test images, which no choice of the study
looks at before the end of a run (no tuning, no early stopping, one evaluation). Methods, as
``benchmarks.regime_study``: ``flipout`` (noise 1) and ``flipout_no_noise``,
``global_magnitude`` and ``global_magnitude_noise`` (noise 1), ``snip``, ``random``,
``dense``, the cubic schedule (``*_cubic``), and ``*_flax_init``: flipout and global
magnitude with the models' own initialisation instead of PyTorch's (``--init``), which every
other row uses, as the authors do. Sparsities 98.44%, 99.61% and 99.9%; budgets of 40 and 120
epochs with the paper's learning-rate shape; seeds 0-4 (initialisation, data order, noise).

The report compares each method with global magnitude run on the same seed (same
initialisation and data order): the mean of the per-seed differences of test accuracy with a
95% t-interval, and a method is called ahead or behind only where the interval excludes zero;
beside it the paired t-test's p-value and its Holm adjustment over the comparisons of the same
model and budget, for the question the intervals alone leave open (which results survive
the number of comparisons made).
Runs are trained in the priority order of :data:`STUDY` with ``benchmarks.regime_study``'s
machinery (lean compiled loop, ``results*.json`` saved after every run, ``--shard I/N`` over
processes, ``--table_only``); the same command continues a study cut short.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import regime_study
from benchmarks.regime_study import Block, Run
from experiments import cli

# name -> (experiments method, --noise_scale, --schedule, --init)
VARIANTS = {
    **{name: (*spec, "torch") for name, spec in regime_study.VARIANTS.items()},
    "flipout_flax_init": ("flipout", 1.0, "halving", "flax"),
    "global_magnitude_flax_init": ("global_magnitude", 0.0, "halving", "flax"),
}
# What each variant is compared with, on the same seeds: the variant that differs from it in
# the criterion alone (or, for global magnitude's own variants, in the one thing they change).
BASELINES = {
    "flipout": "global_magnitude",
    "flipout_no_noise": "global_magnitude",
    "global_magnitude_noise": "global_magnitude",
    "snip": "global_magnitude",
    "random": "global_magnitude",
    "flipout_cubic": "global_magnitude_cubic",
    "global_magnitude_cubic": "global_magnitude",
    "flipout_flax_init": "global_magnitude_flax_init",
    "global_magnitude_flax_init": "global_magnitude",
}
ABLATION = ("flipout", "flipout_no_noise", "global_magnitude", "global_magnitude_noise")
OTHERS = ("snip", "random", "dense")
FLAX_INIT = ("flipout_flax_init", "global_magnitude_flax_init")
SPARSITIES = regime_study.SPARSITIES
SEEDS = (0, 1, 2, 3, 4)
# Tracked (not under runs/): a study cut short is committed and continued by the next session.
DEFAULT_WORKDIR = "benchmarks/results/fashion_study"
_SETTINGS = {"dataset": "fashion_mnist", "lr_shape": "x0.1 at 150/350, 250/350"}
_TABLE_FILE = "fashion_study.md"
_PLOT_FILE = "fashion_study.png"


def _block(model, variants, sparsities, budgets) -> Block:
  return Block(model, tuple(variants), tuple(sparsities), tuple(budgets), SEEDS)


def _seed_by_seed(model, variants, sparsity, epochs) -> tuple[Block, ...]:
  """One block per seed: a study cut short ends with whole pairs (every variant of a seed)
  rather than all seeds of one variant and none of its baseline."""
  return tuple(Block(model, tuple(variants), (sparsity,), (epochs,), (seed,)) for seed in SEEDS)


# The conv net's budget: on this 2-core machine a LeNet5 epoch costs ~50 s of CPU (LeNet-300-100:
# ~1 s), so 40 epochs x 20 runs would be ~11 hours; 5 epochs (20 runs, ~1.5 hours) fit. A short
# budget, the regime that favours magnitude.
LENET5_EPOCHS = 5

# The study in order of priority: the comparison the issue is about first (FlipOut against
# global magnitude at 99.9%, 40 epochs, seed by seed; then their noise ablations; then the
# same at 99.61%, where the paper also has FlipOut ahead), then the initialisation, the other
# methods, 98.44%, FlipOut and magnitude at 120 epochs, the conv net (the one question with no
# answer yet), then the rest at 120 epochs and the cubic schedule. On a shared 2-core machine
# a 40-epoch LeNet-300-100 run took 45 s idle and 480 s under load.
STUDY = (
    *_seed_by_seed("lenet300", ("flipout", "global_magnitude"), SPARSITIES[2], 40),
    *_seed_by_seed("lenet300", ("flipout_no_noise", "global_magnitude_noise"), SPARSITIES[2], 40),
    *_seed_by_seed("lenet300", ABLATION, SPARSITIES[1], 40),
    _block("lenet300", FLAX_INIT, SPARSITIES[2:], (40,)),
    _block("lenet300", OTHERS, SPARSITIES[:0:-1], (40,)),
    _block("lenet300", ABLATION + OTHERS[:2], SPARSITIES[:1], (40,)),
    *_seed_by_seed("lenet300", ("flipout", "global_magnitude"), SPARSITIES[2], 120),
    *_seed_by_seed("lenet300", ("flipout", "global_magnitude"), SPARSITIES[1], 120),
    *_seed_by_seed("lenet5", ("flipout", "global_magnitude"), SPARSITIES[2], LENET5_EPOCHS),
    *_seed_by_seed("lenet5", ("flipout", "global_magnitude"), SPARSITIES[1], LENET5_EPOCHS),
    # FlipOut's noise left LeNet5 at chance on some seeds in section 7: the noise ablations say
    # whether the noise or the flip-count ranking does it here.
    *_seed_by_seed(
        "lenet5", ("flipout_no_noise", "global_magnitude_noise"), SPARSITIES[2], LENET5_EPOCHS
    ),
    _block("lenet300", ("flipout_no_noise", "global_magnitude_noise"), SPARSITIES[:0:-1], (120,)),
    _block("lenet300", regime_study.CUBIC_VARIANTS, SPARSITIES[:0:-1], (120,)),
    _block("lenet300", FLAX_INIT, SPARSITIES[2:], (120,)),
    _block("lenet300", OTHERS, SPARSITIES[:0:-1], (120,)),
    _block("lenet300", ABLATION + OTHERS[:2], SPARSITIES[:1], (120,)),
    _block("lenet300", regime_study.CUBIC_VARIANTS, SPARSITIES[:1], (120,)),
)
TINY_STUDY = (Block("lenet300", ("flipout", "global_magnitude"), (0.9,), (1,), (0, 1)),)
# The real-data demo (``--demo``): minutes on a laptop CPU, the same report.
DEMO_STUDY = (Block("lenet300", ("flipout", "global_magnitude"), SPARSITIES[1:2], (5,), (0, 1, 2)),)
DEMO_WORKDIR = "runs/fashion_demo"


def run_config(run: Run, data_dir: str | None):
  """The experiments' Config of one run: ``regime_study``'s (the MNIST entry point's recipe,
  the paper's learning-rate shape) on Fashion-MNIST, with the variant's initialisation."""
  *spec, init = VARIANTS[run.variant]
  config = regime_study.run_config(run, data_dir, tuple(spec))
  # Fashion-MNIST has its own test set: no split, so no split seed.
  return dataclasses.replace(config, dataset="fashion_mnist", data_seed=None, init=init)


@functools.lru_cache(maxsize=1)
def _dataset(data_dir: str | None):
  """Fashion-MNIST, read once per process (decompressing it takes seconds)."""
  from experiments import train as train_lib

  return train_lib.load_dataset(run_config(STUDY[0].runs()[0], data_dir))


def train_run(run: Run, data_dir: str | None) -> dict[str, Any]:
  """Trains one run with ``regime_study``'s loop; returns its record."""
  config = run_config(run, data_dir)
  return regime_study.train_run(run, "", config=config, dataset=_dataset(data_dir))


# ---------------------------------------------------------------------------------------------
# Paired comparisons.
# ---------------------------------------------------------------------------------------------


class Comparison(NamedTuple):
  """A variant against its baseline on the seeds both finished, in accuracy points (%)."""

  model: str
  sparsity: float
  epochs: int
  variant: str
  baseline: str
  seeds: int
  mean: float
  low: float
  high: float
  # Two-sided paired t-test of the differences, and its Holm adjustment over the comparisons
  # of the same model and budget (:func:`holm`): the table's intervals are each 95% on their
  # own, and a grid of 17 of them holds about one "ahead" or "behind" by chance.
  p_value: float = float("nan")
  holm_p: float = float("nan")

  @property
  def verdict(self) -> str:
    """``ahead``/``behind`` where the 95% interval excludes zero, else ``level``."""
    if self.seeds < 2:
      return "n < 2"
    return "ahead" if self.low > 0 else "behind" if self.high < 0 else "level"


def paired_interval(differences: Sequence[float]) -> tuple[float, float, float]:
  """Mean and two-sided 95% Student-t interval of paired differences (NaN bounds for n < 2).

  Args:
    differences: one difference per seed.

  Returns:
    ``(mean, low, high)``.
  """
  import numpy as np
  from scipy import stats

  values = np.asarray(differences, float)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, float("nan"), float("nan")
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return mean, float(mean - half), float(mean + half)


def paired_p_value(differences: Sequence[float]) -> float:
  """Two-sided p-value of the paired t-test (NaN for fewer than 2 differences)."""
  from scipy import stats

  if len(differences) < 2:
    return float("nan")
  with warnings.catch_warnings():
    # Equal differences (accuracies move in steps of 0.01 points, so two seeds can tie) make
    # scipy warn of precision loss; the zero-width interval beside the p-value says as much.
    warnings.simplefilter("ignore", RuntimeWarning)
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjustment of ``p_values``, in their order; NaNs stay NaN, uncounted.

  With the m finite p-values sorted ascending, the i-th (from 0) becomes
  ``min(1, max_{j <= i} (m - j) p_(j))``: rejecting where the adjusted value is below alpha
  keeps the chance of any false "ahead" or "behind" in the family below alpha.
  """
  order = sorted((p, index) for index, p in enumerate(p_values) if not math.isnan(p))
  adjusted = [float("nan")] * len(p_values)
  running = 0.0
  for rank, (p, index) in enumerate(order):
    running = max(running, min(1.0, (len(order) - rank) * p))
    adjusted[index] = running
  return adjusted


def _with_holm(found: Sequence[Comparison]) -> list[Comparison]:
  """``found`` with ``holm_p`` set, each family being one model at one budget."""
  families: dict[tuple[str, int], list[int]] = {}
  for index, c in enumerate(found):
    families.setdefault((c.model, c.epochs), []).append(index)
  adjusted = list(found)
  for members in families.values():
    for index, holm_p in zip(members, holm([found[i].p_value for i in members])):
      adjusted[index] = found[index]._replace(holm_p=holm_p)
  return adjusted


def comparisons(results: dict[str, Any], study: Sequence[Block]) -> list[Comparison]:
  """Every finished variant of ``study`` against its :data:`BASELINES` entry, paired by seed,
  with its paired t-test's p-value and Holm's adjustment of it (per model and budget)."""
  accuracy = {}
  for block in study:
    for run in block.runs():
      record = results["runs"].get(run.name)
      if record is not None:
        accuracy[(run.model, run.sparsity, run.epochs, run.variant, run.seed)] = record[
            "test_accuracy"
        ]
  cells = sorted({key[:4] for key in accuracy}, key=lambda k: (k[0], k[2], k[1]))
  found = []
  for model, sparsity, epochs, variant in cells:
    baseline = BASELINES.get(variant)
    if baseline is None:
      continue
    seeds = sorted(
        seed
        for (*cell, seed) in accuracy
        if tuple(cell) == (model, sparsity, epochs, variant)
        and (model, sparsity, epochs, baseline, seed) in accuracy
    )
    if not seeds:
      continue
    differences = [
        100
        * (
            accuracy[(model, sparsity, epochs, variant, seed)]
            - accuracy[(model, sparsity, epochs, baseline, seed)]
        )
        for seed in seeds
    ]
    found.append(
        Comparison(
            model,
            sparsity,
            epochs,
            variant,
            baseline,
            len(seeds),
            *paired_interval(differences),
            p_value=paired_p_value(differences),
        )
    )
  return _with_holm(
      sorted(found, key=lambda c: (c.model, c.epochs, c.sparsity, list(VARIANTS).index(c.variant)))
  )


def comparison_table(found: Sequence[Comparison]) -> str:
  """Markdown: one row per comparison, the mean paired difference, its interval, the verdict."""
  rows = [
      [
          c.model,
          f"{100 * c.sparsity:.2f}%",
          c.epochs,
          c.variant,
          c.baseline,
          c.seeds,
          f"{c.mean:+.2f}",
          "" if c.seeds < 2 else f"[{c.low:+.2f}, {c.high:+.2f}]",
          c.verdict,
          _p_text(c.p_value),
          _p_text(c.holm_p),
      ]
      for c in found
  ]
  headers = ["model", "sparsity", "epochs", "method", "vs", "seeds", "mean diff (points)"]
  return cli.format_table(headers + ["95% interval", "verdict", "p", "Holm p"], rows)


def _p_text(p: float) -> str:
  if math.isnan(p):
    return ""
  return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def note(found: Sequence[Comparison]) -> list[str]:
  """One sentence per comparison, computed from it: the difference, its interval, the verdict."""
  sayings = {
      "ahead": "ahead (the interval excludes zero)",
      "behind": "behind (the interval excludes zero)",
      "level": "not distinguishable from it (the interval includes zero)",
      "n < 2": "one seed only: no interval",
  }
  lines = []
  for c in found:
    interval = "" if c.seeds < 2 else f", 95% interval [{c.low:+.2f}, {c.high:+.2f}]"
    if not math.isnan(c.holm_p):
      interval += f" (p {_p_text(c.p_value)}, Holm {_p_text(c.holm_p)})"
    lines.append(
        f"{c.model} at {100 * c.sparsity:.2f}%, {c.epochs} epochs: {c.variant} - {c.baseline} = "
        f"{c.mean:+.2f} points over {c.seeds} paired seeds{interval}: {sayings[c.verdict]}."
    )
  return lines


def draw(found: Sequence[Comparison], output: Path) -> None:
  """A forest plot: each comparison's mean paired difference and 95% interval, 0 marked."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = [c for c in found if c.seeds >= 2]
  if not shown:
    return
  figure, axis = plt.subplots(figsize=(8, 0.32 * len(shown) + 1.2))
  positions = range(len(shown))[::-1]
  colors = {"ahead": "tab:green", "behind": "tab:red", "level": "tab:gray"}
  for y, c in zip(positions, shown):
    axis.errorbar(
        c.mean,
        y,
        xerr=[[c.mean - c.low], [c.high - c.mean]],
        fmt="o",
        capsize=3,
        color=colors[c.verdict],
        # Filled: still significant after Holm's correction over its model and budget.
        markerfacecolor=colors[c.verdict] if c.holm_p < 0.05 else "white",
    )
  labels = [
      f"{c.model} {100 * c.sparsity:.2f}% e{c.epochs}: {c.variant} - {c.baseline}" for c in shown
  ]
  axis.set_yticks(list(positions), labels, fontsize=7)
  axis.axvline(0.0, color="black", linewidth=0.8)
  # Linear within +-2 points, logarithmic beyond: random pruning and SNIP (tens of points
  # behind) would otherwise squeeze the one-point differences the study is about to dots.
  axis.set_xscale("symlog", linthresh=2.0, linscale=1.0)
  low, high = axis.get_xlim()
  ticks = [t for t in (-50, -10, -2, -1, 0, 1, 2, 10, 50) if low <= t <= high]
  axis.set_xticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
  axis.minorticks_off()
  axis.set_xlabel(
      "test accuracy difference, points (mean of per-seed pairs, 95% t-interval; "
      "symlog: linear within ±2)"
  )
  axis.set_title(
      "Fashion-MNIST: each method against its baseline on the same seeds\n"
      "(filled: Holm-adjusted p < 0.05 within its model and budget)",
      fontsize=10,
  )
  axis.grid(axis="x", alpha=0.3)
  figure.tight_layout()
  output.parent.mkdir(parents=True, exist_ok=True)
  # The labels are long: the saved box grows to hold them rather than clipping them.
  figure.savefig(output, dpi=110, bbox_inches="tight")
  plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  """Trains what is missing (in priority order), prints and writes the tables and the plot."""
  from experiments import input_pipeline

  prog = "python -m benchmarks.fashion_study"
  parser = cli.OneLineParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument(
      "--workdir",
      default=None,
      help=f"results, tables and plot (default {DEFAULT_WORKDIR}; --demo: {DEMO_WORKDIR})",
  )
  parser.add_argument(
      "--data_dir",
      default=None,
      help="tfds data dir or the IDX files' folder (default: tfds, else "
      f"{input_pipeline.DEFAULT_FASHION_MNIST_DIR})",
  )
  parser.add_argument("--models", default=None, help="comma-separated subset of the models")
  parser.add_argument("--tiny", action="store_true", help="a 1-epoch smoke test, not a result")
  parser.add_argument(
      "--demo",
      action="store_true",
      help="flipout vs global magnitude at 99.61%%, 5 epochs, 3 seeds: a few minutes",
  )
  parser.add_argument("--table_only", action="store_true", help="train nothing; tables and plot")
  parser.add_argument("--plot", default=None, help="where to write the plot (default: workdir)")
  parser.add_argument("--shard", default=None, help="I/N: as benchmarks.regime_study's --shard")
  args = parser.parse_args(argv)
  workdir = Path(args.workdir or (DEMO_WORKDIR if args.demo else DEFAULT_WORKDIR))
  try:
    if args.demo and (args.tiny or args.models):
      raise ValueError("--demo is its own grid; leave out --tiny and --models")
    study = DEMO_STUDY if args.demo else STUDY
    study = regime_study.select_study(args.models, args.tiny, study, TINY_STUDY)
    shard = regime_study.parse_shard(args.shard)
    results = regime_study.load_results(workdir, _SETTINGS)
    if not args.table_only:
      _dataset(args.data_dir)  # absent or damaged data: one line before any training
      own = "results.json" if args.shard is None else f"results.shard{shard[0]}.json"
      regime_study.train_pending(
          study, results, workdir / own, shard, lambda run: train_run(run, args.data_dir)
      )
  except (ValueError, input_pipeline.DatasetUnavailableError) as error:
    return cli.fail(prog, error)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted; rerun the same command to continue", file=sys.stderr)
    return 130
  found = comparisons(results, study)
  accuracies = regime_study.accuracy_table(results, study, tuple(VARIANTS), len(SEEDS))
  report = "\n\n".join([comparison_table(found), accuracies])
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / _TABLE_FILE).write_text(report + "\n")
  plot_path = Path(args.plot) if args.plot else workdir / _PLOT_FILE
  draw(found, plot_path)
  print(
      "Fashion-MNIST, 60,000 train / 10,000 test; paired differences against the baseline "
      "(points), then test accuracy (%), mean ± std over seeds"
      + (" [TINY: not a result]" if args.tiny else "")
  )
  print(report)
  print("\n".join(note(found)))
  print(f"wrote {workdir / _TABLE_FILE} and {plot_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
