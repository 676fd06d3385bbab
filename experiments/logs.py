"""What a run reports: metrics.jsonl, TensorBoard scalars, progress bars, summary.json.

``metrics.jsonl`` holds one line per epoch, TensorBoard scalars go to ``tensorboard/``,
``summary.json`` is written at the end (config, final accuracy, per-layer sparsity, dense vs
live inference FLOPs). Runs on ``--synthetic`` data are marked ``"synthetic": true`` in both
files and in the printed result so they are never mistaken for results. Only the main process
writes.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import flipout_jax as flipout
from experiments import config as config_lib
from experiments import models, validation

METRICS_FILE = "metrics.jsonl"


SUMMARY_FILE = "summary.json"


_TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
  """metrics.jsonl and TensorBoard scalars of the main process (others write nothing)."""

  def __init__(
      self, workdir: Path, config: config_lib.Config, resumed_epoch: int, resumed_step: int
  ):
    self.enabled = jax.process_index() == 0
    self.metrics_path = workdir / METRICS_FILE
    self.writer = None
    if not self.enabled:
      return
    _truncate_metrics(self.metrics_path, resumed_epoch)
    if config.tensorboard:
      from tensorboardX import SummaryWriter

      # purge_step drops the events a killed run wrote after its last checkpoint.
      self.writer = SummaryWriter(
          str(workdir / _TENSORBOARD_DIR), purge_step=resumed_step + 1 if resumed_step else None
      )

  def write(self, record: dict[str, Any], step: int) -> None:
    if not self.enabled:
      return
    with self.metrics_path.open("a") as file:
      file.write(json.dumps(record) + "\n")
    if self.writer is not None:
      for name, value in record.items():
        if name not in ("epoch", "step", "synthetic") and isinstance(value, (int, float)):
          self.writer.add_scalar(name.replace("_", "/", 1), value, step)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def read_records(path: Path) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file; none if it does not exist.

  A run killed while writing leaves a partial last line: it is dropped with a warning (its
  epoch is written again when the run resumes). Any other unreadable line is an error.

  Memory: the file's text and its records (a few times its size).

  Raises:
    config_lib.ConfigError: a line before the last one is not a JSON record with an integer
      ``epoch``, or the file is not UTF-8.
  """
  if not path.exists():
    return []
  try:
    text = path.read_text()
  except UnicodeDecodeError:
    raise config_lib.ConfigError(
        f"{path} is not UTF-8 text; remove the file to start its log anew"
    ) from None
  lines = [line for line in text.splitlines() if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not validation.is_int(record.get("epoch")):
        raise ValueError("not an epoch record")
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
      if number < len(lines):
        raise config_lib.ConfigError(
            f"{path} line {number} is not a metrics record; remove the file to start its log anew"
        ) from None
      warnings.warn(f"{path}: dropped a partial last line (the run was cut off while writing it)")
      break
    records.append(record)
  return records


def _truncate_metrics(path: Path, last_epoch: int) -> None:
  """Keeps the records of epochs ``<= last_epoch`` (a resumed run rewrites the later ones)."""
  if not path.exists():
    return
  kept = [record for record in read_records(path) if record["epoch"] <= last_epoch]
  path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def last_record(path: Path, epoch: int) -> dict[str, Any] | None:
  """The metrics.jsonl record of ``epoch``, if there is one."""
  records = read_records(path)
  return next((record for record in reversed(records) if record["epoch"] == epoch), None)


def _json_ready(value):
  """Converts NumPy scalars/arrays, tuples and dataclasses to JSON types."""
  if dataclasses.is_dataclass(value):
    return _json_ready(dataclasses.asdict(value))
  if isinstance(value, dict):
    return {str(key): _json_ready(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(item) for item in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def epoch_record(
    epoch: int,
    step: int,
    totals,
    test_loss: float,
    test_accuracy: float,
    *,
    sparsity: float,
    lr: float,
    steps: int,
    seconds: float,
    synthetic: bool,
):
  """One metrics.jsonl line: epoch means of the train metrics, test metrics, state."""
  count = max(int(totals["count"]), 1)
  return {
      "epoch": epoch,
      "step": step,
      "train_loss": float(totals["loss"]) / count,
      "train_accuracy": float(totals["correct"]) / count,
      "test_loss": test_loss,
      "test_accuracy": test_accuracy,
      "sparsity": sparsity,
      "lr": lr,
      "flips_per_step": float(totals["flips"]) / max(steps, 1),
      "epoch_seconds": seconds,
      "synthetic": synthetic,
  }


def format_record(record: dict[str, Any], epochs: int) -> str:
  synthetic = " [SYNTHETIC]" if record["synthetic"] else ""
  return (
      f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
      f"acc {record['train_accuracy']:.4f} | test loss {record['test_loss']:.4f} "
      f"acc {record['test_accuracy']:.4f} | sparsity {record['sparsity']:.4%} "
      f"lr {record['lr']:.4g} flips/step {record['flips_per_step']:.1f} "
      f"({record['epoch_seconds']:.1f}s){synthetic}"
  )


def progress(steps: int, epoch: int, config: config_lib.Config, show: bool, first: int = 0):
  """The step numbers ``first ..`` of one epoch of ``steps``, behind a tqdm bar when ``show``."""
  if not show:
    return range(first, steps)
  from tqdm.auto import tqdm

  return tqdm(
      range(first, steps),
      initial=first,
      total=steps,
      desc=f"epoch {epoch}/{config.epochs}",
      leave=False,
      unit="step",
      dynamic_ncols=True,
  )


def announce(
    config: config_lib.Config, steps_per_epoch: int, num_devices: int, start_step: int
) -> None:
  """Prints the one line that opens a run: what is trained, where, on how many devices."""
  epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
  resumed = f", resuming after epoch {epoch}" if start_step else ""
  if step_in_epoch:
    resumed += f" and step {step_in_epoch} of epoch {epoch + 1} (step {start_step})"
  synthetic = " [SYNTHETIC DATA]" if config.synthetic else ""
  print(
      f"{config.dataset}/{config.model}/{config.method} sparsity {config.sparsity} on "
      f"{num_devices} device(s), {steps_per_epoch} steps/epoch -> "
      f"{config.workdir}{resumed}{synthetic}",
      flush=True,
  )


def run_summary(
    config: config_lib.Config,
    params,
    model: nnx.Module,
    record: dict[str, Any],
    *,
    input_shape: tuple[int, int, int],
    total_steps: int,
    num_devices: int,
    seconds: float,
) -> dict[str, Any]:
  """The final report (also written to summary.json).

  Args:
    config: the run's configuration.
    params: the final params (host arrays), for the per-layer sparsity report.
    model: the model in eval mode holding ``params``, for the inference FLOPs.
    record: the last epoch's metrics (test/train loss and accuracy).
    input_shape, total_steps, num_devices, seconds: the run's shape and duration.
  """
  report = flipout.summary(params)
  dense_flops, live_flops = models.inference_flops(model, input_shape)
  return _json_ready(
      {
          "synthetic": config.synthetic,
          "config": config_lib.config_to_json(config),
          "test_accuracy": record["test_accuracy"],
          "test_loss": record["test_loss"],
          "train_accuracy": record["train_accuracy"],
          "train_loss": record["train_loss"],
          "sparsity": report.sparsity,
          "prunable_weights": report.size,
          "live_weights": report.live,
          # A run stopped by a misplaced prune has NaN params: never report it as dense.
          "non_finite_weights": report.non_finite,
          "dense_flops": dense_flops,
          "live_flops": live_flops,
          "epochs": config.epochs,
          "steps": total_steps,
          "devices": num_devices,
          "seconds": seconds,
          "layers": report.to_dict()["layers"],
      }
  )
