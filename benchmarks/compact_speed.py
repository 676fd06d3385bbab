"""Inference speed-up of ``flipout.compact`` against the dense model, by ``round_to``.

    python -m benchmarks.compact_speed [--model resnet18 --model vgg19 --model gpt]
        [--dead 0.5] [--sparsity 0.0] [--round_to 1,8,128] [--batch 1000] [--repetitions 7]
        [--json OUT]

Each model gets random weights with whole units dead (``tests.test_compaction.random_model``:
each output unit of a kernel loses its incoming weights, each input unit its outgoing ones,
with probability ``--dead``; ``--sparsity`` of the remaining weights pruned at random on top),
the GPT of ``examples/gpt_compact.py`` (dim 128, 4 heads, 2 blocks, 32 tokens) the same on its
MLP's ``fc`` kernels. Random unit masks fix the widths a unit-pruned model keeps, which is
all that inference time depends on; they say nothing about accuracy. Each model is compacted
once per ``round_to`` (``flipout.compact(..., round_to=k)``) and every variant, the dense
(pruned, uncompacted) model first, is timed on one batch of ``--batch`` inputs side by side
(``benchmarks._common.interleaved_timings``: compiled and warmed up, interleaved windows of
about 1 s); a speed-up is the median over repetitions of dense seconds over compact seconds,
with its interquartile range. Also printed: parameters, the largest output difference, and
how long ``flipout.compact`` took.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flipout_jax as flipout
from benchmarks import _common
from examples import gpt_compact
from tests import test_compaction

_IMAGE_SHAPE = (32, 32, 3)
_GPT = dict(dim=128, heads=4, layers=2)


def _gpt(dead: float, seed: int = 0) -> nnx.Module:
  model = gpt_compact.GPT(len(gpt_compact.VOCAB), rngs=nnx.Rngs(seed), **_GPT)
  rng = np.random.default_rng(seed)
  for block in model.blocks:
    gone = rng.random(block.fc.kernel.shape[-1]) < dead
    block.fc.kernel[...] = jnp.where(gone, 0.0, block.fc.kernel[...])
    block.fc.bias[...] = jnp.where(gone, 0.0, block.fc.bias[...])  # gelu(0) = 0: unread
  return model


def model_and_batch(name: str, dead: float, sparsity: float, batch: int):
  """``(apply_fn, params, inputs)`` of a model with dead units, inputs of ``batch`` rows."""
  key = jax.random.key(1)
  if name == "gpt":
    model = _gpt(dead)
    inputs = jax.random.randint(key, (batch, gpt_compact.CONTEXT), 0, len(gpt_compact.VOCAB))
  else:
    factory = test_compaction.named(name, _IMAGE_SHAPE, num_classes=10)
    model = test_compaction.random_model(factory, sparsity, dead=dead)
    model.eval()
    inputs = jax.random.normal(key, (batch, *_IMAGE_SHAPE))
  graphdef, state = nnx.split(model)
  return (lambda params, x: nnx.merge(graphdef, params)(x)), state, inputs


def _size(tree) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def measure(name: str, args: argparse.Namespace) -> dict:
  apply_fn, params, inputs = model_and_batch(name, args.dead, args.sparsity, args.batch)
  variants = {"dense": (jax.jit(apply_fn), params)}
  rows = {"dense": {"parameters": _size(params)}}
  for k in args.round_to:
    started = time.perf_counter()
    compacted = flipout.compact(apply_fn, params, inputs[:2], round_to=k)
    seconds = time.perf_counter() - started
    variants[f"round_to={k}"] = (jax.jit(compacted.apply), compacted.params)
    rows[f"round_to={k}"] = {"parameters": _size(compacted.params), "compact_s": seconds}
  reference = np.asarray(variants["dense"][0](params, inputs))

  def runner(forward, p):
    def run(calls: int) -> None:
      for _ in range(calls):
        out = forward(p, inputs)
      jax.block_until_ready(out)

    return run

  timings = _common.interleaved_timings(
      {variant: runner(*fp) for variant, fp in variants.items()},
      repetitions=args.repetitions,
      window_s=args.window_s,
      warmup_calls=1,
  )
  dense = timings.seconds["dense"]
  for variant, (forward, p) in variants.items():
    row = rows[variant]
    row["ms"] = 1e3 * float(np.median(timings.seconds[variant]))
    row["speedup"] = _common.ratio_summary(dense, timings.seconds[variant])
    row["max_output_difference"] = float(np.abs(np.asarray(forward(p, inputs)) - reference).max())
  return {"model": name, "rows": rows}


def _print(result: dict) -> None:
  print(f"{result['model']}:")
  for variant, row in result["rows"].items():
    compact_s = f"  compact {row['compact_s']:5.1f} s" if "compact_s" in row else ""
    print(
        f"  {variant:14s} params {row['parameters']:>11,}  ms {row['ms']:9.2f}  "
        f"speed-up {_common.format_ratio(row['speedup'])}  "
        f"max|diff| {row['max_output_difference']:.2g}{compact_s}",
        flush=True,
    )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--model", action="append", choices=["resnet18", "vgg19", "densenet121", "gpt"]
  )
  parser.add_argument("--dead", type=float, default=0.5, help="probability a unit is dead")
  parser.add_argument("--sparsity", type=float, default=0.0, help="random weights pruned too")
  parser.add_argument(
      "--round_to",
      default=(1, 8, 128),
      type=lambda text: tuple(int(k) for k in text.split(",")),
      help="comma-separated multiples to round compacted widths up to (1: none)",
  )
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--repetitions", type=int, default=7)
  parser.add_argument("--window_s", type=float, default=1.0)
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)
  if not 0.0 <= args.dead < 1.0 or not 0.0 <= args.sparsity < 1.0:
    parser.error("--dead and --sparsity must be in [0, 1)")
  info = _common.machine_info()
  print(_common.describe_machine(info), f"batch {args.batch}, {args.repetitions} repetitions")
  results = []
  for name in args.model or ["resnet18", "vgg19", "gpt"]:
    results.append(measure(name, args))
    _print(results[-1])
  if args.json:
    _common.write_json(args.json, {"machine": info, "args": vars(args), "results": results})
  return 0


if __name__ == "__main__":
  sys.exit(main())
