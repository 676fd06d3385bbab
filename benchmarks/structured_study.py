"""Structured FlipOut on Fashion-MNIST: accuracy against unstructured pruning, and speed.

``python -m benchmarks.structured_study`` trains, with the experiments' trainer
(``experiments.mnist --dataset=fashion_mnist``, PyTorch's initialisation, the paper's
learning-rate shape), and on paired seeds (same initialisation and data order):

* LeNet5 at :data:`CONV_SPARSITY`: FlipOut by weights (``--structure=weight``), by units
  with the mean group score (``unit``) and with the summed one (``unit_sum``), and dense. Each
  pruned run is then compacted (``experiments.compact``: ``flipout.compact`` on the trained
  model) and timed against the same model uncompacted (as costly as dense), side by side.
* LeNet-300-100 at 2:4 (50%): FlipOut's scores against global magnitude's (qwix's rule).

The report gives each comparison as the mean of per-seed paired differences of test accuracy
with a 95% t-interval (``benchmarks.fashion_study.paired_interval``), and the compacted
speed-up and parameters of each pruned LeNet5 run and unit-pruned LeNet-300-100 run. Runs finished are kept in
``results-I.json`` (one per shard) under the work folder; the same command continues a study cut short, and
``--shard I/N`` splits the runs over processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

CONV_SPARSITY = 0.98
# Per model: epochs, seeds and the flags every variant shares. LeNet5 trains at lr 0.01: at
# the entry point's 0.1 with FlipOut's noise, a first try (2026-12-04, seed 0) left LeNet5 at
# 10% after an epoch whether it pruned by weights or units, as BENCHMARKS.md section 7 saw on
# MNIST; the same lr for every variant, chosen before any result.
MODELS = {
    "lenet5": {"epochs": 5, "seeds": (0, 1), "flags": {"lr": 0.01}},
    "lenet300": {"epochs": 10, "seeds": (0, 1, 2), "flags": {}},
}
# Tracked: results of a study cut short are committed and continued by the next session.
DEFAULT_WORKDIR = "benchmarks/results/structured_study"
# Not tracked: the runs' checkpoints, which the compaction reads.
RUNS_DIR = Path("runs/structured_study")


class Run(NamedTuple):
  """One training run: a variant of a model on a seed."""

  model: str
  variant: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.model}-{self.variant}-seed{self.seed}"


# variant -> flags of experiments.mnist besides the model, epochs and seed.
VARIANTS = {
    "weight": {"method": "flipout", "sparsity": CONV_SPARSITY},
    "unit": {"method": "flipout", "sparsity": CONV_SPARSITY, "structure": "unit"},
    "unit_sum": {
        "method": "flipout",
        "sparsity": CONV_SPARSITY,
        "structure": "unit",
        "group_score": "sum",
    },
    "dense": {"method": "dense", "sparsity": 0.0},
    "flipout_2:4": {"method": "flipout", "sparsity": 0.5, "structure": "2:4"},
    "global_magnitude_2:4": {"method": "global_magnitude", "sparsity": 0.5, "structure": "2:4"},
}
# The same at 90%, where LeNet-300-100's units are not all but gone (at 98% its first layer
# keeps a few of 300 units whatever the score).
VARIANTS.update(
    {f"{name}@0.9": {**VARIANTS[name], "sparsity": 0.9} for name in ("weight", "unit", "unit_sum")}
)
# (variant, baseline it is compared with on the same seeds)
COMPARISONS = (
    ("lenet5", "unit", "weight"),
    ("lenet5", "unit_sum", "unit"),
    ("lenet300", "unit", "weight"),
    ("lenet300", "unit_sum", "unit"),
    ("lenet300", "unit@0.9", "weight@0.9"),
    ("lenet300", "unit_sum@0.9", "unit@0.9"),
    ("lenet300", "flipout_2:4", "global_magnitude_2:4"),
)
_SEEDS5, _SEEDS300 = MODELS["lenet5"]["seeds"], MODELS["lenet300"]["seeds"]
STUDY = (
    *(Run("lenet5", v, s) for s in _SEEDS5 for v in ("unit", "weight")),
    *(Run("lenet300", v, s) for s in _SEEDS300 for v in ("flipout_2:4", "global_magnitude_2:4")),
    # The group score on real data, where layers' fan-ins differ most (784, 300, 100).
    *(Run("lenet300", v, s) for s in _SEEDS300 for v in ("unit", "unit_sum", "weight")),
    *(Run("lenet300", v, s) for s in _SEEDS300 for v in ("unit@0.9", "unit_sum@0.9", "weight@0.9")),
    *(Run("lenet5", "unit_sum", s) for s in _SEEDS5),
    Run("lenet5", "dense", 0),
)


def fashion_mnist_flags(run: Run, epochs: int, runs_dir: Path, **settings: Any) -> list[str]:
  """``experiments.mnist``'s command line for ``run`` on Fashion-MNIST, in ``runs_dir``."""
  settings = {
      "dataset": "fashion_mnist",
      "model": run.model,
      "epochs": epochs,
      "seed": run.seed,
      "workdir": str(runs_dir / run.name),
      **settings,
  }
  return [f"--{key}={value}" for key, value in settings.items()] + ["--no-progress"]


