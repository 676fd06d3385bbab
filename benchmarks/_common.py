"""Pieces shared by the benchmarks: models as pure functions, the optimizer chains compared,
interleaved timing, tables and the command line.

The chains come from the trainer's own builder (``experiments.optimizers``) and the command
line from ``experiments.cli``. Nothing here imports ``tensorflow_datasets`` (the experiments
import it lazily, only to read a data set): the GPU image has no tfds, and the cost benchmarks
run there on synthetic arrays.

Timing method (every cost figure is a ratio measured side by side in one process):

* every variant is compiled and warmed up first (compilation and the first calls are never
  timed);
* each variant gets a number of calls per timed window so that a window lasts about
  ``window_s`` seconds (one call at least), fixed before timing starts;
* repetitions interleave the variants (ABC, BCA, CAB, ...: the order rotates so no variant is
  always first after a pause), each window ends with ``jax.block_until_ready``;
* a ratio is the median over repetitions of the per-repetition ratio of seconds per call, so a
  slow spell of the shared machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flipout_jax as flipout
from experiments import cli, models, optimizers, run_state
from experiments import config as config_lib

MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)

# The optimizer chains compared. Coupled weight decay (added to the gradient before momentum),
# as PyTorch's SGD, the paper and experiments.train do.
DENSE = "dense"  # add_decayed_weights -> sgd(momentum)
PRUNE = "prune"  # ... -> flipout.prune
FLIPOUT = "flipout"  # gradient_noise -> ... -> flipout.prune (the paper's full chain)
# ... -> flipout.fixed_masks(all live): prune's masking and flip counting without its event
# (no conditional in the step), to tell the two costs apart.
MASKS = "masks"
# ... -> flipout.prune(0.999, structure="unit") with the model's unit groups, and
# ... -> flipout.prune(structure="2:4") (sparsity 0.5) on the kernels whose input width is a
# multiple of 4: the same steady step as `prune`, other events.
PRUNE_UNIT = "prune_unit"
PRUNE_2_4 = "prune_2:4"
STRUCTURED_VARIANTS = (PRUNE_UNIT, PRUNE_2_4)
VARIANTS = (DENSE, PRUNE, FLIPOUT, MASKS, *STRUCTURED_VARIANTS)
DEFAULT_VARIANTS = (DENSE, PRUNE, FLIPOUT)
# The trainer's --structure of each pruning variant.
STRUCTURE_OF = {PRUNE: "weight", PRUNE_UNIT: "unit", PRUNE_2_4: "2:4"}

LEARNING_RATE = 0.01  # small: synthetic labels, many steps; keeps the weights finite
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
TARGET_SPARSITY = 0.999
# The run the pruning chains are built for by default. Steps are timed after its last event
# (StepRunner), and that event lies beyond step 65535, so its flip counters are int32: the
# widest state. --total_steps 60000 gives the uint16 counters of runs up to ~65k steps.
STEADY_TOTAL_STEPS = 10**8


class Case(NamedTuple):
  """One model at one batch size."""

  model: str
  batch_size: int
  input_shape: tuple[int, int, int]
  num_classes: int = 10

  @property
  def label(self) -> str:
    return f"{self.model} b{self.batch_size}"


CPU_CASES = (
    Case("lenet300", 128, MNIST_SHAPE),
    Case("resnet18", 32, CIFAR_SHAPE),
    Case("vgg19", 32, CIFAR_SHAPE),
)
GPU_CASES = (Case("vgg19", 128, CIFAR_SHAPE), Case("resnet18", 128, CIFAR_SHAPE))
TINY_CASES = (Case("lenet300", 16, MNIST_SHAPE),)


def cases_for(device: str, tiny: bool) -> tuple[Case, ...]:
  """The cases of the issue for ``device`` (``"cpu"``/``"gpu"``), or the tiny smoke cases."""
  if tiny:
    return TINY_CASES
  return GPU_CASES if device == "gpu" else CPU_CASES


def resolve_device(requested: str) -> str:
  """``"auto"`` -> ``"gpu"`` when JAX's default backend is a GPU, else ``"cpu"``."""
  if requested != "auto":
    return requested
  return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"


# ---------------------------------------------------------------------------------------------
# Models as pure functions.
# ---------------------------------------------------------------------------------------------


class PureModel(NamedTuple):
  """A Flax NNX model split into its graph definition and pure-dict params / batch stats."""

  graphdef: Any
  params: Any
  batch_stats: Any


def _create(case: Case, seed: int) -> nnx.Module:
  return models.create_model(
      case.model, input_shape=case.input_shape, num_classes=case.num_classes, rngs=nnx.Rngs(seed)
  )


