"""Int8 post-training quantization of a trained run, and its size on disk.

    python -m experiments.quantize --workdir RUN [--calibration_batches 8] [--compact]

Loads the newest checkpoint of ``RUN`` (written by any experiment entry point),
quantizes its convolution and dense layers with qwix (per-channel symmetric
int8 weights, static-range int8 activations calibrated on training batches;
see ``experiments/qwix_ptq.py``), and reports test accuracy in float32 and
int8, sparsity before and after (symmetric quantization maps 0 to 0, so every
pruned weight stays pruned), and the model's bytes on disk as dense float32,
sparse float32 and sparse int8 (``flipout.export``). Results also go to
``RUN/quantize.json``; the exported files to ``RUN/export/``, with ``model.json``, the
description that rebuilds the model from them (``experiments/model_export.py``). The files
hold the model's inference state: its parameters and BatchNorm statistics.

With ``--compact`` (a pruned run only) the model is first compacted
(``experiments/compaction.py``: every unit that cannot change the logits removed), and all of
the above is about the compact model: its int8 accuracy, its sparsity and its files, written
to ``RUN/export_compact/`` (whose ``model.json`` records the compact widths) and
``RUN/quantize_compact.json``. Both reports also give the accuracy of the model loaded back
from the int8 export (``flipout.export``'s own weight-only int8, dequantized on loading),
as a check that the files rebuild the model.
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
from experiments import checkpoints, cli, compaction, model_export, train
from experiments import config as config_lib

_RESULT_FILE = "quantize.json"
_COMPACT_RESULT_FILE = "quantize_compact.json"
_EXPORT_DIR = "export"
_COMPACT_EXPORT_DIR = "export_compact"


def quantize_run(
    workdir,
    *,
    calibration_batches: int = 8,
    batch_size: int = 128,
    epoch: int | None = None,
    compact: bool = False,
) -> dict[str, Any]:
  """Quantizes the run in ``workdir`` and returns (and writes) the report.

  Args:
    workdir: a run's folder, holding ``checkpoints/``.
    calibration_batches: training batches (not augmented) that calibrate the
      activation ranges.
    batch_size: batch size of calibration and evaluation.
    epoch: the checkpoint to use (default: the newest).
    compact: quantize and export the compacted model instead (see the module docstring).

  Raises:
    config_lib.ConfigError: no checkpoint, bad arguments, or ``compact`` on a run trained
      without pruning.
    input_pipeline.DatasetUnavailableError: the run's data set cannot be loaded.
    ValueError: qwix cannot quantize a layer of the model (names the layer).
  """
  for name, value in (("calibration_batches", calibration_batches), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise config_lib.ConfigError(f"--{name} must be a positive integer, got {value!r}")
  workdir = Path(workdir)
  run = checkpoints.load_run(workdir, epoch)
  if compact and run.masks is None:
    raise config_lib.ConfigError(
        f"--compact needs a pruned run; {workdir} was trained with --method={run.config.method}"
    )
  dataset = train.load_dataset(run.config)
  input_shape = tuple(int(size) for size in dataset.test_images.shape[1:])
  model, widths = run.model, None
  if compact:
    compacted = compaction.compact(run.model, input_shape)
    model, widths = compacted.model, compacted.widths

  def normalized(images):
    return input_pipeline.normalize(images, dataset.mean, dataset.std)

  test_images = normalized(dataset.test_images)
  calibration = [
      normalized(dataset.train_images[start : start + batch_size])
      for start in range(
          0, min(calibration_batches * batch_size, len(dataset.train_images)), batch_size
      )
  ]
  quantized = qwix_ptq.quantize_model(model, calibration)
  zeros = qwix_ptq.int8_weight_sparsity(model, quantized)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  export_dir = workdir / (_COMPACT_EXPORT_DIR if compact else _EXPORT_DIR)
  export_dir.mkdir(exist_ok=True)
  model_export.write_description(
      export_dir,
      name=run.config.model,
      input_shape=input_shape,
      num_classes=dataset.num_classes,
      widths=widths,
  )
  sizes = qwix_ptq.model_file_sizes(model_export.inference_state(model), export_dir)
  report = {
      "workdir": str(workdir),
      "epoch": run.epoch,
      "synthetic": run.config.synthetic,
      "model": run.config.model,
      "method": run.config.method,
      "compact": compact,
      "parameters": compaction.parameter_count(model),
      "float32_accuracy": qwix_ptq.evaluate(model, test_images, dataset.test_labels, batch_size),
      "int8_accuracy": qwix_ptq.evaluate(quantized, test_images, dataset.test_labels, batch_size),
      "prunable_sparsity": flipout.sparsity(params),
      "float32_sparsity": zeros.float_sparsity,
      "int8_sparsity": zeros.int8_sparsity,
      "pruned_weights_kept_zero": zeros.zeros_lost == 0,
      "live_weights_rounded_to_zero": zeros.zeros_gained,
      "calibration_batches": len(calibration),
      "bytes": sizes._asdict(),
      "export": str(export_dir),
  }
  if compact:
    report["widths"] = model_export.widths_to_json(widths)
  # The int8 export, loaded back through its description: what a user of the files gets.
  reloaded = model_export.load_model(export_dir, "sparse_int8.npz")
  report["export_int8_accuracy"] = qwix_ptq.evaluate(
      reloaded, test_images, dataset.test_labels, batch_size
  )
  result_file = _COMPACT_RESULT_FILE if compact else _RESULT_FILE
  (workdir / result_file).write_text(json.dumps(report, indent=2) + "\n")
  return report


def format_report(report: dict[str, Any]) -> str:
  """The report as a few aligned lines."""
  sizes = report["bytes"]
  synthetic = "  [SYNTHETIC DATA: not a result]" if report["synthetic"] else ""
  compact = f", compact: {report['parameters']:,} parameters" if report.get("compact") else ""
  lines = [
      f"{report['model']} / {report['method']} (epoch {report['epoch']}{compact}){synthetic}",
      f"{'':<22}{'float32':>14}{'int8':>14}",
      f"{'test accuracy':<22}{report['float32_accuracy']:>14.2%}{report['int8_accuracy']:>14.2%}",
      f"{'sparsity (conv+dense)':<22}{report['float32_sparsity']:>14.4%}"
      f"{report['int8_sparsity']:>14.4%}",
      f"live weights that rounded to int8 zero: {report['live_weights_rounded_to_zero']}",
      f"bytes on disk: dense float32 {sizes['dense_float32']:,}, sparse float32 "
      f"{sizes['sparse_float32']:,}, sparse int8 {sizes['sparse_int8']:,}",
      f"reloaded from {report['export']}/sparse_int8.npz: test accuracy "
      f"{report['export_int8_accuracy']:.2%}",
  ]
  return "\n".join(lines)


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
  parser.add_argument(
      "--compact",
      action="store_true",
      help="compact the pruned model first; report and export the compact model",
  )
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
        compact=args.compact,
    )
  except (ValueError, FileNotFoundError) as error:  # ConfigError, DatasetUnavailableError too
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2
  print(format_report(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
