"""FlipOut and its baselines on real images: the MNIST test set, split 8,000 / 2,000.

``python -m benchmarks.mnist_real`` trains LeNet-300-100 and LeNet5 with ``flipout``,
``global_magnitude``, ``random``, ``snip`` and ``dense`` at 90%, 98.44%, 99.61% and 99.9%
sparsity (``1 - 2^-6`` and ``1 - 2^-8`` are what 6 and 8 halving events reach), 3 seeds each,
through the shared trainer (``experiments.train.train``: the real training loop, with the
MNIST entry point's recipe: SGD 0.1, momentum 0.9, coupled weight decay 5e-4, batch 128,
gradient noise 1 and p = 2 for FlipOut, prune rate 0.5), for fewer epochs so the whole study
fits in about 25 minutes on 2 CPU cores. The learning rate drops x0.1 after half and after
three quarters of the epochs.

Data: ``../shared/data/mnist-t10k`` (the 10,000 real MNIST test images), split 8,000 train /
2,000 held out. Without that folder the study is skipped (exit status 0, one message).

Every finished run is added to ``<workdir>/results.json`` at once, so a study cut short
continues where it stopped when started again with the same flags, and ``--table_only``
re-prints the table and plot from whatever is there. Outputs: ``results.json``,
``mnist_real.md`` (the mean +- sample standard deviation table) and ``mnist_real.png``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import _common
from experiments import cli

MODELS = ("lenet300", "lenet5")
METHODS = ("flipout", "global_magnitude", "random", "snip", "dense")
SPARSITIES = (0.9, 1 - 2**-6, 1 - 2**-8, 0.999)
SEEDS = (0, 1, 2)
# Epochs per model, chosen for the ~25-minute budget on 2 CPU cores: XLA compiles every run's
# step afresh (seconds per run), and a LeNet5 epoch costs ~10x a LeNet-300-100 epoch on CPU.
EPOCHS = {"lenet300": 10, "lenet5": 3}
SPLIT_SEED = 0  # the 8,000 / 2,000 split is the same for every run
DENSE = "dense"
DEFAULT_WORKDIR = "runs/benchmarks/mnist_real"
_RESULTS_FILE = "results.json"
_TABLE_FILE = "mnist_real.md"
_PLOT_FILE = "mnist_real.png"
# The trainer field that fixes the split independently of the run's seed, if it has one.
_SPLIT_SEED_FIELD = "data_seed"


class Run(NamedTuple):
  """One training run of the study."""

  model: str
  method: str
  sparsity: float  # target; 0.0 for dense
  seed: int
  epochs: int

  @property
  def name(self) -> str:
    """``lenet5-flipout-0.999-e3-seed1``; dense runs carry no sparsity."""
    middle = DENSE if self.method == DENSE else f"{self.method}-{self.sparsity:g}"
    return f"{self.model}-{middle}-e{self.epochs}-seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Study:
  """What the study trains: the grid and the number of epochs per model."""

  models: tuple[str, ...] = MODELS
  methods: tuple[str, ...] = METHODS
  sparsities: tuple[float, ...] = SPARSITIES
  seeds: tuple[int, ...] = SEEDS
  epochs: tuple[tuple[str, int], ...] = tuple(EPOCHS.items())

  def runs(self) -> list[Run]:
    """Every run of the grid; dense once per model and seed."""
    epochs = dict(self.epochs)
    return [
        Run(model, method, sparsity, seed, epochs[model])
        for model in self.models
        for method in self.methods
        for sparsity in ((0.0,) if method == DENSE else self.sparsities)
        for seed in self.seeds
    ]


TINY_STUDY = Study(
    models=("lenet300",),
    methods=("global_magnitude", DENSE),
    sparsities=(0.9,),
    seeds=(0,),
    epochs=(("lenet300", 1),),
)


def run_config(run: Run, workdir: Path, data_dir: str):
  """The trainer's Config of one run: the MNIST entry point's recipe, shortened."""
  from experiments import mnist

  fields = dict(
      dataset="mnist_t10k",
      model=run.model,
      method=run.method,
      sparsity=run.sparsity,
      seed=run.seed,
      epochs=run.epochs,
      milestones=_milestones(run.epochs),
      workdir=str(workdir / "runs" / run.name),
      data_dir=data_dir,
      resume=True,
      progress=False,
      tensorboard=False,
      checkpoint_every_epochs=0,
      keep_checkpoints=1,
  )
  if split_is_fixed():
    fields[_SPLIT_SEED_FIELD] = SPLIT_SEED
  return dataclasses.replace(mnist.DEFAULTS, **fields)


def split_is_fixed() -> bool:
  """Whether the trainer can fix the data split apart from the run seed."""
  from experiments import config as config_lib

  return _SPLIT_SEED_FIELD in {field.name for field in dataclasses.fields(config_lib.Config)}


def _epochs_text(study: Study) -> str:
  return ", ".join(f"{model} {epochs}" for model, epochs in study.epochs)


def _milestones(epochs: int) -> tuple[int, ...]:
  """Half and three quarters of the run (the MNIST recipe's 50, 75 of 100), deduplicated."""
  marks = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
  return tuple(m for m in marks if m < epochs)


# ---------------------------------------------------------------------------------------------
# Results on disk.
# ---------------------------------------------------------------------------------------------


def _settings() -> dict[str, Any]:
  return {"split_seed": SPLIT_SEED if split_is_fixed() else "run seed"}


def load_results(workdir: Path) -> dict[str, Any]:
  """The stored results, or an empty record for a new study.

  Raises:
    ValueError: the workdir holds results made with another data split.
  """
  path = workdir / _RESULTS_FILE
  if not path.exists():
    return {"settings": _settings(), "runs": {}}
  stored = json.loads(path.read_text())
  if stored["settings"] != _settings():
    raise ValueError(
        f"{path} holds results of other settings ({stored['settings']}, now "
        f"{_settings()}); use another --workdir"
    )
  return stored


def record_run(results: dict[str, Any], run: Run, summary: dict[str, Any]) -> None:
  """Adds one finished run (from the trainer's summary) to ``results``."""
  results["runs"][run.name] = {
      **run._asdict(),
      "test_accuracy": summary["test_accuracy"],
      "achieved_sparsity": summary["sparsity"],
      "live_weights": summary["live_weights"],
      "prunable_weights": summary["prunable_weights"],
      "seconds": summary["seconds"],
  }


def run_study(
    study: Study, workdir: Path, data_dir: str, *, keep_checkpoints: bool = False, log=print
) -> dict[str, Any]:
  """Trains every run of ``study`` not yet in ``<workdir>/results.json``; returns the results."""
  from experiments import train

  results = load_results(workdir)
  pending = [run for run in study.runs() if run.name not in results["runs"]]
  log(
      f"{len(study.runs()) - len(pending)} of {len(study.runs())} runs already done; "
      f"{len(pending)} to train (epochs: {_epochs_text(study)})"
  )
  for index, run in enumerate(pending, 1):
    config = run_config(run, workdir, data_dir)
    summary = train.train(config)
    record_run(results, run, summary)
    _common.write_json(workdir / _RESULTS_FILE, results)
    if not keep_checkpoints:
      shutil.rmtree(Path(config.workdir) / "checkpoints", ignore_errors=True)
    log(
        f"  [{index}/{len(pending)}] {run.name}: test accuracy "
        f"{summary['test_accuracy']:.4f}, sparsity {summary['sparsity']:.4%}, "
        f"{summary['seconds']:.1f}s",
        flush=True,
    )
  return results


# ---------------------------------------------------------------------------------------------
# Table and plot.
# ---------------------------------------------------------------------------------------------


def accuracy_groups(results: dict[str, Any], study: Study) -> list:
  """The study's finished runs grouped over seeds by ``experiments.plot.group_runs``.

  Each stored record is handed over in the trainer's ``summary.json`` layout, so the grouping
  (and the sample standard deviation, ddof=1) and the figure are the ones of
  ``python -m experiments.plot``. Runs of the workdir outside ``study`` are left out.
  """
  from experiments import plot

  summaries = []
  for run in study.runs():
    record = results["runs"].get(run.name)
    if record is not None:
      summaries.append(
          {
              "config": {
                  "dataset": "mnist_t10k",
                  "model": run.model,
                  "method": run.method,
                  "sparsity": run.sparsity,
              },
              "test_accuracy": record["test_accuracy"],
              "live_weights": record["live_weights"],
              "synthetic": False,
          }
      )
  return plot.group_runs(summaries)


def _cell(group, expected_runs: int) -> str:
  if group is None:
    return "-"
  partial = "" if len(group.accuracies) == expected_runs else f" (n={len(group.accuracies)})"
  return f"{100 * group.mean:.2f} ± {100 * group.std:.2f}{partial}"


def accuracy_table(results: dict[str, Any], study: Study) -> str:
  """Markdown: one row per (model, method), one column per sparsity; dense in every column.

  Cells are test accuracy in percent, mean ± sample standard deviation over the seeds.
  """
  groups = {(g.model, g.method, g.sparsity): g for g in accuracy_groups(results, study)}
  headers = ["model", "method"] + [f"{100 * s:.2f}%" for s in study.sparsities]
  rows = []
  for model in study.models:
    for method in study.methods:
      keys = (
          [(model, DENSE, 0.0)] * len(study.sparsities)
          if method == DENSE
          else [(model, method, s) for s in study.sparsities]
      )
      rows.append(
          [model, "dense (no pruning)" if method == DENSE else method]
          + [_cell(groups.get(key), len(study.seeds)) for key in keys]
      )
  return cli.format_table(headers, rows)


def write_report(results: dict[str, Any], study: Study, workdir: Path) -> str:
  """Writes the table (Markdown) and the plot next to the results; returns the table."""
  from experiments import plot

  table = accuracy_table(results, study)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / _TABLE_FILE).write_text(table + "\n")
  groups = accuracy_groups(results, study)
  if groups:
    plot.draw(groups, workdir / _PLOT_FILE)
  return table


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _choices(text: str, allowed: Sequence[str], name: str) -> tuple[str, ...]:
  values = tuple(part for part in text.split(",") if part)
  if not values or any(value not in allowed for value in values):
    raise ValueError(
        f"--{name} must be a comma-separated subset of "
        f"{','.join(str(a) for a in allowed)}; got {text!r}"
    )
  return values