def flags(run: Run, epochs: int | None = None) -> list[str]:
  """The ``experiments.mnist`` command line of one run (``epochs``: the model's if None)."""
  epochs = epochs or MODELS[run.model]["epochs"]
  return fashion_mnist_flags(
      run, epochs, RUNS_DIR, **MODELS[run.model]["flags"], **VARIANTS[run.variant]
  )


def results_of(workdir: Path) -> dict[str, Any]:
  """Every shard's finished runs (each shard writes its own ``results-I.json``)."""
  runs = {}
  for path in sorted(workdir.glob("results-*.json")):
    runs.update(json.loads(path.read_text())["runs"])
  return {"runs": runs}


def parse_shard(text: str) -> tuple[int, int] | None:
  """``"I/N"`` as ``(I, N)`` with ``0 <= I < N``; None if it is not that."""
  try:
    index, count = (int(x) for x in text.split("/"))
  except ValueError:
    return None
  return (index, count) if 0 <= index < count else None


def run_pending(
    study: Sequence[Run],
    workdir: Path,
    only: str,
    shard: tuple[int, int],
    measure: Callable[[Run], dict[str, Any]],
) -> None:
  """Measures this shard's runs of ``study`` (named with ``only``) not yet in the results,
  writing each record as it finishes into the shard's own ``results-*.json``."""
  index, count = shard
  workdir.mkdir(parents=True, exist_ok=True)
  label = "".join(c if c.isalnum() else "_" for c in only)
  own = workdir / (f"results-{label}-{index}.json" if label else f"results-{index}.json")
  for run in [run for run in study if only in run.name][index::count]:
    if run.name in results_of(workdir)["runs"]:
      continue
    record = measure(run)
    results = json.loads(own.read_text()) if own.exists() else {"runs": {}}
    results["runs"][run.name] = record
    own.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{run.name}: {record}", flush=True)


def train(run: Run, argv: list[str], run_dir: Path) -> dict[str, Any]:
  """Trains ``run`` with ``experiments.mnist``'s command line ``argv``; its summary.

  Raises:
    SystemExit: the trainer failed.
  """
  from experiments import mnist

  status = mnist.main(argv)
  if status != 0:
    raise SystemExit(f"{run.name}: experiments.mnist exited with {status}")
  return json.loads((run_dir / "summary.json").read_text())


def train_and_measure(run: Run, epochs: int | None = None) -> dict[str, Any]:
  """Trains one run with the experiments' command line, then compacts and times it."""
  from experiments import compact

  run_dir = RUNS_DIR / run.name
  summary = train(run, flags(run, epochs), run_dir)
  record = {"test_accuracy": summary["test_accuracy"], "sparsity": summary.get("sparsity")}
  if VARIANTS[run.variant].get("structure") == "unit" or (
      run.model == "lenet5" and run.variant != "dense"
  ):
    report = compact.compact_run(run_dir)
    keys = ("speedup", "dense_parameters", "compact_parameters", "widths", "compact_flops")
    record.update({key: report[key] for key in keys})
    record["dense_flops"] = report["dense_flops"]
  return record


