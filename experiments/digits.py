"""The offline demo: ``python -m experiments.digits``.

Trains LeNet-300-100 on scikit-learn's bundled 8x8 digits (1,437 train / 360 test images, no
download) in FlipOut's regime: extreme sparsity (99% and 99.5% of the 50,200 kernel weights)
and a long budget (60 epochs, ~1,300 steps, with the paper's learning-rate shape: x0.1 after
150/350 and 250/350 of the run), so the halving events are ~5 epochs apart. It runs FlipOut,
the paper's noise ablation (``flipout_no_noise``: FlipOut without its gradient noise;
``global_magnitude_noise``: global magnitude with it), global magnitude, SNIP and a dense
reference, prints one table (test accuracy and live weights per method and sparsity) and a
note computed from the numbers: where FlipOut leads or trails global magnitude, and what the
noise does. ``--methods`` adds ``magnitude``, ``random`` and ``hoyer_square``. The
train/test split is the same for every ``--seed`` (``data_seed=0``), so seeds differ only in
initialisation, data order and noise; one seed on 360 test images is noisy, and
``BENCHMARKS.md`` section 7 has the 3-seed study on real MNIST.

Every run is a :func:`experiments.train.train` call with the recipe below, so the demo
exercises the same code as the paper's experiments. Runs go to
``<workdir>/<method>-<sparsity>/`` (``summary.json``, checkpoints, metrics); a run that
already finished there is read back instead of trained again, so ``python -m
experiments.plot <workdir>`` can draw the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from experiments import cli, optimizers, train
from experiments import config as config_lib

SPARSITIES = (0.99, 0.995)
PRUNING_METHODS = ("flipout", "global_magnitude", "magnitude", "random", "snip", "hoyer_square")
# The paper's noise ablation: a method name -> (the experiments' method, --noise_scale).
ABLATIONS = {
    "flipout_no_noise": ("flipout", 0.0),
    "global_magnitude_noise": ("global_magnitude", 1.0),
}
METHODS = (*PRUNING_METHODS, *ABLATIONS, "dense")
DEFAULT_METHODS = (
    "flipout",
    "flipout_no_noise",
    "global_magnitude",
    "global_magnitude_noise",
    "snip",
    "dense",
)

# A small network on tiny images; learning rate tuned so the dense network reaches about 97%
# in a few seconds; the milestones follow --epochs (optimizers.paper_milestones).
# Hoyer-Square's weight is larger than on CIFAR because LeNet-300-100 has few layers (the
# regulariser sums one term per layer).
DEFAULTS = config_lib.Config(
    dataset="digits",
    model="lenet300",
    method="flipout",
    sparsity=0.9,
    epochs=60,
    batch_size=64,
    eval_batch_size=512,
    lr=0.05,
    milestones=(26, 43),
    momentum=0.9,
    weight_decay=5e-4,
    noise_scale=None,
    p=2.0,
    prune_rate=0.5,
    hoyer_lambda=1e-4,
    init="flax",
    seed=0,
    data_seed=0,
    checkpoint_every_epochs=0,
    keep_checkpoints=1,
    progress=False,
    tensorboard=False,
)


def _fraction_list(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(part) for part in text.split(",") if part.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated fractions like 0.9,0.99; got {text!r}"
    ) from None
  if not values or not all(0.0 < value < 1.0 for value in values):
    raise argparse.ArgumentTypeError(f"sparsities must be in (0, 1); got {text!r}")
  return values


def _method_list(text: str) -> tuple[str, ...]:
  values = tuple(part.strip() for part in text.split(",") if part.strip())
  unknown = [value for value in values if value not in METHODS]
  if not values or unknown:
    raise argparse.ArgumentTypeError(
        f"methods must be a comma-separated subset of {','.join(METHODS)}; got {text!r}"
    )
  return values


def build_parser() -> argparse.ArgumentParser:
  """The demo's flags: epochs, seed, workdir, and which methods and sparsities to run."""
  parser = cli.OneLineParser(
      prog="python -m experiments.digits",
      description="FlipOut and its baselines on scikit-learn's 8x8 digits (offline demo).",
  )
  parser.add_argument(
      "--epochs",
      type=int,
      default=DEFAULTS.epochs,
      help=f"epochs per run (default {DEFAULTS.epochs})",
  )
  parser.add_argument(
      "--seed", type=int, default=DEFAULTS.seed, help=f"seed of every run (default {DEFAULTS.seed})"
  )
  parser.add_argument(
      "--workdir", default=None, help="output folder (default runs/digits-e<epochs>-seed<seed>)"
  )
  parser.add_argument(
      "--methods",
      type=_method_list,
      default=",".join(DEFAULT_METHODS),
      help=f"comma-separated methods to run, of {','.join(METHODS)} "
      f"(default {','.join(DEFAULT_METHODS)})",
  )
  sparsities = ",".join(f"{sparsity:g}" for sparsity in SPARSITIES)
  parser.add_argument(
      "--sparsities",
      type=_fraction_list,
      default=sparsities,
      help=f"comma-separated target sparsities of the pruning methods " f"(default {sparsities})",
  )
  return parser


