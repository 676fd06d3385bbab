"""Where ``prune``'s steady-step overhead goes: step time of ``dense``, ``masks``
(``fixed_masks``: masking alone), ``prune``, and ``prune`` whose state holds no update sample
(so the check that ``prune`` is last costs nothing), side by side in one process.

    python -m benchmarks.prune_cost_split [--model vgg19] [--batch_size 128] [--repetitions 9]
        [--window_s 0.5] [--tiny]

VGG19 at batch 128 by default (the GPU case of ``benchmarks/_common.py``); ``--tiny``:
LeNet-300-100 at batch 16, a smoke test. Prints each chain's median ms per step and its
median ratio to dense [25th-75th percentile].
"""

import argparse
import statistics
import sys

import jax
import optax

from benchmarks import _common as common

NO_CHECK = "prune_no_check"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=("lenet300", "vgg19", "resnet18"), default="vgg19")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--repetitions", type=int, default=9)
  parser.add_argument("--window_s", type=float, default=0.5)
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  shape = common.MNIST_SHAPE if args.model == "lenet300" else common.CIFAR_SHAPE
  case = common.TINY_CASES[0] if args.tiny else common.Case(args.model, args.batch_size, shape)
  model = common.init_model(case, 0)
  runners = {v: common.StepRunner(case, v, model=model) for v in ("dense", "masks", "prune")}
  runners[NO_CHECK] = common.StepRunner(case, "prune", model=model)
  params, batch_stats, opt_state = runners[NO_CHECK].state
  # A state without a sample checks nothing (as one restored from an old checkpoint).
  opt_state = optax.tree_utils.tree_set(opt_state, last_update=None)
  runners[NO_CHECK].state = (params, batch_stats, opt_state)
  timings = common.interleaved_timings(
      runners, repetitions=args.repetitions, window_s=args.window_s
  )
  dense = timings.seconds["dense"]
  for name, seconds in timings.seconds.items():
    print(
        f"{case.model} b{case.batch_size} {name:15s} {1e3 * statistics.median(seconds):8.3f} ms"
        f"  / dense {common.format_ratio(common.ratio_summary(seconds, dense))}"
    )
  print(jax.devices()[0].device_kind, "jax", jax.__version__)
  return 0


if __name__ == "__main__":
  sys.exit(main())