def paired_accuracy(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
  """Test accuracy of ``(variant, baseline)`` records of the same seeds: ``seeds``, the mean
  ``variant_accuracy`` and ``baseline_accuracy`` (%), and the mean ``difference`` in points
  with its 95% t-``interval``."""
  from benchmarks import fashion_study

  differences = [100 * (a["test_accuracy"] - b["test_accuracy"]) for a, b in pairs]
  mean, low, high = fashion_study.paired_interval(differences)
  return {
      "seeds": len(pairs),
      "variant_accuracy": statistics.mean(100 * a["test_accuracy"] for a, _ in pairs),
      "baseline_accuracy": statistics.mean(100 * b["test_accuracy"] for _, b in pairs),
      "difference": mean,
      "interval": (low, high),
  }


def accuracy_cells(row: dict[str, Any]) -> tuple[str, ...]:
  """The table cells of :func:`paired_accuracy`'s numbers: seeds, the two accuracies, the
  difference with its interval."""
  return (
      str(row["seeds"]),
      f"{row['variant_accuracy']:.2f}%",
      f"{row['baseline_accuracy']:.2f}%",
      "{:+.2f} [{:+.2f}, {:+.2f}]".format(row["difference"], *row["interval"]),
  )


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Each :data:`COMPARISONS` entry over the seeds where both runs finished."""
  rows = []
  for model, variant, baseline in COMPARISONS:
    pairs = [
        (
            results["runs"].get(Run(model, variant, s).name),
            results["runs"].get(Run(model, baseline, s).name),
        )
        for s in MODELS[model]["seeds"]
    ]
    pairs = [(a, b) for a, b in pairs if a and b]
    if not pairs:
      continue
    paired = paired_accuracy(pairs)
    low, high = paired["interval"]
    verdict = "level" if not low > 0 and not high < 0 else ("ahead" if low > 0 else "behind")
    rows.append(
        {"model": model, "variant": variant, "baseline": baseline, **paired, "verdict": verdict}
    )
  return rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  """The lines of a markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def report(results: dict[str, Any]) -> str:
  """Markdown tables: the paired comparisons, then each LeNet5 run's compaction."""
  header = ("model", "variant", "vs", "seeds", "accuracy", "baseline", "difference (95% CI)")
  cells = [
      (row["model"], row["variant"], row["baseline"], *accuracy_cells(row), row["verdict"])
      for row in comparisons(results)
  ]
  lines = markdown_table((*header, "verdict"), cells)
  lines += [
      "",
      "| compacted run | accuracy | sparsity | compact params | widths | compact FLOPs | speed-up vs dense |",
      "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, record in sorted(results["runs"].items()):
    if "speedup" in record:
      widths = record["widths"]
      lines.append(
          f"| {name} | {100 * record['test_accuracy']:.2f}% | {100 * record['sparsity']:.2f}% | "
          f"{record['compact_parameters']:,} of {record['dense_parameters']:,} | "
          f"conv {widths['conv']}, hidden {widths['hidden']} | "
          f"{record['compact_flops']:,} of {record['dense_flops']:,} | {record['speedup']:.2f}x |"
      )
    elif name.endswith("dense-seed0") or "-dense-" in name:
      lines.append(f"| {name} | {100 * record['test_accuracy']:.2f}% | 0% | | | | 1.00x |")
  return "\n".join(lines)


def parse_study_args(
    prog: str, default_workdir: str, argv: Sequence[str] | None, **extra: dict[str, Any]
) -> tuple[argparse.Namespace, tuple[int, int]] | None:
  """A study's command line (``extra``: more flags, name -> ``add_argument`` keywords);
  None, with one line on stderr, for a bad ``--shard``."""
  parser = argparse.ArgumentParser(prog=prog)
  parser.add_argument("--workdir", default=default_workdir, help="results folder")
  parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (smoke tests)")
  parser.add_argument("--shard", default="0/1", help="I/N: train runs I, I+N, ... only")
  parser.add_argument("--table_only", action="store_true", help="train nothing; print tables")
  parser.add_argument("--only", default="", help="train only runs whose name contains this")
  for name, options in extra.items():
    parser.add_argument(f"--{name}", **options)
  args = parser.parse_args(argv)
  shard = parse_shard(args.shard)
  if shard is None:
    print(f"{prog}: --shard must be I/N with 0 <= I < N, got {args.shard}", file=sys.stderr)
    return None
  return args, shard


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: trains the runs not yet in the results, prints the report."""
  parsed = parse_study_args("python -m benchmarks.structured_study", DEFAULT_WORKDIR, argv)
  if parsed is None:
    return 2
  args, shard = parsed
  workdir = Path(args.workdir)
  if not args.table_only:
    run_pending(STUDY, workdir, args.only, shard, lambda run: train_and_measure(run, args.epochs))
  print(report(results_of(workdir)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
