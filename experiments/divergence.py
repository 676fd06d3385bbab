"""Non-finite training (``--on_nonfinite``): where the loss or the weights stop being finite.

The train step records, on device, the first step whose loss is not finite (no host sync per
step); at the end of each epoch, and before any checkpoint, the trainer asks
:func:`nonfinite_cause` whether that happened or the weights themselves went non-finite. With
``--on_nonfinite=stop`` (the default) it raises :class:`TrainingDiverged` *before* saving, so
the newest checkpoint stays the last finite state; ``continue`` only warns and trains on (the
behaviour before this check existed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ON_NONFINITE: tuple[str, ...] = ("stop", "continue")

# The value of the "first non-finite loss" total while every loss has been finite.
NO_STEP = np.iinfo(np.int32).max


class TrainingDiverged(RuntimeError):
  """The loss or the weights became non-finite under ``--on_nonfinite=stop``; one-line message."""


def first_nonfinite_loss_step(recorded: jax.Array, loss: jax.Array, step: jax.Array) -> jax.Array:
  """``recorded``, or ``step`` if ``loss`` is not finite and no earlier step was recorded.

  Args:
    recorded: the step recorded so far (int32; :data:`NO_STEP` when none).
    loss: this step's scalar loss.
    step: this step's number, counted from 1 (the steps done once it ends).
  """
  return jnp.where(jnp.isfinite(loss), recorded, jnp.minimum(recorded, step))


def _all_finite(tree) -> bool:
  return all(
      bool(np.isfinite(leaf).all())
      for leaf in jax.tree.leaves(tree)
      if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
  )


def nonfinite_cause(first_loss_step: int, weights, last_step: int) -> str | None:
  """What went non-finite, naming the step; None while the loss and ``weights`` are finite.

  Args:
    first_loss_step: the train step's record (:func:`first_nonfinite_loss_step`).
    weights: host copies of the trained state (params and batch statistics).
    last_step: the number of steps done, for weights that went non-finite after the last
      loss was computed (the loss of step ``t`` is computed from the weights before it).
  """
  if int(first_loss_step) != NO_STEP:
    return f"the training loss is not finite at step {int(first_loss_step)}"
  if not _all_finite(weights):
    return f"the weights are not finite after step {last_step} (the loss was still finite)"
  return None