def run_configs(
    epochs: int, seed: int, workdir: Path, methods: Sequence[str], sparsities: Sequence[float]
) -> list[config_lib.Config]:
  """One config per (method, sparsity); ``dense`` once, at sparsity 0.

  The ablation names run their method with the noise scale of :data:`ABLATIONS`; the others
  with the method's default noise (1 for flipout, 0 for the baselines).
  """
  configs = []
  for name in methods:
    method, noise_scale = ABLATIONS.get(name, (name, None))
    for sparsity in ((0.0,) if method == "dense" else sparsities):
      folder = "dense" if method == "dense" else f"{name}-{sparsity:g}"
      configs.append(
          dataclasses.replace(
              DEFAULTS,
              method=method,
              noise_scale=noise_scale,
              sparsity=sparsity,
              epochs=epochs,
              milestones=optimizers.paper_milestones(epochs),
              seed=seed,
              workdir=str(workdir / folder),
              resume=True,
          )
      )
  return configs


def method_name(run_config: config_lib.Config) -> str:
  """The demo's name of a run's method: an :data:`ABLATIONS` name or the method."""
  for name, (method, noise_scale) in ABLATIONS.items():
    if run_config.method == method and run_config.noise_scale == noise_scale:
      return name
  return run_config.method


def _percent(fraction: float) -> str:
  return f"{100 * fraction:.4g}%"


def format_table(results: Sequence[tuple[config_lib.Config, dict]], epochs: int, seed: int) -> str:
  """Methods as rows, sparsities as columns; each cell ``accuracy (live weights)``."""
  columns = sorted({run_config.sparsity for run_config, _ in results})
  cells = {
      (method_name(run_config), run_config.sparsity): (
          f"{summary['test_accuracy']:.1%} ({summary['live_weights']:,})"
      )
      for run_config, summary in results
  }
  methods = list(dict.fromkeys(method_name(run_config) for run_config, _ in results))
  prunable = results[0][1]["prunable_weights"]
  title = (
      f"Test accuracy (live weights of {prunable:,}) of LeNet-300-100 on sklearn 8x8 digits, "
      f"{epochs} epochs, seed {seed}"
  )
  rows = [[method] + [cells.get((method, column), "-") for column in columns] for method in methods]
  return (
      title + "\n" + cli.format_table(["method"] + [_percent(column) for column in columns], rows)
  )


def verdict(results: Sequence[tuple[config_lib.Config, dict]]) -> list[str]:
  """What the numbers show, one line per sparsity, computed from them (nothing hard-coded).

  For each sparsity: FlipOut against global magnitude (ahead, behind or level, in points),
  the best pruning method, and the noise ablation where it ran.
  """
  accuracy = {
      (method_name(run_config), run_config.sparsity): summary["test_accuracy"]
      for run_config, summary in results
  }
  lines = []
  for sparsity in sorted({s for _, s in accuracy if s > 0}):
    here = {name: value for (name, s), value in accuracy.items() if s == sparsity}
    parts = []
    if "flipout" in here and "global_magnitude" in here:
      points = 100 * (here["flipout"] - here["global_magnitude"])
      side = "ahead of" if points > 0 else "behind" if points < 0 else "level with"
      parts.append(
          f"flipout {here['flipout']:.1%} is {abs(points):.1f} points {side} global magnitude "
          f"{here['global_magnitude']:.1%}"
      )
    for name, text in (
        ("flipout_no_noise", "flipout without its noise"),
        ("global_magnitude_noise", "global magnitude with the noise"),
    ):
      if name in here:
        parts.append(f"{text} {here[name]:.1%}")
    best = max(here, key=here.get)
    parts.append(f"best: {best} ({here[best]:.1%})")
    lines.append(f"At {_percent(sparsity)}: " + "; ".join(parts) + ".")
  if lines:
    lines.append(
        "One seed on 360 test images (one image = 0.28 points), so gaps of a few points can "
        "be seed noise; BENCHMARKS.md section 7 has 3 seeds on real MNIST."
    )
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the demo and prints the table; returns the exit status (2 on bad flags)."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as exit_request:
    return int(exit_request.code or 0)
  if args.epochs < 1 or args.seed < 0:
    print(f"{parser.prog}: error: --epochs must be >= 1 and --seed >= 0", file=sys.stderr)
    return 2
  workdir = Path(args.workdir or f"runs/digits-e{args.epochs}-seed{args.seed}")
  configs = run_configs(args.epochs, args.seed, workdir, args.methods, args.sparsities)
  started = time.perf_counter()
  results = []
  try:
    for index, config in enumerate(configs, 1):
      run_started = time.perf_counter()
      summary = train.train(config)
      results.append((config, summary))
      print(
          f"[{index}/{len(configs)}] {method_name(config)} at {config.sparsity:g}: "
          f"{summary['test_accuracy']:.1%} ({time.perf_counter() - run_started:.1f}s)",
          file=sys.stderr,
          flush=True,
      )
  except config_lib.ConfigError as error:
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    return 2
  print(format_table(results, args.epochs, args.seed))
  for line in verdict(results):
    print(line)
  print(f"{len(configs)} runs in {time.perf_counter() - started:.0f}s; results in {workdir}/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