def study_from_args(args) -> Study:
  """The study the flags describe (``--tiny``: one model, two methods, one cell, 1 epoch).

  Raises:
    ValueError: a flag names something outside the study's grid.
  """
  if args.tiny:
    return TINY_STUDY
  sparsities = tuple(float(part) for part in args.sparsities.split(",") if part)
  if not sparsities or any(not 0.0 < s < 1.0 for s in sparsities):
    raise ValueError(
        f"--sparsities must be comma-separated fractions in (0, 1); " f"got {args.sparsities!r}"
    )
  seeds = tuple(int(part) for part in args.seeds.split(",") if part)
  if not seeds or any(seed < 0 for seed in seeds):
    raise ValueError(f"--seeds must be comma-separated non-negative ints; got {args.seeds!r}")
  models = _choices(args.models, MODELS, "models")
  epochs = tuple((model, args.epochs or EPOCHS[model]) for model in models)
  return Study(
      models=models,
      methods=_choices(args.methods, METHODS, "methods"),
      sparsities=sparsities,
      seeds=seeds,
      epochs=epochs,
  )


def _data_missing(data_dir: Path) -> bool:
  return not (data_dir / "t10k-images-idx3-ubyte.gz").is_file()


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: trains what is missing, prints the table, writes table and plot."""
  from experiments import input_pipeline

  prog = "python -m benchmarks.mnist_real"
  parser = cli.OneLineParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument(
      "--workdir",
      default=DEFAULT_WORKDIR,
      help="results.json, table, plot and the runs' folders go here",
  )
  parser.add_argument(
      "--data_dir",
      default=None,
      help="folder with the MNIST t10k IDX files (default ../shared/data/mnist-t10k)",
  )
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
  parser.add_argument(
      "--sparsities",
      default=",".join(f"{s:.10g}" for s in SPARSITIES),
      help="comma-separated target sparsities",
  )
  parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
  parser.add_argument(
      "--epochs",
      type=cli.positive_int,
      default=None,
      help="epochs of every run (default: "
      + ", ".join(f"{m} {e}" for m, e in EPOCHS.items())
      + ")",
  )
  parser.add_argument(
      "--tiny",
      action="store_true",
      help="lenet300, global_magnitude and dense, 90%%, seed 0, 1 epoch: a smoke test",
  )
  parser.add_argument(
      "--table_only",
      action="store_true",
      help="train nothing; re-print the table and plot from results.json",
  )
  parser.add_argument(
      "--keep_checkpoints",
      action="store_true",
      help="keep each run's final checkpoint (deleted by default to save disk)",
  )
  args = parser.parse_args(argv)
  data_dir = Path(args.data_dir) if args.data_dir else input_pipeline.default_mnist_t10k_dir()
  workdir = Path(args.workdir)
  try:
    study = study_from_args(args)
    if args.table_only:
      results = load_results(workdir)
    elif _data_missing(data_dir):
      print(
          f"{prog}: skipped: the MNIST test set is not in {data_dir} "
          "(expected t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz)"
      )
      return 0
    else:
      if not split_is_fixed():
        print(
            "note: the trainer splits the data with each run's seed; the spread includes "
            "the split"
        )
      results = run_study(study, workdir, str(data_dir), keep_checkpoints=args.keep_checkpoints)
  except (ValueError, input_pipeline.DatasetUnavailableError) as error:
    return cli.fail(prog, error)
  except KeyboardInterrupt:
    print(
        f"{prog}: interrupted; finished runs are in {workdir / _RESULTS_FILE}, run the same "
        "command again to continue",
        file=sys.stderr,
    )
    return 130
  print(
      f"MNIST test set 8,000 train / 2,000 held out; epochs: {_epochs_text(study)}; test accuracy (%), "
      f"mean ± std over seeds {','.join(map(str, study.seeds))}"
      + (" [TINY: not a result]" if args.tiny else "")
  )
  print(write_report(results, study, workdir))
  written = [workdir / name for name in (_TABLE_FILE, _PLOT_FILE) if (workdir / name).exists()]
  print(f"wrote {' and '.join(map(str, written))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