def abstract_model(case: Case) -> PureModel:
  """The model in train mode with ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
  graphdef, params, batch_stats = nnx.split(
      nnx.eval_shape(lambda: _create(case, 0)), nnx.Param, nnx.BatchStat
  )
  return PureModel(graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats))


def _initial_value(path, leaf: jax.ShapeDtypeStruct, rng: np.random.Generator) -> np.ndarray:
  """He-normal kernels (std ``sqrt(2 / fan_in)``), unit BatchNorm scale and variance, else 0."""
  name = getattr(path[-1], "key", None)
  if len(leaf.shape) >= 2:
    fan_in = math.prod(leaf.shape[:-1])
    return rng.standard_normal(leaf.shape, np.float32) * np.float32(math.sqrt(2.0 / fan_in))
  return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)


def init_model(case: Case, seed: int = 0) -> PureModel:
  """The model in train mode with He-normal weights drawn by NumPy.

  Timing does not depend on the exact initialisation, and NumPy needs no XLA compilation
  (each JAX initializer compiles separately on CPU, seconds per leaf on a loaded machine).
  """
  graphdef, params, batch_stats = abstract_model(case)
  rng = np.random.default_rng(seed)
  fill = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(_initial_value(path, leaf, rng)), tree
  )
  return PureModel(graphdef, fill(params), fill(batch_stats))


@functools.lru_cache(maxsize=8)
def unit_groups_of(case: Case) -> Any:
  """``flipout.unit_groups`` of the model's inference function, as the trainer reads them."""
  abstract = nnx.eval_shape(lambda: _create(case, 0))
  abstract.eval()
  graphdef_eval, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  return run_state.model_unit_groups(
      graphdef_eval, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats), case.input_shape
  )


