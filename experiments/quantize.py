"""Int8 post-training quantization of a trained run, and its size on disk.

    python -m experiments.quantize --workdir RUN [--calibration_batches 8]

Loads the newest checkpoint of ``RUN`` (written by any experiment entry point),
quantizes its convolution and dense layers with qwix (per-channel symmetric
int8 weights, static-range int8 activations calibrated on training batches;
see ``experiments/qwix_ptq.py``), and reports test accuracy in float32 and
int8, sparsity before and after (symmetric quantization maps 0 to 0, so every
pruned weight stays pruned), and the model's bytes on disk as dense float32,
sparse float32 and sparse int8 (``flipout.export``). Results also go to
``RUN/quantize.json``; the exported files to ``RUN/export/``.
"""

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax import nnx

import flipout_jax as flipout
from experiments import input_pipeline
from experiments import qwix_ptq
from experiments import checkpoints, cli, train
from experiments import config as config_lib

_RESULT_FILE = "quantize.json"


def quantize_run(
    workdir, *, calibration_batches: int = 8, batch_size: int = 128, epoch: int | None = None
) -> dict[str, Any]:
  """Quantizes the run in ``workdir`` and returns (and writes) the report.

  Args:
    workdir: a run's folder, holding ``checkpoints/``.
    calibration_batches: training batches (not augmented) that calibrate the
      activation ranges.
    batch_size: batch size of calibration and evaluation.
    epoch: the checkpoint to use (default: the newest).

  Raises:
    config_lib.ConfigError: no checkpoint, or bad arguments.
    input_pipeline.DatasetUnavailableError: the run's data set cannot be loaded.
    ValueError: qwix cannot quantize a layer of the model (names the layer).
  """
  for name, value in (("calibration_batches", calibration_batches), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise config_lib.ConfigError(f"--{name} must be a positive integer, got {value!r}")
  workdir = Path(workdir)
  run = checkpoints.load_run(workdir, epoch)
  dataset = train.load_dataset(run.config)

  def normalized(images):
    return input_pipeline.normalize(images, dataset.mean, dataset.std)

  test_images = normalized(dataset.test_images)
  calibration = [
      normalized(dataset.train_images[start : start + batch_size])
      for start in range(
          0, min(calibration_batches * batch_size, len(dataset.train_images)), batch_size
      )
  ]
  quantized = qwix_ptq.quantize_model(run.model, calibration)
  zeros = qwix_ptq.int8_weight_sparsity(run.model, quantized)
  params = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
  (workdir / "export").mkdir(exist_ok=True)
  sizes = qwix_ptq.model_file_sizes(params, workdir / "export")
  report = {
      "workdir": str(workdir),
      "epoch": run.epoch,
      "synthetic": run.config.synthetic,
      "model": run.config.model,
      "method": run.config.method,
      "float32_accuracy": qwix_ptq.evaluate(
          run.model, test_images, dataset.test_labels, batch_size
      ),
      "int8_accuracy": qwix_ptq.evaluate(quantized, test_images, dataset.test_labels, batch_size),
      "prunable_sparsity": flipout.sparsity(params),
      "float32_sparsity": zeros.float_sparsity,
      "int8_sparsity": zeros.int8_sparsity,
      "pruned_weights_kept_zero": zeros.zeros_lost == 0,
      "live_weights_rounded_to_zero": zeros.zeros_gained,
      "calibration_batches": len(calibration),
      "bytes": sizes._asdict(),
  }
  (workdir / _RESULT_FILE).write_text(json.dumps(report, indent=2) + "\n")
  return report


def format_report(report: dict[str, Any]) -> str:
  """The report as a few aligned lines."""
  sizes = report["bytes"]
  synthetic = "  [SYNTHETIC DATA: not a result]" if report["synthetic"] else ""
  return "\n".join(
      [
          f"{report['model']} / {report['method']} (epoch {report['epoch']}){synthetic}",
          f"{'':<22}{'float32':>14}{'int8':>14}",
          f"{'test accuracy':<22}{report['float32_accuracy']:>14.2%}{report['int8_accuracy']:>14.2%}",
          f"{'sparsity (conv+dense)':<22}{report['float32_sparsity']:>14.4%}"
          f"{report['int8_sparsity']:>14.4%}",
          f"live weights that rounded to int8 zero: {report['live_weights_rounded_to_zero']}",
          f"bytes on disk: dense float32 {sizes['dense_float32']:,}, sparse float32 "
          f"{sizes['sparse_float32']:,}, sparse int8 {sizes['sparse_int8']:,}",
      ]
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Command line: bad input prints one line and returns 2."""
  parser = cli.OneLineParser(
      prog="python -m experiments.quantize", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--workdir", required=True, help="a trained run's folder")
  parser.add_argument(
      "--calibration_batches",
      type=int,
      default=8,
      help="training batches that calibrate activation ranges",
  )
  parser.add_argument("--batch_size", type=int, default=128, help="calibration/eval batch size")
  parser.add_argument("--epoch", type=int, default=None, help="checkpoint (default: newest)")
  # qwix 0.1.8 uses Flax APIs that Flax 0.12 deprecates: noise for users.
  warnings.filterwarnings("ignore", category=DeprecationWarning, module="qwix")
  try:
    args = parser.parse_args(argv)
  except SystemExit as exit_request:
    return int(exit_request.code or 0)
  try:
    report = quantize_run(
        args.workdir,
        calibration_batches=args.calibration_batches,
        batch_size=args.batch_size,
        epoch=args.epoch,
    )
  except (ValueError, FileNotFoundError) as error:  # ConfigError, DatasetUnavailableError too
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2
  print(format_report(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
