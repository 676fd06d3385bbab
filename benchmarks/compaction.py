"""``flipout.compact`` against the per-family compaction it replaced, and how long it takes.

    python -m benchmarks.compaction --workdir RUN [--repeats 21] [--json OUT] [--round_to 1,8]
    python -m benchmarks.compaction --families [--sparsity 0.999] [--family vgg19 ...]

``--workdir``: loads the run's newest checkpoint and its test set, then compacts the model
three ways: the library with ``constants="program"`` (removed constants may stay in the
program), the library with ``constants="params"`` (what ``experiments.compaction`` uses: the
result is a model of the same family) and the per-family graphs the experiments had before
(``tests/family_compaction.py``, kept as the tests' oracle). Prints parameters, the largest
logit difference against the pruned model, and inference time at the run's evaluation batch
size side by side (compiled, warmed up, interleaved repetitions; speedups are medians of the
per-repetition ratios to the pruned model), then the report of the ``constants="program"``
compaction: each linear op's widths before and after, and what kept units that carry nothing.
``--round_to``: each listed value other than 1 adds both library compactions with every
shrunk width rounded up to a multiple of it (``flipout.compact(..., round_to=k)``), timed in
the same interleaved repetitions. ``--json`` appends all of it, with the device, as one JSON
line to a file.

``--families``: every experiments family (or each ``--family``) with random weights pruned
at ``--sparsity`` (``tests/test_compaction.random_model``: random masks, whole units cut,
non-trivial BatchNorm statistics) at CIFAR size: parameters after each compaction, and the
seconds ``flipout.compact`` takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flipout_jax as flipout
from experiments import checkpoints, compact as compact_cli, compaction, input_pipeline, train
from tests import family_compaction
from tests import test_compaction


def _apply_of(model):
  graphdef, state = nnx.split(model)
  return (lambda params, images: nnx.merge(graphdef, params)(images)), nnx.to_pure_dict(state)


def _size(tree) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def run_report(
    workdir: str, repeats: int, json_path: str | None = None, round_to: tuple[int, ...] = (1,)
) -> None:
  run = checkpoints.load_run(workdir, None)
  run.model.eval()
  dataset = train.load_dataset(run.config)
  images = input_pipeline.normalize(dataset.test_images, dataset.mean, dataset.std)
  batch = images[: min(run.config.eval_batch_size, len(images))]
  input_shape = tuple(images.shape[1:])
  apply, params = _apply_of(run.model)
  forwards, sizes = {"pruned": (jax.jit(apply), params)}, {"pruned": _size(params)}
  seconds, reports = {}, {}
  for k in dict.fromkeys((1, *round_to)):
    for constants in ("program", "params"):
      name = f"library/{constants}" + ("" if k == 1 else f"/round_to={k}")
      start = time.perf_counter()
      compacted = flipout.compact(apply, params, batch[:2], constants=constants, round_to=k)
      seconds[name] = time.perf_counter() - start
      reports[name] = compacted.report
      print(f"flipout.compact(constants={constants!r}, round_to={k}): {seconds[name]:.2f} s")
      forwards[name] = (jax.jit(compacted.apply), compacted.params)
      sizes[name] = _size(compacted.params)
  family = family_compaction.compact(run.model, input_shape).model
  family_apply, family_params = _apply_of(family)
  forwards["per-family"], sizes["per-family"] = (jax.jit(family_apply), family_params), _size(
      family_params
  )
  reference = np.asarray(forwards["pruned"][0](params, batch))
  calls = [lambda x, f=f, p=p: f(p, x) for f, p in forwards.values()]
  times = compact_cli.time_side_by_side(calls, batch, repeats)
  device = jax.devices()[0].device_kind
  print(
      f"{run.config.model} / {run.config.method}, batch {len(batch)}, {repeats} repetitions, "
      f"{device}"
  )
  rows = []
  for (name, (fn, p)), timing in zip(forwards.items(), times):
    rows.append(
        dict(
            name=name,
            parameters=sizes[name],
            ms=1e3 * statistics.median(timing),
            speedup=statistics.median(d / t for d, t in zip(times[0], timing)),
            max_logit_difference=float(np.abs(np.asarray(fn(p, batch)) - reference).max()),
            compact_seconds=seconds.get(name),
        )
    )
    print(
        f"  {name:30s} params {sizes[name]:>10,}  ms {rows[-1]['ms']:8.3f}  "
        f"speedup {rows[-1]['speedup']:6.2f}x  max|logit diff| "
        f"{rows[-1]['max_logit_difference']:.2g}"
    )
  print(reports["library/program"])
  for k in round_to:
    if k != 1:
      print(f"round_to={k}:")
      print(reports[f"library/program/round_to={k}"])
  if json_path:
    record = dict(
        workdir=workdir,
        model=run.config.model,
        method=run.config.method,
        sparsity=float(flipout.sparsity(params)),
        batch=len(batch),
        repeats=repeats,
        device=device,
        rows=rows,
        round_to=list(round_to),
        layers=[layer._asdict() for layer in reports["library/program"].layers],
        kept_by=reports["library/program"].kept_by,
    )
    with open(json_path, "a") as f:
      f.write(json.dumps(record) + "\n")


# Each family at the input size of its experiments.
_FAMILIES = {
    "lenet300": (28, 28, 1),
    "lenet5": (28, 28, 1),
    "conv6": (32, 32, 3),
    "vgg19": (32, 32, 3),
    "resnet18": (32, 32, 3),
    "densenet121": (32, 32, 3),
}


def families_report(sparsity: float, only: list[str] | None = None) -> None:
  for name, shape in _FAMILIES.items():
    if only and name not in only:
      continue
    model = test_compaction.random_model(test_compaction.named(name, shape), sparsity)
    apply, params = _apply_of(model)
    images = jnp.zeros((2, *shape))
    row = [f"{name:12s} dense {_size(params):>11,}"]
    for constants in ("program", "params"):
      start = time.perf_counter()
      compacted = flipout.compact(apply, params, images, constants=constants)
      seconds = time.perf_counter() - start
      row.append(f"{constants} {_size(compacted.params):>10,} ({seconds:5.1f} s)")
    family = family_compaction.compact(model, shape).model
    row.append(f"per-family {_size(nnx.state(family)):>10,}")
    print("  ".join(row), flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir")
  parser.add_argument("--families", action="store_true")
  parser.add_argument("--sparsity", type=float, default=0.999)
  parser.add_argument("--repeats", type=int, default=21)
  parser.add_argument("--json", help="with --workdir: append the results as a JSON line here")
  parser.add_argument(
      "--round_to",
      default="1",
      type=lambda text: tuple(int(k) for k in text.split(",")),
      help="with --workdir: comma-separated multiples to round compacted widths up to (1: none)",
  )
  parser.add_argument(
      "--family",
      action="append",
      choices=list(_FAMILIES),
      help="with --families: only this family (repeatable)",
  )
  args = parser.parse_args(argv)
  if args.workdir:
    run_report(args.workdir, args.repeats, args.json, args.round_to)
  if args.families:
    families_report(args.sparsity, args.family)
  return 0


if __name__ == "__main__":
  sys.exit(main())
