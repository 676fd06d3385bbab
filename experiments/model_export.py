"""A model on disk that can be rebuilt and run: ``flipout.export`` files plus a description.

``flipout.export`` stores a nested dict of arrays; to run those arrays again one needs the
architecture they belong to. For the experiments' models that is the model name, the input
shape, the number of classes and the per-layer widths (``models.PlainWidths``,
``ResNetWidths`` or ``DenseNetWidths``; a compacted network has widths of its own). This
module writes them as ``model.json`` next to the exports, and rebuilds the model from the
description and any export in the folder:

    write_description(folder, name="lenet300", input_shape=(28, 28, 1), num_classes=10,
                      widths=compacted.widths)
    flipout.export(inference_state(model), folder / "sparse_int8.npz", int8=True)
    model = load_model(folder, "sparse_int8.npz")   # eval mode; int8 kernels dequantized

The exported tree is the model's inference state: its parameters and its BatchNorm running
statistics (the batch statistics are 1-D, so ``flipout.export`` stores them dense). JSON
only: nothing in the folder is unpickled or executed when it is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

import flipout_jax as flipout
from experiments import models, validation

DESCRIPTION_FILE = "model.json"
_FORMAT = "flipout_jax.experiments.model"
_FORMAT_VERSION = 1

Widths = models.PlainWidths | models.ResNetWidths | models.DenseNetWidths


class Description(NamedTuple):
  """What ``models.create_model`` needs to rebuild an exported model's architecture.

  Attributes:
    name: one of ``models.MODEL_NAMES``.
    input_shape: ``(height, width, channels)`` of one image.
    num_classes: number of logits.
    widths: per-layer widths; None for the reference widths of ``name``.
  """

  name: str
  input_shape: tuple[int, int, int]
  num_classes: int
  widths: Widths | None = None


def inference_state(model: nnx.Module) -> dict:
  """The parameters and BatchNorm statistics of ``model`` as a nested dict of arrays, the
  tree ``flipout.export`` writes and :func:`load_model` reads back."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))


def widths_to_json(widths: Widths | None) -> dict[str, Any] | None:
  """``widths`` as a JSON object (tuples as lists); None stays None."""
  if widths is None:
    return None
  return {
      field: list(value) if isinstance(value, tuple) else value
      for field, value in widths._asdict().items()
  }


def _widths_from_json(name: str, fields) -> Widths | None:
  if fields is None:
    return None
  family = type(models.default_widths(name))
  if not isinstance(fields, dict) or set(fields) - set(family._fields):
    raise ValueError(f"widths of {name} must be an object with fields {family._fields}")
  values = {
      field: tuple(value) if isinstance(value, list) else value for field, value in fields.items()
  }
  for field, value in values.items():
    parts = value if isinstance(value, tuple) else (value,)
    if not all(part is None or (validation.is_int(part) and part >= 0) for part in parts):
      raise ValueError(f"widths of {name}: {field} must be integers >= 0, got {value!r}")
  try:
    return family(**values)
  except TypeError as error:
    raise ValueError(f"widths of {name}: {error}") from None


def write_description(
    directory: str | os.PathLike,
    *,
    name: str,
    input_shape,
    num_classes: int,
    widths: Widths | None = None,
) -> Path:
  """Writes ``directory/model.json`` describing the architecture; returns its path.

  Raises:
    ValueError: ``name``, ``input_shape``, ``num_classes`` or ``widths`` do not build a
      model (checked abstractly: nothing is initialised).
  """
  description = Description(name, tuple(int(s) for s in input_shape), int(num_classes), widths)
  _abstract_model(description)  # refuse what could not be loaded back
  path = Path(directory) / DESCRIPTION_FILE
  content = {
      "format": _FORMAT,
      "version": _FORMAT_VERSION,
      "model": description.name,
      "input_shape": list(description.input_shape),
      "num_classes": description.num_classes,
      "widths": widths_to_json(widths),
  }
  path.write_text(json.dumps(content) + "\n")
  return path


def read_description(directory: str | os.PathLike) -> Description:
  """Reads ``directory/model.json``.

  Raises:
    FileNotFoundError: no description in ``directory``.
    ValueError: the file is not a description written by :func:`write_description`.
  """
  path = Path(directory) / DESCRIPTION_FILE
  try:
    content = json.loads(path.read_text())
  except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested too deeply
    raise ValueError(f"{path}: not JSON ({type(error).__name__}: {error})") from None
  if not isinstance(content, dict) or content.get("format") != _FORMAT:
    raise ValueError(f"{path}: not a model description (format {_FORMAT!r})")
  if content.get("version") != _FORMAT_VERSION:
    raise ValueError(f"{path}: unknown version {content.get('version')!r}")
  name = content.get("model")
  if name not in models.MODEL_NAMES:
    raise ValueError(f"{path}: unknown model {name!r}")
  try:
    input_shape, num_classes = tuple(content["input_shape"]), content["num_classes"]
    if len(input_shape) != 3 or not all(validation.is_int(s) and s >= 1 for s in input_shape):
      raise ValueError(f"input_shape must be 3 integers >= 1, got {list(input_shape)}")
    validation.check_int("num_classes", num_classes, minimum=1)
    return Description(
        name, input_shape, num_classes, _widths_from_json(name, content.get("widths"))
    )
  except (KeyError, TypeError, ValueError) as error:
    raise ValueError(f"{path}: malformed description ({type(error).__name__}: {error})") from None


def _abstract_model(description: Description) -> nnx.Module:
  """The described model, shapes only (no initialiser runs: each would be an XLA compile)."""
  return nnx.eval_shape(
      lambda: models.create_model(
          description.name,
          input_shape=description.input_shape,
          num_classes=description.num_classes,
          rngs=nnx.Rngs(0),
          widths=description.widths,
      )
  )


def load_model(directory: str | os.PathLike, file: str = "sparse_float32.npz") -> nnx.Module:
  """Rebuilds the model described in ``directory`` with the state exported to ``file``.

  Args:
    directory: a folder holding ``model.json`` and the export.
    file: the ``flipout.export`` file in ``directory`` (float32 or int8: int8 kernels come
      back dequantized, ``q * scale``).

  Returns:
    The model, in eval mode.

  Raises:
    FileNotFoundError: no description or no ``file``.
    ValueError: a malformed description, a file that is not an export, or an export whose
      arrays do not fit the described architecture (names the first mismatch).
  """
  description = read_description(directory)
  graphdef, state, rest = nnx.split(
      _abstract_model(description), nnx.Any(nnx.Param, nnx.BatchStat), ...
  )
  expected = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  loaded = traverse_util.flatten_dict(flipout.load(Path(directory) / file))
  for path in sorted(set(expected) | set(loaded), key=str):
    if path not in loaded or path not in expected:
      where = "missing from" if path not in loaded else "not in the model of"
      raise ValueError(f"{file}: {'/'.join(map(str, path))} {where} the export")
    if loaded[path].shape != expected[path].shape:
      raise ValueError(
          f"{file}: {'/'.join(map(str, path))} has shape {loaded[path].shape}, the described "
          f"model needs {expected[path].shape}"
      )
  filled = {path: jnp.asarray(loaded[path], leaf.dtype) for path, leaf in expected.items()}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(filled))
  model = nnx.merge(graphdef, state, rest)
  model.eval()
  return model