def synthetic_batch(case: Case, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Standard-normal float32 images (as if normalised) and uniform int32 labels (NumPy-drawn)."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((case.batch_size, *case.input_shape), np.float32)
  labels = rng.integers(0, case.num_classes, case.batch_size, dtype=np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def abstract_batch(case: Case) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """Shapes of :func:`synthetic_batch` without computing it."""
  return (
      jax.ShapeDtypeStruct((case.batch_size, *case.input_shape), jnp.float32),
      jax.ShapeDtypeStruct((case.batch_size,), jnp.int32),
  )


# ---------------------------------------------------------------------------------------------
# Optimizer chains and the train step.
# ---------------------------------------------------------------------------------------------


def make_chain(
    variant: str,
    *,
    total_steps: int = STEADY_TOTAL_STEPS,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    params=None,
    unit_groups=None,
) -> optax.GradientTransformation:
  """The chain of ``variant`` (one of :data:`VARIANTS`), built by the trainer's own builder.

  ``dense`` is the trainer's dense method; ``prune`` its flipout method without the noise;
  ``flipout`` the paper's full chain. One "epoch" of ``total_steps`` steps and no milestones:
  a constant learning rate. ``masks`` is the dense chain followed by ``fixed_masks`` with every
  weight of the leaves of 2+ dimensions of ``params`` (arrays or shapes) live. ``prune_unit``
  and ``prune_2:4`` are ``prune`` with the trainer's ``--structure=unit`` (``unit_groups``:
  :func:`unit_groups_of` the model) and ``--structure=2:4 --sparsity=0.5``.

  Raises:
    ValueError: unknown ``variant``, ``masks`` without ``params`` or ``prune_unit`` without
      ``unit_groups``.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
  if variant == PRUNE_UNIT and unit_groups is None:
    raise ValueError(f"variant {PRUNE_UNIT!r} needs unit_groups: the model's coupled units")
  if variant == MASKS:
    if params is None:
      raise ValueError(f"variant {MASKS!r} needs params: its masks are shaped like them")
    dense = make_chain(DENSE, total_steps=total_steps, learning_rate=learning_rate, seed=seed)
    all_live = lambda leaf: np.ones(leaf.shape, bool) if len(leaf.shape) >= 2 else None
    return optax.chain(dense, flipout.fixed_masks(jax.tree.map(all_live, params)))
  structure = STRUCTURE_OF.get(variant, "weight")
  run_config = config_lib.Config(
      method="dense" if variant == DENSE else "flipout",
      sparsity=0.5 if variant == PRUNE_2_4 else TARGET_SPARSITY,
      structure=structure,
      epochs=1,
      lr=learning_rate,
      milestones=(),
      momentum=MOMENTUM,
      weight_decay=WEIGHT_DECAY,
      noise_scale=1.0 if variant == FLIPOUT else 0.0,
      seed=seed,
  )
  return optimizers.build_optimizer(
      run_config, steps_per_epoch=total_steps, unit_groups=unit_groups
  )


def make_train_step(graphdef, tx: optax.GradientTransformation, *, donate: bool = True) -> Callable:
  """Jitted ``(state, images, labels) -> state``; ``state`` is ``(params, batch_stats, opt_state)``.

  A plain SGD training step on softmax cross-entropy, the model rebuilt from its pure state
  with ``nnx.merge`` inside the trace (BatchNorm in train mode updates its statistics).
  The state is donated, as in a real training loop, unless ``donate`` is False.
  """

  def loss_fn(params, batch_stats, images, labels):
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(images)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state
    grads, new_batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_batch_stats, new_opt_state

  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def chain_and_step(
    graphdef, variant: str, total_steps: int = STEADY_TOTAL_STEPS, seed: int = 0
) -> tuple[optax.GradientTransformation, Callable]:
  """The chain of ``variant`` and its jitted train step, cached by their arguments.

  One jitted function per (model, chain): its compilation (the slow part on CPU) is shared by
  every benchmark in a process, ahead-of-time ``lower().compile()`` included.
  """
  # Always positional: lru_cache keys f(a) and f(a, default) differently.
  return _cached_chain_and_step(graphdef, variant, total_steps, seed)


def model_chain_and_step(
    model: PureModel,
    variant: str,
    total_steps: int = STEADY_TOTAL_STEPS,
    seed: int = 0,
    case: Case | None = None,
) -> tuple[optax.GradientTransformation, Callable]:
  """:func:`chain_and_step` for ``model``; the ``masks`` chain (built from its params) and the
  ``prune_unit`` one (from the unit groups of ``case``, the model's case) uncached.

  Raises:
    ValueError: ``prune_unit`` without ``case``.
  """
  if variant == PRUNE_UNIT:
    if case is None:
      raise ValueError(f"variant {PRUNE_UNIT!r} needs the case: its groups come from the model")
    tx = make_chain(variant, total_steps=total_steps, seed=seed, unit_groups=unit_groups_of(case))
  elif variant == MASKS:
    tx = make_chain(MASKS, total_steps=total_steps, seed=seed, params=model.params)
  else:
    return chain_and_step(model.graphdef, variant, total_steps, seed)
  return tx, make_train_step(model.graphdef, tx)


@functools.lru_cache(maxsize=32)
def _cached_chain_and_step(graphdef, variant, total_steps, seed):
  tx = make_chain(variant, total_steps=total_steps, seed=seed)
  return tx, make_train_step(graphdef, tx)


class StepRunner:
  """Runs ``n`` training steps of one variant on a fixed batch, then blocks.

  Holds the evolving state, so consecutive windows continue the same run. The chain is built
  for a run of ``total_steps`` and its step counters start at ``total_steps - 1``: every step
  is timed after the run's last pruning event, with the state (flip counter dtype included)
  of that run.
  """

  def __init__(
      self,
      case: Case,
      variant: str,
      *,
      total_steps: int = STEADY_TOTAL_STEPS,
      seed: int = 0,
      model: PureModel | None = None,
  ):
    model = init_model(case, seed) if model is None else model
    self.tx, self.step = model_chain_and_step(model, variant, total_steps, seed, case)
    # Own copies (from the host): the state is donated, and runners may share one model.
    params, batch_stats = (
        jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf)), tree)
        for tree in (model.params, model.batch_stats)
    )
    opt_state = jax.jit(self.tx.init)(params)
    if variant != DENSE:
      # A host scalar: each count becomes a buffer of its own, as the donated state needs.
      opt_state = optax.tree_utils.tree_set(opt_state, count=np.int32(total_steps - 1))
    self.state = (params, batch_stats, opt_state)
    self.images, self.labels = synthetic_batch(case, seed)

  def __call__(self, calls: int) -> None:
    for _ in range(calls):
      self.state = self.step(self.state, self.images, self.labels)
    jax.block_until_ready(self.state)

  def all_live(self) -> bool:
    """Whether no weight is pruned yet: no pruning event ran (True for chains without one)."""
    try:
      masks = flipout.masks(self.state[2])
    except ValueError:
      return True
    return all(np.asarray(m).all() for m in jax.tree.leaves(masks))


# ---------------------------------------------------------------------------------------------
# Interleaved timing.
# ---------------------------------------------------------------------------------------------


class Timings(NamedTuple):
  """Seconds per call of each variant in each repetition, and the calls per window."""

  seconds: dict[str, list[float]]
  calls: dict[str, int]


def _time_window(run: Callable[[int], None], calls: int) -> float:
  started = time.perf_counter()
  run(calls)
  return time.perf_counter() - started


def interleaved_timings(
    runners: dict[str, Callable[[int], None]],
    *,
    repetitions: int,
    window_s: float,
    warmup_calls: int = 2,
) -> Timings:
  """Times the runners side by side (see the module docstring for the method).

  Args:
    runners: name -> ``run(calls)``, which makes ``calls`` calls and blocks until done.
    repetitions: timed windows per runner.
    window_s: target length of one window in seconds.
    warmup_calls: untimed calls per runner before calibration (the first one compiles).

  Returns:
    :class:`Timings`: per runner, ``repetitions`` values of seconds per call.
  """
  if repetitions < 1:
    raise ValueError(f"repetitions must be >= 1, got {repetitions}")
  names = list(runners)
  calls = {}
  for name in names:
    runners[name](warmup_calls)
    one_call = _time_window(runners[name], 1)
    calls[name] = max(1, math.ceil(window_s / max(one_call, 1e-9)))
  seconds: dict[str, list[float]] = {name: [] for name in names}
  for repetition in range(repetitions):
    shift = repetition % len(names)
    for name in names[shift:] + names[:shift]:
      seconds[name].append(_time_window(runners[name], calls[name]) / calls[name])
  return Timings(seconds, calls)


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
  """Median over repetitions of ``numerator[i] / denominator[i]``."""
  return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def ratio_spread(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float]:
  """The 25th and 75th percentiles of the per-repetition ratios (the median's spread)."""
  ratios = np.asarray(numerator) / np.asarray(denominator)
  low, high = np.percentile(ratios, [25, 75])
  return float(low), float(high)


def ratio_summary(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
  """``{"median", "p25", "p75"}`` of the per-repetition ratios ``numerator / denominator``."""
  low, high = ratio_spread(numerator, denominator)
  return {"median": median_ratio(numerator, denominator), "p25": low, "p75": high}


def format_ratio(ratio: dict[str, float]) -> str:
  """``1.013x [1.008-1.019]``: median and interquartile range of the per-repetition ratios."""
  return f"{ratio['median']:.3f}x [{ratio['p25']:.3f}-{ratio['p75']:.3f}]"


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
  """Where and when a benchmark ran: backend, device, CPU count, versions, UTC date."""
  device = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
  }


def describe_machine(info: dict[str, Any]) -> str:
  """One line for the header of a printed table."""
  return (
      f"{info['device']} ({info['backend']}, {info['device_count']} device(s)), "
      f"{info['cpu_count']} CPU cores, jax {info['jax']}, {info['date']}"
  )


def write_json(path: str | os.PathLike, payload: Any) -> None:
  """Writes ``payload`` as indented JSON, atomically (a temporary file renamed into place)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(json.dumps(payload, indent=2) + "\n")
  temporary.replace(path)


def add_case_arguments(parser: argparse.ArgumentParser) -> None:
  """``--device``, ``--models`` and ``--variants``: which cases and chains a benchmark runs."""
  parser.add_argument(
      "--device",
      choices=("auto", "cpu", "gpu"),
      default="auto",
      help="which case list to run (auto: gpu when JAX's backend is a GPU)",
  )
  parser.add_argument(
      "--models", default=None, help="comma-separated subset of the device's models (default: all)"
  )
  parser.add_argument(
      "--variants",
      default=",".join(DEFAULT_VARIANTS),
      help=f"comma-separated chains among {','.join(VARIANTS)}; the first is the baseline",
  )


def add_run_length_argument(parser: argparse.ArgumentParser) -> None:
  """``--total_steps``: the run the pruning chains are built for (its flip counter dtype)."""
  parser.add_argument(
      "--total_steps",
      type=cli.positive_int,
      default=STEADY_TOTAL_STEPS,
      help="length of the run the pruning chains are built for (steps are timed after its last "
      "event): its flip counters are uint16 when that event is at step 65535 or earlier (e.g. "
      "60000), int32 otherwise (default: 10^8)",
  )


def add_timing_arguments(
    parser: argparse.ArgumentParser, *, repetitions: int, window_s: float
) -> None:
  """``--repetitions``, ``--window_s``, ``--tiny`` and ``--json``, shared by the timed benchmarks."""
  parser.add_argument(
      "--repetitions",
      type=cli.positive_int,
      default=repetitions,
      help="interleaved timed windows per variant",
  )
  parser.add_argument(
      "--window_s",
      type=cli.positive_float,
      default=window_s,
      help="target seconds of one timed window",
  )
  parser.add_argument(
      "--tiny",
      action="store_true",
      help="tiny sizes and few repetitions: a smoke test, never a result",
  )
  parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def timing_budget(args: argparse.Namespace) -> tuple[int, float]:
  """``(repetitions, window_s)`` of the flags from :func:`add_timing_arguments`; few under --tiny."""
  return (3, 0.02) if args.tiny else (args.repetitions, args.window_s)
